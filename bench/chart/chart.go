// Package chart draws keel's benchmark charts as SVG with gonum.org/v1/plot:
// grouped bars, one group per workload and one colour per target, with the
// legend in a strip to the right of the plot so that it never hides a bar.
//
// It knows nothing of fio or of the report format: the caller hands it
// groups, series and values.
package chart

import (
	"errors"
	"fmt"
	"image/color"
	"io"
	"math"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"
)

// Series is one target: a value per group, in group order. NaN leaves a
// gap (the target was not measured on that group).
type Series struct {
	Name   string
	Values []float64
}

// Bars is a grouped bar chart.
type Bars struct {
	Title  string
	YLabel string
	Groups []string // x axis, one cluster of bars each
	Series []Series // one bar per group each, left to right
	// RefLine, when positive, draws a dashed horizontal line at that value
	// (1.0 for "relative to the limit").
	RefLine float64
	// Width and Height of the drawing; 0 picks a size that fits the bars.
	Width, Height vg.Length
}

// palette has one clearly distinct colour per target (Tableau 10).
var palette = []color.RGBA{
	{0x4e, 0x79, 0xa7, 0xff}, {0xf2, 0x8e, 0x2b, 0xff}, {0xe1, 0x57, 0x59, 0xff},
	{0x76, 0xb7, 0xb2, 0xff}, {0x59, 0xa1, 0x4f, 0xff}, {0xed, 0xc9, 0x48, 0xff},
	{0xb0, 0x7a, 0xa1, 0xff}, {0xff, 0x9d, 0xa7, 0xff}, {0x9c, 0x75, 0x5f, 0xff},
	{0xba, 0xb0, 0xac, 0xff},
}

// Color is the colour of the i-th series.
func Color(i int) color.Color { return palette[i%len(palette)] }

// WriteSVG draws b as SVG into w.
func WriteSVG(w io.Writer, b Bars) error {
	return write(w, b, func(w, h vg.Length) vg.CanvasWriterTo { return vgsvg.New(w, h) })
}

// WritePNG draws b as a PNG image at 110 dots per inch into w.
func WritePNG(w io.Writer, b Bars) error {
	return write(w, b, func(w, h vg.Length) vg.CanvasWriterTo {
		return vgimg.PngCanvas{Canvas: vgimg.NewWith(vgimg.UseWH(w, h), vgimg.UseDPI(110))}
	})
}

func write(w io.Writer, b Bars, newCanvas func(w, h vg.Length) vg.CanvasWriterTo) error {
	if len(b.Groups) == 0 || len(b.Series) == 0 {
		return errors.New("chart: no groups or no series")
	}
	for _, s := range b.Series {
		if len(s.Values) != len(b.Groups) {
			return fmt.Errorf("chart: series %q has %d values for %d groups", s.Name, len(s.Values), len(b.Groups))
		}
	}
	const (
		barWidth    = 9 * vg.Millimeter / 2
		legendWidth = 7 * vg.Centimeter
		margin      = 3 * vg.Centimeter // axis labels and padding
	)
	width, height := b.Width, b.Height
	if width == 0 {
		perGroup := vg.Length(len(b.Series)+1) * barWidth
		width = vg.Length(len(b.Groups))*perGroup + margin + legendWidth
		width = max(width, 20*vg.Centimeter)
	}
	if height == 0 {
		height = 12 * vg.Centimeter
	}
	plotWidth := width - legendWidth
	// The bars of a group share the space between two ticks, with one bar
	// of gap.
	bw := (plotWidth - margin) / vg.Length(len(b.Groups)*(len(b.Series)+1))

	p := plot.New()
	p.Title.Text = b.Title
	p.Y.Label.Text = b.YLabel
	p.Y.Min = 0
	p.NominalX(b.Groups...)
	p.X.Tick.Label.Rotation = math.Pi / 12
	p.X.Tick.Label.XAlign = draw.XRight
	p.X.Tick.Label.YAlign = draw.YTop
	p.Add(plotter.NewGrid())
	p.Y.Tick.Marker = ticks{}
	legend := plot.NewLegend()
	legend.Top, legend.Left = true, true
	legend.Padding = vg.Points(3)

	n := float64(len(b.Series))
	for i, s := range b.Series {
		vals := make(plotter.Values, len(s.Values))
		for j, v := range s.Values {
			if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
				v = 0
			}
			vals[j] = v
		}
		bc, err := plotter.NewBarChart(vals, bw)
		if err != nil {
			return fmt.Errorf("chart: series %q: %w", s.Name, err)
		}
		bc.Color = Color(i)
		bc.LineStyle.Width = 0
		bc.Offset = vg.Length(float64(i)-(n-1)/2) * bw
		p.Add(bc)
		legend.Add(s.Name, bc)
	}
	if b.RefLine > 0 {
		ref, err := plotter.NewLine(plotter.XYs{{X: -0.5, Y: b.RefLine}, {X: float64(len(b.Groups)) - 0.5, Y: b.RefLine}})
		if err != nil {
			return fmt.Errorf("chart: reference line: %w", err)
		}
		ref.LineStyle.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		ref.LineStyle.Color = color.Gray{Y: 0x40}
		p.Add(ref)
	}

	// Headroom above the tallest bar, rounded to a tick.
	top := 0.0
	for _, s := range b.Series {
		for _, v := range s.Values {
			if !math.IsNaN(v) && !math.IsInf(v, 0) {
				top = max(top, v)
			}
		}
	}
	top = max(top, b.RefLine)
	if top > 0 {
		tk := ticks{}.Ticks(0, top*1.05)
		p.Y.Max = tk[len(tk)-1].Value
		if p.Y.Max < top*1.05 {
			p.Y.Max += tk[1].Value - tk[0].Value
		}
	}

	c := newCanvas(width, height)
	dc := draw.New(c)
	p.Draw(draw.Crop(dc, 0, -legendWidth, 0, -vg.Millimeter*3))
	legendArea := draw.Crop(dc, plotWidth+vg.Millimeter*4, 0, 0, -vg.Centimeter*1.5)
	legend.Draw(legendArea)
	_, err := c.WriteTo(w)
	return err
}

// ticks puts major ticks at a round step (1, 2 or 5 times a power of ten,
// or 0.25) giving at most 8 intervals, with grid-friendly labels.
type ticks struct{}

func (ticks) Ticks(lo, hi float64) []plot.Tick {
	if !(hi > lo) {
		return []plot.Tick{{Value: lo, Label: fmt.Sprint(lo)}}
	}
	span := hi - lo
	step := 0.0
	for e := math.Floor(math.Log10(span / 8)); step == 0; e++ {
		for _, m := range []float64{1, 2, 2.5, 5} {
			if s := m * math.Pow(10, e); span/s <= 8 {
				step = s
				break
			}
		}
	}
	var out []plot.Tick
	for v := math.Ceil(lo/step) * step; v <= hi+step*1e-9; v += step {
		out = append(out, plot.Tick{Value: v, Label: strconv.FormatFloat(v, 'g', 4, 64)})
	}
	return out
}

package chart

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"math"
	"strings"
	"testing"
)

func sample() Bars {
	return Bars{
		Title:  "t",
		YLabel: "IOPS relative to raw",
		Groups: []string{"randread-4k-qd1", "seqwrite-1m-qd8"},
		Series: []Series{
			{Name: "keel (direct)", Values: []float64{0.9, 1.1}},
			{Name: "nbdkit (page-cache)", Values: []float64{0.6, math.NaN()}},
			{Name: "raw (direct)", Values: []float64{1, 1}},
		},
		RefLine: 1,
	}
}

func TestWriteSVG(t *testing.T) {
	var b bytes.Buffer
	if err := WriteSVG(&b, sample()); err != nil {
		t.Fatal(err)
	}
	svg := b.String()
	// Well-formed XML with an svg root.
	dec := xml.NewDecoder(strings.NewReader(svg))
	root := ""
	for {
		tok, err := dec.Token()
		if err != nil {
			if err.Error() != "EOF" {
				t.Fatalf("not well-formed XML: %v", err)
			}
			break
		}
		if se, ok := tok.(xml.StartElement); ok && root == "" {
			root = se.Name.Local
		}
	}
	if root != "svg" {
		t.Fatalf("root element %q", root)
	}
	// gonum writes labels as <text> elements; the names
	// must be there, and one fill per series colour.
	for _, want := range []string{"keel (direct)", "nbdkit (page-cache)", "raw (direct)", "randread-4k-qd1", "IOPS relative to raw"} {
		if !strings.Contains(svg, want) {
			t.Errorf("SVG lacks %q", want)
		}
	}
	for i := range sample().Series {
		c := palette[i]
		fill := fmt.Sprintf("fill:#%02X%02X%02X", c.R, c.G, c.B)
		if !strings.Contains(svg, fill) {
			t.Errorf("SVG lacks series %d's colour %s", i, fill)
		}
	}
}

func TestWritePNG(t *testing.T) {
	var b bytes.Buffer
	if err := WritePNG(&b, sample()); err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b.Bytes(), []byte("\x89PNG\r\n\x1a\n")) {
		t.Errorf("not a PNG: % x", b.Bytes()[:min(8, b.Len())])
	}
}

func TestWriteSVGErrors(t *testing.T) {
	bad := sample()
	bad.Series[1].Values = []float64{1}
	if err := WriteSVG(&bytes.Buffer{}, bad); err == nil || !strings.Contains(err.Error(), "nbdkit") {
		t.Errorf("mismatched series: %v", err)
	}
	if err := WriteSVG(&bytes.Buffer{}, Bars{}); err == nil {
		t.Error("empty chart accepted")
	}
}

func TestTicks(t *testing.T) {
	for _, c := range []struct {
		lo, hi float64
		want   []float64
	}{
		{0, 1.9, []float64{0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75}},
		{0, 1, []float64{0, 0.2, 0.4, 0.6, 0.8, 1}},
		{0, 120000, []float64{0, 20000, 40000, 60000, 80000, 100000, 120000}},
	} {
		var got []float64
		for _, tk := range (ticks{}).Ticks(c.lo, c.hi) {
			got = append(got, tk.Value)
		}
		if len(got) != len(c.want) {
			t.Errorf("Ticks(%v, %v) = %v, want %v", c.lo, c.hi, got, c.want)
			continue
		}
		for i := range got {
			if math.Abs(got[i]-c.want[i]) > 1e-9 {
				t.Errorf("Ticks(%v, %v) = %v, want %v", c.lo, c.hi, got, c.want)
				break
			}
		}
	}
}

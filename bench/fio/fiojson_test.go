package fio_test

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"keel/bench/fio"
)

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-6*math.Max(1, math.Abs(b)) }

// The testdata files are real fio 3.33 reports: the multiconn workload over
// the nbd engine against nbdkit, and two raw libaio O_DIRECT runs (one
// without --percentile_list, so with fio's full default list).
func TestParseFioJSON(t *testing.T) {
	type dir struct {
		iops, bw, mean, p50, p99, p999 float64
		ios                            int64
	}
	cases := []struct {
		file        string
		read, write dir
		clientCPU   float64
	}{
		{
			file:      "nbd-multiconn-4x8-randrw.json",
			read:      dir{18866.136514, 77275695, 933.27318283, 238.592, 11862.016, 38010.88, 28469},
			write:     dir{19123.260437, 78328874, 691.944905985, 214.016, 8290.304, 42205.184, 28857},
			clientCPU: 5.019947 + 11.884973,
		},
		{
			file:      "raw-randrw70-64k-qd16.json",
			read:      dir{21467.532468, 1406896207, 480.481291638, 468.992, 954.368, 1564.672, 21489},
			write:     dir{9168.831169, 600888519, 594.320937023, 528.384, 1138.688, 2703.36, 9178},
			clientCPU: 8.4 + 18.5,
		},
		{
			file:      "raw-randread-4k-qd1.json",
			read:      dir{6159.84016, 25230705, 106.53102011, 72.192, 536.576, 7307.264, 6166},
			write:     dir{},
			clientCPU: 2.5 + 37.5,
		},
	}
	check := func(t *testing.T, what string, got fio.Direction, want dir) {
		t.Helper()
		for _, f := range []struct {
			name      string
			got, want float64
		}{
			{"IOPS", got.IOPS, want.iops}, {"BW", got.BW, want.bw}, {"IOs", float64(got.IOs), float64(want.ios)},
			{"mean", got.Latency.Mean, want.mean}, {"p50", got.Latency.P50, want.p50},
			{"p99", got.Latency.P99, want.p99}, {"p99.9", got.Latency.P999, want.p999},
		} {
			if !near(f.got, f.want) {
				t.Errorf("%s %s = %v, want %v", what, f.name, f.got, f.want)
			}
		}
	}
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("testdata", c.file))
			if err != nil {
				t.Fatal(err)
			}
			f, version, err := fio.ParseFioJSON(b)
			if err != nil {
				t.Fatal(err)
			}
			if version != "fio-3.33" {
				t.Errorf("version %q", version)
			}
			check(t, "read", f.Read, c.read)
			check(t, "write", f.Write, c.write)
			if !near(f.ClientCPU, c.clientCPU) {
				t.Errorf("client CPU = %v, want %v", f.ClientCPU, c.clientCPU)
			}
			if f.IOPS() != f.Read.IOPS+f.Write.IOPS || f.BW() != f.Read.BW+f.Write.BW {
				t.Error("IOPS/BW are not reads plus writes")
			}
			if f.Read.Latency.P50 > f.Read.Latency.P99 || f.Read.Latency.P99 > f.Read.Latency.P999 {
				t.Errorf("percentiles out of order: %+v", f.Read.Latency)
			}
		})
	}
}

func TestParseFioJSONLeadingNoise(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "raw-randread-4k-qd1.json"))
	if err != nil {
		t.Fatal(err)
	}
	noisy := append([]byte("note: both iodepth >= 1 and synchronous I/O engine are selected\n"), b...)
	if _, _, err := fio.ParseFioJSON(noisy); err != nil {
		t.Fatalf("leading note: %v", err)
	}
}

func TestParseFioJSONErrors(t *testing.T) {
	job := func(body string) string {
		return `{"fio version":"fio-3.33","jobs":[{"jobname":"j","error":0,` + body + `}]}`
	}
	okDir := `{"iops":1,"bw_bytes":4096,"total_ios":1,"clat_ns":{"mean":1000,"N":1,"percentile":{"50.000000":1000,"99.000000":2000,"99.900000":3000}}}`
	cases := []struct{ name, in, want string }{
		{"empty", "", "no JSON object"},
		{"garbage", "{not json", "fio report"},
		{"no jobs", `{"fio version":"fio-3.33","jobs":[]}`, "no jobs"},
		{"two groups", `{"jobs":[{"jobname":"a"},{"jobname":"b"}]}`, "2 job groups"},
		{"job error", `{"jobs":[{"jobname":"a","error":5}]}`, "error 5"},
		{"no p99.9", job(`"read":{"iops":1,"total_ios":1,"clat_ns":{"N":1,"percentile":{"50.000000":1,"99.000000":2}}},"write":` + okDir), "p99.9"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := fio.ParseFioJSON([]byte(c.in))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want one containing %q", err, c.want)
			}
		})
	}
	if _, _, err := fio.ParseFioJSON([]byte(job(`"read":` + okDir + `,"write":` + okDir))); err != nil {
		t.Fatalf("valid minimal report: %v", err)
	}
}

// FuzzParseFioJSON: fio's report is parsed, not trusted; whatever it holds,
// the parser returns figures or an error and never panics.
func FuzzParseFioJSON(f *testing.F) {
	for _, name := range []string{"nbd-multiconn-4x8-randrw.json", "raw-randrw70-64k-qd16.json", "raw-randread-4k-qd1.json"} {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"jobs":[{"jobname":"a","error":0,"read":{"clat_ns":{"N":1,"percentile":{"50":1,"99":2,"99.9":3}}}}]}`))
	f.Add([]byte("{"))
	f.Fuzz(func(t *testing.T, b []byte) {
		fig, _, err := fio.ParseFioJSON(b)
		if err != nil {
			return
		}
		_ = fig.IOPS() + fig.BW()
	})
}

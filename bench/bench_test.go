package bench

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"keel/bench/fio"
)

func TestCommandTree(t *testing.T) {
	cmd := Command()
	sub, _, err := cmd.Find([]string{"fio"})
	if err != nil || sub.Name() != "fio" {
		t.Fatalf("no fio subcommand: %v", err)
	}
	for _, f := range []string{"peers", "workloads", "runtime", "ramp", "reps", "size", "dir", "unix", "out", "keel-bin", "fio", "markdown", "quiet"} {
		if sub.Flags().Lookup(f) == nil {
			t.Errorf("fio has no --%s flag", f)
		}
	}
	if got := sub.Flags().Lookup("peers").DefValue; got != strings.Join(fio.TargetNames(), ",") {
		t.Errorf("default peers %q", got)
	}
}

func execute(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := Command()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), err
}

func TestMarkdownFromReport(t *testing.T) {
	r := fio.Report{
		Settings: fio.Settings{Workloads: []string{"randread-4k-qd1"}, Reps: 2, Size: 4 << 30, Runtime: "10s"},
		Targets:  []fio.TargetInfo{{Name: "raw", Mode: fio.ModeDirect}},
		Medians:  []fio.Median{{Target: "raw", Mode: fio.ModeDirect, Workload: "randread-4k-qd1", Figures: fio.Figures{Read: fio.Direction{IOPS: 30000, IOs: 1}}}},
	}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "latest.json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := execute(t, "fio", "--markdown", path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "| raw | direct | randread-4k-qd1 | 30000 |") {
		t.Errorf("markdown:\n%s", out)
	}
}

func TestBadFlags(t *testing.T) {
	if _, err := execute(t, "fio", "--size", "4X", "--out", ""); err == nil || !strings.Contains(err.Error(), "size") {
		t.Errorf("bad size: %v", err)
	}
	if _, err := execute(t, "fio", "extra"); err == nil {
		t.Error("positional argument accepted")
	}
}

func TestSplitList(t *testing.T) {
	if got := splitList(" keel, raw,,nbdkit "); strings.Join(got, "|") != "keel|raw|nbdkit" {
		t.Errorf("splitList = %q", got)
	}
	if got := splitList(""); got != nil {
		t.Errorf("splitList(\"\") = %q", got)
	}
}

package attach

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"keel/netpath/nbdkernel"
)

func TestParseDevice(t *testing.T) {
	for in, want := range map[string]int{"": -1, "/dev/nbd0": 0, "nbd12": 12, "3": 3} {
		got, err := parseDevice(in)
		if err != nil || got != want {
			t.Errorf("parseDevice(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"/dev/sda", "nbd", "nbd-1", "/dev/nbdx", "-2"} {
		if _, err := parseDevice(in); err == nil {
			t.Errorf("parseDevice(%q) accepted", in)
		}
	}
}

// The command refuses inconsistent flags before it touches the kernel.
func TestAttachFlagErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "give VOLUME --coord URL"},
		{[]string{"--coord", "http://127.0.0.1:1"}, "needs the VOLUME"},
		{[]string{"v1", "--coord", "http://127.0.0.1:1", "--addr", "127.0.0.1:1"}, "not both"},
		{[]string{"v1", "--addr", "127.0.0.1:1"}, "looked up with --coord"},
		{[]string{"--addr", "127.0.0.1:1", "--timeout", "0"}, "at least 1 second"},
		{[]string{"--addr", "127.0.0.1:1", "--device", "/dev/sda"}, "want /dev/nbdN"},
		{[]string{"--list", "--output", "xml", "--state-dir", "/nonexistent"}, "table or json"},
		{[]string{"a", "b"}, "accepts at most 1 arg"},
	} {
		cmd := attachCommand()
		cmd.SetArgs(c.args)
		cmd.SetOut(&bytes.Buffer{})
		cmd.SetErr(&bytes.Buffer{})
		err := cmd.ExecuteContext(context.Background())
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: err %v, want %q", c.args, err, c.want)
		}
	}
}

func TestEntries(t *testing.T) {
	dir := t.TempDir()
	sys := t.TempDir()
	now := time.Now()
	// nbd0: recorded connected, but its supervisor is gone.
	writeState(dir, State{Device: "/dev/nbd0", Index: 0, Addr: "127.0.0.1:10809", Export: "v", Connections: 2, Live: 2, PID: 1 << 30, Phase: PhaseConnected, Since: now})
	// nbd1: recorded, but the kernel no longer has it configured.
	writeState(dir, State{Device: "/dev/nbd1", Index: 1, Addr: "127.0.0.1:10810", Export: "w", PID: 1 << 30, Phase: PhaseFailed, Why: "no server", Since: now})
	// nbd2: configured in the kernel without a record.
	os.MkdirAll(filepath.Join(sys, "nbd2"), 0o755)
	os.WriteFile(filepath.Join(sys, "nbd2", "backend"), []byte("other-tool\n"), 0o644)
	os.WriteFile(filepath.Join(sys, "nbd2", "pid"), []byte("77\n"), 0o644)
	os.WriteFile(filepath.Join(sys, "nbd2", "size"), []byte("2048\n"), 0o644)

	status := []nbdkernel.DeviceStatus{{Index: 0, Connected: true}, {Index: 1}, {Index: 2, Connected: true}, {Index: 3}}
	es, errs := entries(dir, status, sys)
	if len(errs) != 0 || len(es) != 3 {
		t.Fatalf("entries %+v, errors %v", es, errs)
	}
	if es[0].Phase != PhaseUnsupervised || !strings.Contains(es[0].Why, "is gone") || es[0].Supervised {
		t.Errorf("nbd0: %+v", es[0])
	}
	if es[1].Phase != "detached" || !strings.Contains(es[1].Why, "no connection configured") {
		t.Errorf("nbd1: %+v", es[1])
	}
	if es[2].Device != "/dev/nbd2" || es[2].Backend != "other-tool" || es[2].PID != 77 || es[2].Size != 2048*512 {
		t.Errorf("nbd2: %+v", es[2])
	}

	var b bytes.Buffer
	writeTable(&b, es)
	out := b.String()
	for _, want := range []string{"DEVICE", "STATE", "NODE", "EPOCH", "/dev/nbd0", "unsupervised", "2/2", "127.0.0.1:10809", "/dev/nbd2", "1.0 MiB"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}

	// Without the kernel (status nil) the records are shown as recorded,
	// corrected only by the process table.
	es, _ = entries(dir, nil, sys)
	if len(es) != 2 || es[1].Phase != PhaseUnsupervised || es[0].KernelConfigured != nil {
		t.Errorf("without the kernel: %+v", es)
	}
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 512 << 20: "512.0 MiB", 3 << 40: "3.0 TiB"} {
		if got := humanBytes(n); got != want {
			t.Errorf("humanBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestPidAlive(t *testing.T) {
	if pidAlive(0) || pidAlive(-1) {
		t.Error("pid 0 or -1 alive")
	}
	// This test process is not an attach supervisor: its pid must not
	// count, or detach would signal an unrelated process.
	if pidAlive(os.Getpid()) {
		t.Error("the test binary counted as a supervisor")
	}
}

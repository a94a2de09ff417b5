//go:build linux

package node_test

// Two networks in network namespaces (scripts/testbed): the coordinator in
// ns co, nodes in n1..n3 with their primary (pri0) and replication (rep0)
// interfaces on separate links, fio in ns cl. Needs root.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"keel/ctl/coordapi"
)

// testbed runs scripts/testbed; the test sets KEEL_TESTBED_PREFIX in its
// environment, which every child inherits.
type testbed struct {
	t      *testing.T
	script string
}

func (tb *testbed) cmd(args ...string) *exec.Cmd { return exec.Command(tb.script, args...) }

func (tb *testbed) run(args ...string) string {
	tb.t.Helper()
	out, err := tb.cmd(args...).CombinedOutput()
	if err != nil {
		tb.t.Fatalf("testbed %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// counters returns NODE's NET interface byte counters.
func (tb *testbed) counters(node, net string) (rx, tx int64) {
	tb.t.Helper()
	if _, err := fmt.Sscan(tb.run("counters", node, net), &rx, &tx); err != nil {
		tb.t.Fatalf("counters %s %s: %v", node, net, err)
	}
	return rx, tx
}

func (tb *testbed) status(vol string) coordapi.Volume {
	tb.t.Helper()
	out := tb.run("exec", "cl", keelBin(tb.t), "volume", "status", vol, "--coord", "http://10.201.1.250:7400", "--output", "json")
	var l coordapi.VolumeList
	if err := json.Unmarshal([]byte(out), &l); err != nil || len(l.Volumes) != 1 {
		tb.t.Fatalf("volume status: %v\n%s", err, out)
	}
	return l.Volumes[0]
}

// TestNetnsPathsAndCut: replication bytes cross only the replication
// interfaces and client bytes only the primary ones; cutting a secondary's
// replication link makes writes wait while the volume shows impaired, and
// once the coordinator has dropped that secondary they continue.
func TestNetnsPathsAndCut(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces (scripts/testbed)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2 (ip) for network namespaces")
	}
	need(t, "fio")
	_, file, _, _ := runtime.Caller(0)
	t.Setenv("KEEL_TESTBED_PREFIX", fmt.Sprintf("kn%d", os.Getpid()%10000))
	tb := &testbed{t: t, script: filepath.Join(filepath.Dir(file), "..", "scripts", "testbed")}
	tb.run("up", "3")
	t.Cleanup(func() { tb.cmd("down").Run() })

	bin := keelBin(t)
	dir := filepath.Dir(volFile(t))
	inNS := func(name, ns string, args ...string) *proc {
		return startProc(t, name, append([]string{tb.script, "exec", ns, bin}, args...)...)
	}
	inNS("coord", "co", "coord", "--id", "c1", "--data-dir", filepath.Join(dir, "coord"),
		"--listen", "10.201.1.250:7400", "--raft-addr", "10.201.1.250:7401",
		"--lease", "3s", "--heartbeat-interval", "500ms", "--lease-margin", "300ms", "--reserve", "0")
	for i := 1; i <= 3; i++ {
		id := fmt.Sprintf("n%d", i)
		inNS(id, id, "node", "--id", id, "--zone", "z"+id, "--data-dir", filepath.Join(dir, id),
			"--coord", "http://10.201.1.250:7400",
			"--primary-listen", fmt.Sprintf("10.201.1.%d:10809", i), "--repl-listen", fmt.Sprintf("10.201.2.%d:10909", i),
			"--primary-iface", "pri0", "--repl-iface", "rep0", "--capacity", "4G",
			"--repl-timeout", "8s", "--impaired-after", "1s", "--loss-wait", "60s")
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, err := tb.cmd("exec", "cl", bin, "volume", "create", "nv", "--size", "128M", "--replicas", "3",
			"--coord", "http://10.201.1.250:7400").CombinedOutput()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume create: %v\n%s", err, out)
		}
		time.Sleep(500 * time.Millisecond) // the coordinator and nodes are other processes
	}
	var v coordapi.Volume
	deadline = time.Now().Add(60 * time.Second)
	for {
		v = tb.status("nv")
		ready := v.Primary != ""
		for _, m := range v.Members {
			ready = ready && m.ReportedEpoch == v.Epoch
		}
		if ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume not ready: %+v", v)
		}
		time.Sleep(200 * time.Millisecond)
	}
	primary := string(v.Primary)
	var secondaries []string
	for _, m := range v.Members {
		if string(m.Node) != primary {
			secondaries = append(secondaries, string(m.Node))
		}
	}
	uri := fmt.Sprintf("nbd://10.201.1.%s:10809/nv", strings.TrimPrefix(primary, "n"))
	fio := func(args ...string) {
		t.Helper()
		c := tb.cmd(append([]string{"exec", "cl", "fio", "--name=nv", "--ioengine=nbd", "--uri=" + uri}, args...)...)
		c.Dir = t.TempDir()
		if out, err := c.CombinedOutput(); err != nil {
			t.Fatalf("fio %v: %v\n%s", args, err, out)
		}
	}

	// Paths: 64 MiB of writes.
	const written = 64 << 20
	type ctr struct{ rx, tx int64 }
	snap := func() map[string]ctr {
		m := map[string]ctr{}
		for _, n := range append([]string{primary}, secondaries...) {
			for _, net := range []string{"pri", "rep"} {
				rx, tx := tb.counters(n, net)
				m[n+"/"+net] = ctr{rx, tx}
			}
		}
		return m
	}
	before := snap()
	fio("--rw=write", "--bs=256k", "--iodepth=8", fmt.Sprintf("--size=%d", written))
	after := snap()
	d := func(k string) ctr { return ctr{after[k].rx - before[k].rx, after[k].tx - before[k].tx} }
	t.Logf("bytes during a %d MiB write: primary %s pri %+v rep %+v; secondaries %s pri %+v rep %+v, %s pri %+v rep %+v",
		written>>20, primary, d(primary+"/pri"), d(primary+"/rep"),
		secondaries[0], d(secondaries[0]+"/pri"), d(secondaries[0]+"/rep"), secondaries[1], d(secondaries[1]+"/pri"), d(secondaries[1]+"/rep"))
	if got := d(primary + "/pri").rx; got < written {
		t.Errorf("client writes did not arrive on the primary's pri0: rx %d < %d", got, written)
	}
	if got := d(primary + "/rep").tx; got < 2*written {
		t.Errorf("replication to two secondaries did not leave on the primary's rep0: tx %d < %d", got, 2*written)
	}
	if got := d(primary + "/pri").tx; got > written/8 {
		t.Errorf("primary's pri0 sent %d bytes during writes: replication leaked onto the primary network", got)
	}
	for _, s := range secondaries {
		if got := d(s + "/rep").rx; got < written {
			t.Errorf("secondary %s: rep0 received %d < %d", s, got, written)
		}
		if got := d(s+"/pri").rx + d(s+"/pri").tx; got > written/8 {
			t.Errorf("secondary %s: pri0 carried %d bytes during writes: replication leaked onto the primary network", s, got)
		}
	}

	// Cut one secondary's replication link while writing.
	cut := secondaries[0]
	tb.run("cut", cut, "rep")
	bg := tb.cmd("exec", "cl", "fio", "--name=cut", "--ioengine=nbd", "--uri="+uri, "--rw=write", "--bs=64k",
		"--iodepth=4", "--size=16M", "--offset=64M", "--verify=crc32c", "--do_verify=1")
	bg.Dir = t.TempDir()
	bg.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	bgOut := &lockedBuffer{}
	bg.Stdout, bg.Stderr = bgOut, bgOut
	if err := bg.Start(); err != nil {
		t.Fatal(err)
	}
	bgDone := make(chan error, 1)
	go func() { bgDone <- bg.Wait() }()
	t.Cleanup(func() {
		if bg.ProcessState == nil {
			bg.Process.Kill()
			<-bgDone
		}
	})
	sawImpaired := false
	deadline = time.Now().Add(60 * time.Second)
	for !sawImpaired {
		select {
		case err := <-bgDone:
			t.Fatalf("writes finished (%v) before the volume showed impaired:\n%s", err, bgOut.String())
		default:
		}
		s := tb.status("nv")
		if s.State == coordapi.StateImpaired {
			sawImpaired = true
			t.Logf("while %s's replication link is cut: %s: %s", cut, s.State, s.Reason)
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume never showed impaired with %s's replication link cut; last %s: %s", cut, s.State, s.Reason)
		}
	}
	select {
	case err := <-bgDone:
		if err != nil {
			t.Fatalf("writes after the cut failed: %v\n%s", err, bgOut.String())
		}
	case <-time.After(120 * time.Second):
		t.Fatalf("writes did not continue within 120s of the cut:\n%s", bgOut.String())
	}
	s := tb.status("nv")
	for _, m := range s.Members {
		if string(m.Node) == cut && m.InSync {
			t.Fatalf("%s still in sync after its replication link was cut: %+v", cut, s)
		}
	}
	// The primary's next health report (its watchdog, then a heartbeat)
	// takes the volume out of impaired.
	deadline = time.Now().Add(30 * time.Second)
	for s.Epoch <= v.Epoch || s.State == coordapi.StateImpaired {
		if time.Now().After(deadline) {
			t.Fatalf("after the cut: epoch %d (was %d), state %s: %s", s.Epoch, v.Epoch, s.State, s.Reason)
		}
		time.Sleep(100 * time.Millisecond)
		s = tb.status("nv")
	}
	t.Logf("after the cut: epoch %d, %s: %s", s.Epoch, s.State, s.Reason)
}

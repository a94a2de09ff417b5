//go:build linux

package node_test

// Recovery in network namespaces (scripts/testbed), as issue 6 asks: a
// partitioned secondary catches up from the write-intent bitmap, and the
// April 2011 scenario (a group of nodes cut off at once, then healed)
// recovers without a storm. Needs root.
//
// The load and the observation run inside the client namespace: the test
// binary re-executes itself there as an "agent" (TestNetnsAgent), which
// talks to the coordinator and the nodes on the primary network and writes
// JSON lines to a file the test reads.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"keel/ctl/cli"
	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
	"keel/netpath/nbdkernel"
	"keel/netpath/nbdproto"
	"keel/node"
)

const netnsCoordURL = "http://10.201.1.250:7400"

// netnsCluster is a testbed with a coordinator and nodes in their
// namespaces.
type netnsCluster struct {
	t     *testing.T
	tb    *testbed
	bin   string
	dir   string
	nodes map[string]*proc
	args  []string // node flags common to all
}

func needNetns(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces (scripts/testbed)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2 (ip) for network namespaces")
	}
}

// startNetnsCluster brings up the testbed with n nodes, the coordinator
// (with coordArgs added) and the nodes (with nodeArgs added).
func startNetnsCluster(t *testing.T, prefix string, n int, coordArgs, nodeArgs []string) *netnsCluster {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	t.Setenv("KEEL_TESTBED_PREFIX", fmt.Sprintf("%s%d", prefix, os.Getpid()%10000))
	tb := &testbed{t: t, script: filepath.Join(filepath.Dir(file), "..", "scripts", "testbed")}
	tb.run("up", strconv.Itoa(n))
	t.Cleanup(func() { tb.cmd("down").Run() })
	c := &netnsCluster{t: t, tb: tb, bin: keelBin(t), dir: t.TempDir(), nodes: map[string]*proc{}, args: nodeArgs}
	startProc(t, "coord", append([]string{tb.script, "exec", "co", c.bin, "coord", "--id", "c1",
		"--data-dir", filepath.Join(c.dir, "coord"),
		"--listen", "10.201.1.250:7400", "--raft-addr", "10.201.1.250:7401",
		"--lease", "3s", "--heartbeat-interval", "500ms", "--lease-margin", "300ms"}, coordArgs...)...)
	for i := 1; i <= n; i++ {
		c.startNode(fmt.Sprintf("n%d", i))
	}
	c.waitNodesUp(n)
	return c
}

func (c *netnsCluster) startNode(id string) {
	i := strings.TrimPrefix(id, "n")
	c.nodes[id] = startProc(c.t, id, append([]string{c.tb.script, "exec", id, c.bin, "node", "--id", id, "--zone", "z" + id,
		"--data-dir", filepath.Join(c.dir, id), "--coord", netnsCoordURL,
		"--primary-listen", "10.201.1." + i + ":10809", "--repl-listen", "10.201.2." + i + ":10909",
		"--primary-iface", "pri0", "--repl-iface", "rep0"}, c.args...)...)
}

// keel runs the keel CLI in the client namespace and returns its output.
func (c *netnsCluster) keel(args ...string) (string, error) {
	out, err := c.tb.cmd(append([]string{"exec", "cl", c.bin}, append(args, "--coord", netnsCoordURL)...)...).CombinedOutput()
	return string(out), err
}

// poll retries cond until it holds: the cluster is other processes in
// other namespaces, so polling with a deadline is the only way to wait.
func (c *netnsCluster) poll(what string, within time.Duration, cond func() error) {
	c.t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s: not within %v: %v", what, within, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *netnsCluster) waitNodesUp(n int) {
	c.t.Helper()
	c.poll("every node up", 60*time.Second, func() error {
		out, err := c.keel("node", "list", "--output", "json")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		var l coordapi.NodeList
		if err := json.Unmarshal([]byte(out), &l); err != nil {
			return err
		}
		up := 0
		for _, nd := range l.Nodes {
			if nd.State == coordapi.NodeUp {
				up++
			}
		}
		if up != n {
			return fmt.Errorf("%d of %d nodes up", up, n)
		}
		return nil
	})
}

func (c *netnsCluster) volumes() ([]coordapi.Volume, error) {
	out, err := c.keel("volume", "list", "--output", "json")
	if err != nil {
		return nil, fmt.Errorf("%v: %s", err, out)
	}
	var l coordapi.VolumeList
	if err := json.Unmarshal([]byte(out), &l); err != nil {
		return nil, fmt.Errorf("%v: %s", err, out)
	}
	return l.Volumes, nil
}

// createReady creates the volumes and waits until each has a primary
// whose in-sync members all reported the epoch.
func (c *netnsCluster) createReady(size string, replicas int, names ...string) {
	c.t.Helper()
	for _, name := range names {
		c.poll("create "+name, 60*time.Second, func() error {
			out, err := c.keel("volume", "create", name, "--size", size, "--replicas", strconv.Itoa(replicas))
			if err != nil && !strings.Contains(out, "exists already") {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
	}
	c.poll("volumes ready", 90*time.Second, func() error {
		vs, err := c.volumes()
		if err != nil {
			return err
		}
		for _, v := range vs {
			if v.Primary == "" || v.State != coordapi.StateOK {
				return fmt.Errorf("%s: %s: %s", v.Name, v.State, v.Reason)
			}
			for _, m := range v.Members {
				if m.ReportedEpoch != v.Epoch {
					return fmt.Errorf("%s: member %s reported epoch %d of %d", v.Name, m.Node, m.ReportedEpoch, v.Epoch)
				}
			}
		}
		return nil
	})
}

func (c *netnsCluster) cluster() (coordapi.Cluster, error) {
	out, err := c.keel("cluster", "status", "--output", "json")
	if err != nil {
		return coordapi.Cluster{}, fmt.Errorf("%v: %s", err, out)
	}
	var st cli.ClusterStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return coordapi.Cluster{}, fmt.Errorf("%v: %s", err, out)
	}
	return st.Cluster, nil
}

// stopNodes stops every node (SIGTERM, then their files are quiet).
func (c *netnsCluster) stopNodes() {
	for _, p := range c.nodes {
		p.cmd.Process.Signal(syscall.SIGTERM)
	}
	for id, p := range c.nodes {
		select {
		case <-p.done:
		case <-time.After(30 * time.Second):
			c.t.Fatalf("node %s did not stop within 30s", id)
		}
	}
}

// replicaSums hashes every member's replica file of v (nodes stopped).
func (c *netnsCluster) replicaSums(v coordapi.Volume) map[coordapi.NodeID]string {
	out := map[coordapi.NodeID]string{}
	for _, m := range v.Members {
		out[m.Node] = node.DataSum(c.t, filepath.Join(c.dir, string(m.Node), string(v.ID)+".vol"), v.Size)
	}
	return out
}

func memberIDs(v coordapi.Volume) []coordapi.NodeID {
	var out []coordapi.NodeID
	for _, m := range v.Members {
		out = append(out, m.Node)
	}
	slices.Sort(out)
	return out
}

// TestNetnsPartitionCatchUp: both networks of a secondary are cut for a
// few seconds while fio writes with verify through the primary; after the
// heal the secondary catches up from the write-intent bitmap (a small
// share of the volume is copied), fio's verify finds everything, no new
// replica was placed, and the replicas are byte-identical.
func TestNetnsPartitionCatchUp(t *testing.T) {
	needNetns(t)
	need(t, "fio")
	const volSize = 256 << 20
	c := startNetnsCluster(t, "kp", 3,
		[]string{"--reserve", "0", "--recovery-grace", "5m"},
		[]string{"--capacity", "2G", "--repl-timeout", "3s", "--peer-wait", "2s", "--impaired-after", "1s", "--loss-wait", "60s"})
	c.createReady("256M", 2, "pv")
	vs, err := c.volumes()
	if err != nil {
		t.Fatal(err)
	}
	v0 := vs[0]
	var secondary coordapi.NodeID
	for _, m := range v0.Members {
		if m.Node != v0.Primary {
			secondary = m.Node
		}
	}
	uri := fmt.Sprintf("nbd://10.201.1.%s:10809/pv", strings.TrimPrefix(string(v0.Primary), "n"))
	t.Logf("volume %s: primary %s, secondary %s (cut), epoch %d", v0.ID, v0.Primary, secondary, v0.Epoch)

	// 16 MiB written at random, paced so that it spans the cut; verified
	// by fio at the end.
	fio := c.tb.cmd("exec", "cl", "fio", "--name=pv", "--ioengine=nbd", "--uri="+uri, "--rw=randwrite", "--bs=4k",
		"--iodepth=4", "--size=16M", "--rate_iops=600", "--verify=crc32c", "--do_verify=1")
	fio.Dir = t.TempDir()
	fio.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	fioOut := &lockedBuffer{}
	fio.Stdout, fio.Stderr = fioOut, fioOut
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	fioDone := make(chan error, 1)
	go func() { fioDone <- fio.Wait() }()
	t.Cleanup(func() {
		if fio.ProcessState == nil {
			fio.Process.Kill()
			<-fioDone
		}
	})

	// Cut once writes flow, for a few seconds: longer than the lease, so
	// that the secondary's node is down at the coordinator too.
	c.poll("writes flowing", 30*time.Second, func() error {
		rx, _ := c.tb.counters(string(secondary), "rep")
		if rx < 4<<20 {
			return fmt.Errorf("secondary received %d bytes so far", rx)
		}
		return nil
	})
	c.tb.run("cut", string(secondary), "pri")
	c.tb.run("cut", string(secondary), "rep")
	cutAt := time.Now()
	c.poll("secondary out of sync and down", 60*time.Second, func() error {
		vs, err := c.volumes()
		if err != nil {
			return err
		}
		for _, m := range vs[0].Members {
			if m.Node == secondary && !m.InSync && !m.Live {
				return nil
			}
		}
		return fmt.Errorf("%s: %s", vs[0].State, vs[0].Reason)
	})
	t.Logf("secondary out of sync and its lease expired %.1fs after the cut", time.Since(cutAt).Seconds())
	c.tb.run("heal", string(secondary), "pri")
	c.tb.run("heal", string(secondary), "rep")

	select {
	case err := <-fioDone:
		if err != nil {
			t.Fatalf("fio (write with verify) failed across the partition: %v\n%s", err, fioOut.String())
		}
	case <-time.After(180 * time.Second):
		t.Fatalf("fio did not finish within 180s:\n%s", fioOut.String())
	}
	var v coordapi.Volume
	c.poll("volume back to full redundancy", 120*time.Second, func() error {
		vs, err := c.volumes()
		if err != nil {
			return err
		}
		v = vs[0]
		if v.State != coordapi.StateOK || len(v.InSync()) != 2 {
			return fmt.Errorf("%s: %s", v.State, v.Reason)
		}
		return nil
	})
	if !slices.Equal(memberIDs(v), memberIDs(v0)) {
		t.Fatalf("members changed from %v to %v: a new replica was placed instead of catching up", memberIDs(v0), memberIDs(v))
	}
	cl, err := c.cluster()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("after the heal: %s, epoch %d; catch-ups copied %d bytes, re-mirrors %d bytes, %d placements, %d rejoins (volume %d bytes)",
		v.State, v.Epoch, cl.CopiedCatchUp, cl.CopiedRemirror, cl.Placed, cl.Rejoins, int64(volSize))
	if cl.Placed != 0 || cl.CopiedRemirror != 0 {
		t.Errorf("a re-mirror happened (%d placed, %d bytes): the partition was shorter than the grace", cl.Placed, cl.CopiedRemirror)
	}
	if cl.CopiedCatchUp <= 0 || cl.CopiedCatchUp > volSize/8 {
		t.Errorf("catch-up copied %d bytes of a %d-byte volume: want more than 0 and much less than the volume", cl.CopiedCatchUp, volSize)
	}
	c.stopNodes()
	sums := c.replicaSums(v)
	if sums[v0.Primary] != sums[secondary] {
		t.Fatalf("replicas differ after catch-up: %v", sums)
	}
}

// stormSample is one observation of the cluster by the agent.
type stormSample struct {
	T          float64              `json:"t"` // seconds since the agent started
	Mode       coordapi.ClusterMode `json:"mode"`
	Remirrors  int                  `json:"remirrors"`
	CatchUps   int                  `json:"catch_ups"`
	PerNode    map[string]int       `json:"per_node"` // re-mirrors each node sends or receives
	Impaired   []string             `json:"impaired,omitempty"`
	NotOK      []string             `json:"not_ok,omitempty"`
	Volumes    int                  `json:"volumes"`
	Refused    int64                `json:"slots_refused"`
	Granted    int64                `json:"slots_granted"`
	ReserveHit []string             `json:"reserve_hit,omitempty"` // nodes whose free space went below the reserve
}

// agentWrite is one write the agent issued and whether it was
// acknowledged.
type agentWrite struct {
	Vol   string `json:"vol"`
	Slot  int    `json:"slot"`
	Seq   uint64 `json:"seq"`
	Acked bool   `json:"acked"`
}

type agentLine struct {
	Sample *stormSample `json:"sample,omitempty"`
	Write  *agentWrite  `json:"write,omitempty"`
	Conns  int          `json:"connects,omitempty"` // writer reconnects (the final line)
}

const agentSlots = 256 // 4 KiB slots in each volume's first MiB

// TestNetns2011Storm is the April 2011 scenario on one machine: six nodes
// and many small volumes; a group of nodes holding a large share of the
// replicas is cut off from both networks at once while every volume takes
// writes, then healed. Re-mirror slots granted never exceed the limits, no
// node's free space goes below the reserve, retries stay bounded, every
// volume returns to full redundancy with every acknowledged write, and
// status showed the impaired volumes while they were impaired.
func TestNetns2011Storm(t *testing.T) {
	needNetns(t)
	const (
		nodes        = 6
		volumes      = 18
		maxRemirrors = 2
		perNode      = 1
	)
	c := startNetnsCluster(t, "ks", nodes,
		[]string{"--reserve", "0.2", "--recovery-grace", "40s",
			"--max-remirrors", strconv.Itoa(maxRemirrors), "--max-remirrors-per-node", strconv.Itoa(perNode),
			"--mass-failure-losses", "4", "--mass-failure-window", "20s", "--mass-failure-grace", "30s"},
		[]string{"--capacity", "1G", "--repl-timeout", "3s", "--peer-wait", "2s", "--impaired-after", "1s", "--loss-wait", "60s"})
	var names []string
	for i := range volumes {
		names = append(names, fmt.Sprintf("sv%02d", i))
	}
	c.createReady("16M", 2, names...)
	vs, err := c.volumes()
	if err != nil {
		t.Fatal(err)
	}
	// The group: the two nodes that hold one replica (not both) of the
	// most volumes, so that most volumes lose a replica while keeping one.
	var group []string
	best := -1
	for i := 1; i <= nodes; i++ {
		for j := i + 1; j <= nodes; j++ {
			pair := []string{fmt.Sprintf("n%d", i), fmt.Sprintf("n%d", j)}
			score := 0
			for _, v := range vs {
				in := 0
				for _, m := range v.Members {
					if slices.Contains(pair, string(m.Node)) {
						in++
					}
				}
				if in == 1 {
					score++
				}
			}
			if score > best {
				best, group = score, pair
			}
		}
	}
	affected := 0
	for _, v := range vs {
		for _, m := range v.Members {
			if slices.Contains(group, string(m.Node)) {
				affected++
				break
			}
		}
	}
	t.Logf("isolating %v: they hold %d of %d volumes' replicas", group, affected, volumes)

	out := filepath.Join(t.TempDir(), "agent.jsonl")
	stop := filepath.Join(t.TempDir(), "stop")
	agent := startAgent(t, c, "load", out, stop, names)
	agentStart := time.Now()

	// Writes flow, then the cut: both networks of the whole group at once.
	c.poll("writes flowing", 30*time.Second, func() error {
		if n := countAcked(t, out); n < 3*volumes {
			return fmt.Errorf("%d writes acknowledged", n)
		}
		return nil
	})
	for _, id := range group {
		c.tb.run("cut", id, "pri")
		c.tb.run("cut", id, "rep")
	}
	cutAt := time.Since(agentStart).Seconds()
	c.poll("mass-failure mode", 60*time.Second, func() error {
		cl, err := c.cluster()
		if err != nil {
			return err
		}
		if cl.Mode != coordapi.ModeMassFailure {
			return fmt.Errorf("mode %s, %d recent losses", cl.Mode, cl.RecentLoss)
		}
		return nil
	})
	// Stay cut until every volume with one replica in the group has lost
	// it (out of the in-sync set): the heal then brings back replicas that
	// must catch up, and former primaries that need a whole copy.
	c.poll("every affected volume lost its replica in the group", 60*time.Second, func() error {
		vs, err := c.volumes()
		if err != nil {
			return err
		}
		for _, v := range vs {
			in, lost := 0, 0
			for _, m := range v.Members {
				if slices.Contains(group, string(m.Node)) {
					in++
					if !m.InSync {
						lost++
					}
				}
			}
			if in == 1 && lost == 0 {
				return fmt.Errorf("%s: its replica in the group is still in sync (%s: %s)", v.Name, v.State, v.Reason)
			}
		}
		return nil
	})
	for _, id := range group {
		c.tb.run("heal", id, "pri")
		c.tb.run("heal", id, "rep")
	}
	healAt := time.Since(agentStart).Seconds()
	var final []coordapi.Volume
	c.poll("every volume back to full redundancy", 240*time.Second, func() error {
		vs, err := c.volumes()
		if err != nil {
			return err
		}
		for _, v := range vs {
			if v.State != coordapi.StateOK || len(v.InSync()) != 2 {
				return fmt.Errorf("%s: %s: %s", v.Name, v.State, v.Reason)
			}
		}
		final = vs
		return nil
	})
	fullAt := time.Since(agentStart).Seconds()
	if err := os.WriteFile(stop, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-agent.done:
		if err != nil {
			t.Fatalf("agent: %v\n%s", err, tail(agent.out.String(), 40))
		}
	case <-time.After(60 * time.Second):
		t.Fatal("agent did not stop within 60s")
	}

	// What the agent saw.
	samples, writes, conns := readAgent(t, out)
	var peakRemirrors, peakImpaired int
	sawImpaired := map[string]bool{}
	var refused int64
	for _, s := range samples {
		peakRemirrors = max(peakRemirrors, s.Remirrors)
		peakImpaired = max(peakImpaired, len(s.Impaired))
		for _, v := range s.Impaired {
			sawImpaired[v] = true
		}
		if s.Remirrors > maxRemirrors {
			t.Errorf("t=%.1fs: %d re-mirrors at once, the limit is %d", s.T, s.Remirrors, maxRemirrors)
		}
		for n, k := range s.PerNode {
			if k > perNode {
				t.Errorf("t=%.1fs: node %s in %d re-mirrors at once, the per-node limit is %d", s.T, n, k, perNode)
			}
		}
		if len(s.ReserveHit) > 0 {
			t.Errorf("t=%.1fs: free space below the reserve on %v", s.T, s.ReserveHit)
		}
		refused = max(refused, s.Refused)
	}
	if len(samples) < 10 {
		t.Fatalf("the agent took only %d samples", len(samples))
	}
	if len(sawImpaired) == 0 {
		t.Errorf("no volume ever showed impaired while a group of nodes holding %d volumes was cut off", affected)
	}
	// Retries stay bounded: a storm would ask again and again.
	if limit := int64(volumes * 40); refused > limit {
		t.Errorf("%d slot requests refused: retries are not backing off (bound %d)", refused, limit)
	}
	cl, err := c.cluster()
	if err != nil {
		t.Fatal(err)
	}
	acked := 0
	for _, w := range writes {
		if w.Acked {
			acked++
		}
	}
	t.Logf("2011 scenario: %d volumes, %d affected (replicas on %v); cut at %.1fs, healed at %.1fs, full redundancy at %.1fs (%.1fs after the heal)",
		volumes, affected, group, cutAt, healAt, fullAt, fullAt-healAt)
	t.Logf("peak concurrent re-mirrors %d (limit %d, %d per node); peak impaired %d of %d volumes (%.0f%%); %d volumes were impaired at some point",
		peakRemirrors, maxRemirrors, perNode, peakImpaired, volumes, 100*float64(peakImpaired)/volumes, len(sawImpaired))
	t.Logf("bytes copied: catch-up %d, full re-mirror %d; slots granted %d, refused %d; %d replacements placed; %d rejoins; writer reconnects %d; %d writes, %d acknowledged",
		cl.CopiedCatchUp, cl.CopiedRemirror, cl.SlotsGranted, cl.SlotsRefused, cl.Placed, cl.Rejoins, conns, len(writes), acked)

	// Every acknowledged write is there, on every replica.
	verify := startAgent(t, c, "verify", out, "", names)
	select {
	case err := <-verify.done:
		if err != nil {
			t.Fatalf("verify: %v\n%s", err, tail(verify.out.String(), 40))
		}
	case <-time.After(120 * time.Second):
		t.Fatal("verify did not finish within 120s")
	}
	t.Logf("verify: %s", strings.TrimSpace(tail(verify.out.String(), 3)))
	c.stopNodes()
	for _, v := range final {
		sums := c.replicaSums(v)
		var first string
		for _, s := range sums {
			if first == "" {
				first = s
			} else if s != first {
				t.Errorf("%s: replicas differ: %v", v.Name, sums)
			}
		}
	}
}

func startAgent(t *testing.T, c *netnsCluster, mode, out, stop string, vols []string) *proc {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{name: "agent-" + mode, out: &lockedBuffer{}, done: make(chan error, 1)}
	p.cmd = c.tb.cmd("exec", "cl", self, "-test.run", "^TestNetnsAgent$", "-test.v")
	p.cmd.Env = append(os.Environ(), "KEEL_AGENT="+mode, "KEEL_AGENT_OUT="+out, "KEEL_AGENT_STOP="+stop,
		"KEEL_AGENT_VOLUMES="+strings.Join(vols, ","))
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

func readAgent(t *testing.T, path string) (samples []stormSample, writes []agentWrite, conns int) {
	t.Helper()
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, 0 // the agent has not started yet
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l agentLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			continue // a line being written
		}
		switch {
		case l.Sample != nil:
			samples = append(samples, *l.Sample)
		case l.Write != nil:
			writes = append(writes, *l.Write)
		default:
			conns += l.Conns
		}
	}
	return samples, writes, conns
}

func countAcked(t *testing.T, path string) int {
	_, writes, _ := readAgent(t, path)
	n := 0
	for _, w := range writes {
		if w.Acked {
			n++
		}
	}
	return n
}

// TestNetnsAgent is not a test: it is the load and observation process the
// netns tests run inside the client namespace (KEEL_AGENT=load|verify).
func TestNetnsAgent(t *testing.T) {
	mode := os.Getenv("KEEL_AGENT")
	if mode == "" {
		t.Skip("the netns tests' agent: runs only when they start it")
	}
	cl, err := coordclient.New(coordclient.Config{URLs: []string{netnsCoordURL}, AttemptTimeout: 3 * time.Second, Attempts: 3,
		Backoff: coordclient.Backoff{Base: 100 * time.Millisecond, Max: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	vols := strings.Split(os.Getenv("KEEL_AGENT_VOLUMES"), ",")
	switch mode {
	case "load":
		agentLoad(t, cl, vols, os.Getenv("KEEL_AGENT_OUT"), os.Getenv("KEEL_AGENT_STOP"))
	case "verify":
		agentVerify(t, cl, vols, os.Getenv("KEEL_AGENT_OUT"))
	default:
		t.Fatalf("KEEL_AGENT=%q: want load or verify", mode)
	}
}

// nbdConn is a minimal NBD client: one request at a time.
type nbdConn struct {
	c    net.Conn
	size uint64
	hdr  [nbdproto.RequestSize]byte
	rep  [nbdproto.SimpleReplySize]byte
	seq  uint64
}

// dialPrimary connects to vol's current primary.
func dialPrimary(ctx context.Context, cl *coordclient.Client, vol string) (*nbdConn, error) {
	v, err := cl.Volume(ctx, vol)
	if err != nil {
		return nil, err
	}
	if v.Primary == "" {
		return nil, fmt.Errorf("%s has no primary: %s", vol, v.Reason)
	}
	addr := "10.201.1." + strings.TrimPrefix(string(v.Primary), "n") + ":10809"
	d := net.Dialer{Timeout: 2 * time.Second}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	ex, err := nbdkernel.Handshake(c, vol)
	if err != nil {
		c.Close()
		return nil, err
	}
	return &nbdConn{c: c, size: ex.Size}, nil
}

// do sends one request (with payload for a write) and reads its simple
// reply (into buf for a read) within d.
func (n *nbdConn) do(cmd nbdproto.Cmd, off uint64, buf []byte, d time.Duration) error {
	n.seq++
	n.c.SetDeadline(time.Now().Add(d))
	nbdproto.Request{Type: cmd, Handle: n.seq, Offset: off, Length: uint32(len(buf))}.Encode(&n.hdr)
	msg := n.hdr[:]
	if cmd == nbdproto.CmdWrite {
		msg = append(slices.Clip(msg), buf...)
	}
	if _, err := n.c.Write(msg); err != nil {
		return err
	}
	if _, err := io.ReadFull(n.c, n.rep[:]); err != nil {
		return err
	}
	r, err := nbdproto.DecodeSimpleReply(n.rep[:])
	if err != nil {
		return err
	}
	if r.Handle != n.seq {
		return fmt.Errorf("reply for handle %d, want %d", r.Handle, n.seq)
	}
	if r.Errno != 0 {
		return fmt.Errorf("server error %v", r.Errno)
	}
	if cmd == nbdproto.CmdRead {
		_, err = io.ReadFull(n.c, buf)
	}
	return err
}

func slotBlock(vol string, slot int, seq uint64) []byte {
	b := make([]byte, 4096)
	binary.LittleEndian.PutUint64(b[0:], seq)
	binary.LittleEndian.PutUint64(b[8:], uint64(slot))
	copy(b[16:], vol)
	for i := 64; i < len(b); i++ {
		b[i] = byte(seq) ^ byte(i)
	}
	return b
}

// agentLoad writes to every volume (one writer each, one write at a time,
// paced) and samples the coordinator every 250 ms, until the stop file
// appears or 10 minutes pass.
func agentLoad(t *testing.T, cl *coordclient.Client, vols []string, out, stop string) {
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var mu sync.Mutex
	emit := func(l agentLine) {
		b, _ := json.Marshal(l)
		mu.Lock()
		f.Write(append(b, '\n'))
		mu.Unlock()
	}
	end := time.Now().Add(10 * time.Minute)
	stopped := func() bool {
		_, err := os.Stat(stop)
		return err == nil || time.Now().After(end)
	}
	start := time.Now()
	var wg sync.WaitGroup
	var connects sync.Map
	for vi, vol := range vols {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(vi), 2011))
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			var conn *nbdConn
			n := 0
			for seq := uint64(1); !stopped(); seq++ {
				<-tick.C
				if conn == nil {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					c, err := dialPrimary(ctx, cl, vol)
					cancel()
					if err != nil {
						continue
					}
					conn, n = c, n+1
				}
				slot := rng.IntN(agentSlots)
				emit(agentLine{Write: &agentWrite{Vol: vol, Slot: slot, Seq: seq}})
				err := conn.do(nbdproto.CmdWrite, uint64(slot)*4096, slotBlock(vol, slot, seq), 15*time.Second)
				if err != nil {
					conn.c.Close()
					conn = nil
					continue
				}
				emit(agentLine{Write: &agentWrite{Vol: vol, Slot: slot, Seq: seq, Acked: true}})
			}
			if conn != nil {
				conn.c.Close()
			}
			connects.Store(vol, n)
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for !stopped() {
			<-tick.C
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			s, err := sample(ctx, cl)
			cancel()
			if err != nil {
				continue
			}
			s.T = time.Since(start).Seconds()
			emit(agentLine{Sample: s})
		}
	}()
	wg.Wait()
	total := 0
	connects.Range(func(_, v any) bool { total += v.(int); return true })
	emit(agentLine{Conns: total})
}

func sample(ctx context.Context, cl *coordclient.Client) (*stormSample, error) {
	c, err := cl.Cluster(ctx)
	if err != nil {
		return nil, err
	}
	vs, err := cl.Volumes(ctx, false)
	if err != nil {
		return nil, err
	}
	ns, err := cl.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	s := &stormSample{Mode: c.Mode, Remirrors: c.Remirrors, CatchUps: c.CatchUps, PerNode: map[string]int{},
		Volumes: len(vs), Refused: c.SlotsRefused, Granted: c.SlotsGranted}
	for _, v := range vs {
		if v.State == coordapi.StateImpaired {
			s.Impaired = append(s.Impaired, v.Name)
		}
		if v.State != coordapi.StateOK {
			s.NotOK = append(s.NotOK, v.Name)
		}
		for _, m := range v.Members {
			if m.Sync != nil && m.Sync.Kind == coordapi.SyncRemirror {
				s.PerNode[string(m.Node)]++
				s.PerNode[string(v.Primary)]++
			}
		}
	}
	for _, n := range ns {
		if n.State == coordapi.NodeUp && n.Free < n.Reserve {
			s.ReserveHit = append(s.ReserveHit, fmt.Sprintf("%s (free %d < reserve %d)", n.ID, n.Free, n.Reserve))
		}
	}
	return s, nil
}

// agentVerify reads every slot any write touched from each volume's
// primary and checks it holds the last acknowledged write to it, or a
// later one that was sent (an unacknowledged write may land).
func agentVerify(t *testing.T, cl *coordclient.Client, vols []string, out string) {
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	type key struct {
		vol  string
		slot int
	}
	lastAcked := map[key]uint64{}
	sent := map[key]map[uint64]bool{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l agentLine
		if json.Unmarshal(sc.Bytes(), &l) != nil || l.Write == nil {
			continue
		}
		k := key{l.Write.Vol, l.Write.Slot}
		if sent[k] == nil {
			sent[k] = map[uint64]bool{}
		}
		sent[k][l.Write.Seq] = true
		if l.Write.Acked {
			lastAcked[k] = max(lastAcked[k], l.Write.Seq)
		}
	}
	f.Close()
	checked, bad := 0, 0
	buf := make([]byte, 4096)
	for _, vol := range vols {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		conn, err := dialPrimary(ctx, cl, vol)
		cancel()
		if err != nil {
			t.Fatalf("%s: %v", vol, err)
		}
		for slot := range agentSlots {
			k := key{vol, slot}
			if len(sent[k]) == 0 {
				continue
			}
			if err := conn.do(nbdproto.CmdRead, uint64(slot)*4096, buf, 15*time.Second); err != nil {
				t.Fatalf("%s slot %d: read: %v", vol, slot, err)
			}
			seq := binary.LittleEndian.Uint64(buf)
			checked++
			switch {
			case seq == 0 && lastAcked[k] == 0:
			case seq != lastAcked[k] && !(seq > lastAcked[k] && sent[k][seq]):
				bad++
				t.Errorf("%s slot %d holds write %d; the last acknowledged is %d", vol, slot, seq, lastAcked[k])
			case !bytes.Equal(buf, slotBlock(vol, slot, seq)):
				bad++
				t.Errorf("%s slot %d: write %d's block is corrupt", vol, slot, seq)
			}
		}
		conn.c.Close()
	}
	fmt.Printf("verified %d slots, %d bad\n", checked, bad)
}

//go:build linux

package node_test

// A cluster of real processes — `keel coord` and `keel node`, the binaries
// operators run — driven by fio's nbd engine: the failover test kills the
// primary's process with SIGKILL.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
	"keel/netpath/nbdkernel"
	"keel/node"
)

// proc is one child process of the test, its output kept for failures.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *lockedBuffer
	done chan error
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startProc starts argv (argv[0] a program) with output captured; t's
// cleanup kills it if it still runs.
func startProc(t *testing.T, name string, argv ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(argv[0], argv[1:]...), out: &lockedBuffer{}, done: make(chan error, 1)}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.WaitDelay = 5 * time.Second
	// Should the test binary die (a timeout), its children die with it.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(20 * time.Second):
				p.cmd.Process.Kill()
				<-p.done
			}
		}
		if t.Failed() {
			t.Logf("--- output of %s:\n%s", p.name, tail(p.out.String(), 60))
		}
	})
	return p
}

func tail(s string, lines int) string {
	ls := strings.Split(s, "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}

// procCluster is a coordinator and nodes as child processes on loopback.
type procCluster struct {
	t      *testing.T
	dir    string
	url    string
	client *coordclient.Client
	nodes  map[coordapi.NodeID]*proc
}

func startProcCluster(t *testing.T, nodes int) *procCluster {
	t.Helper()
	bin := keelBin(t)
	dir := filepath.Dir(volFile(t))
	api := freePort(t)
	c := &procCluster{t: t, dir: dir, url: "http://" + api, nodes: map[coordapi.NodeID]*proc{}}
	startProc(t, "coord", bin, "coord", "--id", "c1", "--data-dir", filepath.Join(dir, "coord"),
		"--listen", api, "--raft-addr", freePort(t),
		"--lease", "2s", "--heartbeat-interval", "400ms", "--lease-margin", "200ms", "--reserve", "0")
	cl, err := coordclient.New(coordclient.Config{URLs: []string{c.url}, AttemptTimeout: 5 * time.Second, Attempts: 30,
		Backoff: coordclient.Backoff{Base: 50 * time.Millisecond, Max: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	c.client = cl
	for i := 1; i <= nodes; i++ {
		id := coordapi.NodeID(fmt.Sprintf("n%d", i))
		c.nodes[id] = startProc(t, string(id), bin, "node", "--id", string(id), "--zone", "z"+string(id),
			"--data-dir", filepath.Join(dir, string(id)), "--coord", c.url,
			"--primary-listen", "127.0.0.1:0", "--repl-listen", "127.0.0.1:0",
			"--repl-timeout", "2s", "--peer-wait", "2s", "--capacity", "4G")
	}
	c.poll("every node up", 60*time.Second, func(ctx context.Context) error {
		ns, err := c.client.Nodes(ctx)
		if err != nil {
			return err
		}
		up := 0
		for _, n := range ns {
			if n.State == coordapi.NodeUp {
				up++
			}
		}
		if up != nodes {
			return fmt.Errorf("%d of %d nodes up", up, nodes)
		}
		return nil
	})
	return c
}

// poll retries cond until it holds: the cluster is other processes, so
// polling with a deadline is the only way to wait for it.
func (c *procCluster) poll(what string, within time.Duration, cond func(ctx context.Context) error) {
	c.t.Helper()
	deadline := time.Now().Add(within)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := cond(ctx)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s: not within %v: %v", what, within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ready waits until vol has a primary at an epoch above after, every
// in-sync member reported it and the primary serves the export; it returns
// the volume and the primary's NBD address.
func (c *procCluster) ready(vol string, after coordapi.Epoch) (coordapi.Volume, string) {
	c.t.Helper()
	var v *coordapi.Volume
	var addr string
	c.poll("volume "+vol+" served", 60*time.Second, func(ctx context.Context) error {
		var err error
		if v, err = c.client.Volume(ctx, vol); err != nil {
			return err
		}
		if v.Primary == "" || v.Epoch <= after {
			return fmt.Errorf("epoch %d primary %q: %s: %s", v.Epoch, v.Primary, v.State, v.Reason)
		}
		for _, m := range v.Members {
			if m.InSync && m.ReportedEpoch != v.Epoch {
				return fmt.Errorf("member %s reported epoch %d of %d", m.Node, m.ReportedEpoch, v.Epoch)
			}
		}
		ns, err := c.client.Nodes(ctx)
		if err != nil {
			return err
		}
		for _, n := range ns {
			if n.ID == v.Primary {
				addr = n.PrimaryAddr
			}
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = nbdkernel.Handshake(conn, vol)
		return err
	})
	return *v, addr
}

type fioResult struct {
	Jobs []struct {
		Error int `json:"error"`
		Write struct {
			IOBytes int64 `json:"io_bytes"`
		} `json:"write"`
		Read struct {
			IOBytes int64 `json:"io_bytes"`
		} `json:"read"`
	} `json:"jobs"`
}

func runFio(t *testing.T, args ...string) fioResult {
	t.Helper()
	out := run(t, "fio", append(args, "--output-format=json")...)
	if i := strings.Index(out, "{"); i >= 0 {
		out = out[i:]
	}
	var res fioResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("fio json: %v\n%s", err, out)
	}
	if len(res.Jobs) == 0 || res.Jobs[0].Error != 0 {
		t.Fatalf("fio failed: %s", out)
	}
	return res
}

// TestFailoverFioVerify: fio writes through the primary (each block with a
// checksum header); the primary's process is killed with SIGKILL right
// after the last write was acknowledged; once the coordinator has promoted
// a secondary, fio's verify pass against the new primary finds every
// block.
func TestFailoverFioVerify(t *testing.T) {
	need(t, "fio")
	c := startProcCluster(t, 3)
	const size = 24 << 20
	if _, err := c.client.CreateVolume(context.Background(), coordapi.CreateVolumeRequest{Name: "fo", Size: 64 << 20, Replicas: 3}); err != nil {
		t.Fatal(err)
	}
	v, addr := c.ready("fo", 0)
	// Region 0 is written by fio completely before the kill. Then writers
	// (this test's NBD client, which knows exactly which writes were
	// acknowledged) fill region 1 with distinct 4 KiB blocks, several
	// connections at queue depth 8 each, while the primary is killed.
	job := []string{"--name=fo", "--ioengine=nbd", "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=16",
		fmt.Sprintf("--size=%d", size), "--verify=crc32c", "--randrepeat=1", "--verify_fatal=1"}
	res := runFio(t, append(job, "--uri=nbd://"+addr+"/fo", "--do_verify=0")...)
	if res.Jobs[0].Write.IOBytes < size {
		t.Fatalf("fio wrote %d bytes of %d", res.Jobs[0].Write.IOBytes, size)
	}
	acked := make(chan int64, size/4096)
	var writers sync.WaitGroup
	const conns, depth, before = 4, 8, 1000
	var count atomic.Int64
	enough := make(chan struct{}) // closed at the before-th acknowledgement
	for ci := range conns {
		cl, err := node.DialTestNBD(context.Background(), addr, "fo")
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		for d := range depth {
			writers.Add(1)
			go func() {
				defer writers.Done()
				buf := make([]byte, 4096)
				for blk := int64(ci*depth + d); blk < size/4096; blk += conns * depth {
					off := size + blk*4096
					fillBlock(buf, off)
					if err := cl.Write(buf, off, false); err != nil {
						break // the primary is gone
					}
					acked <- off
					if count.Add(1) == before {
						close(enough)
					}
				}
			}()
		}
	}
	select {
	case <-enough:
	case <-time.After(60 * time.Second):
		t.Fatalf("only %d writes acknowledged in 60s", count.Load())
	}
	old := c.nodes[v.Primary]
	if err := old.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-old.done
	killed := time.Now()
	writers.Wait()
	close(acked)
	nv, naddr := c.ready("fo", v.Epoch)
	t.Logf("primary %s killed; %s promoted at epoch %d (was %d) after %v", v.Primary, nv.Primary, nv.Epoch, v.Epoch, time.Since(killed).Round(time.Millisecond))
	if nv.Primary == v.Primary {
		t.Fatalf("the killed node %s is still primary", v.Primary)
	}
	res = runFio(t, append(job, "--uri=nbd://"+naddr+"/fo", "--verify_only")...)
	if res.Jobs[0].Read.IOBytes < size {
		t.Fatalf("verify pass read %d bytes of %d", res.Jobs[0].Read.IOBytes, size)
	}
	cl, err := node.DialTestNBD(context.Background(), naddr, "fo")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	n, want, got := 0, make([]byte, 4096), make([]byte, 4096)
	for off := range acked {
		fillBlock(want, off)
		if err := cl.Read(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("block at %d was acknowledged before the kill but the new primary does not hold it", off)
		}
		n++
	}
	t.Logf("%d blocks acknowledged by the old primary while it was killed: all on the new one", n)
	// And the new primary takes writes with the remaining replica.
	runFio(t, "--name=after", "--ioengine=nbd", "--uri=nbd://"+naddr+"/fo", "--rw=write", "--bs=64k",
		"--size=8M", "--verify=crc32c", "--do_verify=1")
	if os.Getenv("KEEL_TEST_KEEP") != "" {
		t.Logf("data in %s", c.dir)
	}
}

// fillBlock fills a 4 KiB block with a pattern that names its offset.
func fillBlock(b []byte, off int64) {
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], uint64(off)^uint64(i)*0x9e3779b97f4a7c15)
	}
}

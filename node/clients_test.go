package node_test

// Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio) against a
// running `keel serve`, the binary users run. These need the Debian
// packages `make deps` installs; a missing client fails the test (CI must
// have them) unless KEEL_ALLOW_MISSING_CLIENTS=1.

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// keelBin returns the keel binary under test: $KEEL_BIN (make test sets it)
// or one built into a temporary directory.
func keelBin(t *testing.T) string {
	t.Helper()
	if b := os.Getenv("KEEL_BIN"); b != "" {
		return b
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "keel-bin-")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "keel")
		out, err := exec.Command("go", "build", "-o", builtBin, "keel").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("KEEL_ALLOW_MISSING_CLIENTS") == "1" {
				t.Skipf("%s not installed (make deps installs it)", tool)
			}
			t.Fatalf("%s not installed: run `make deps` (KEEL_ALLOW_MISSING_CLIENTS=1 skips instead)", tool)
		}
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// server is one running `keel serve`.
type server struct {
	t       *testing.T
	cmd     *exec.Cmd
	addr    string
	metrics string
	file    string
	stderr  *bytes.Buffer
	done    chan error
}

// waitConnect polls a TCP connect until it succeeds or the deadline passes:
// the server is an external process, so there is no channel to wait on.
func waitConnect(t *testing.T, addr string, done <-chan error, stderr *bytes.Buffer) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		select {
		case err := <-done:
			t.Fatalf("keel serve exited before listening: %v\n%s", err, stderr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("keel serve not listening on %s after 30s\n%s", addr, stderr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func startServe(t *testing.T, file, size string, extra ...string) *server {
	t.Helper()
	s := &server{t: t, addr: freePort(t), metrics: freePort(t), file: file, stderr: &bytes.Buffer{}, done: make(chan error, 1)}
	args := []string{"serve", "--file", file, "--listen", s.addr, "--name", "vol", "--metrics", s.metrics}
	if size != "" {
		args = append(args, "--size", size)
	}
	args = append(args, extra...)
	s.cmd = exec.Command(keelBin(t), args...)
	s.cmd.Stderr = s.stderr
	s.cmd.Stdout = s.stderr
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	t.Cleanup(func() {
		if s.cmd.ProcessState == nil {
			s.cmd.Process.Kill()
			<-s.done
		}
	})
	waitConnect(t, s.addr, s.done, s.stderr)
	return s
}

// stop sends SIGTERM and waits for a clean exit.
func (s *server) stop() {
	s.t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.done:
		if err != nil {
			s.t.Fatalf("keel serve exited with %v after SIGTERM\n%s", err, s.stderr)
		}
	case <-time.After(60 * time.Second):
		s.t.Fatalf("keel serve did not stop within 60s of SIGTERM\n%s", s.stderr)
	}
}

func (s *server) uri() string { return "nbd://" + s.addr + "/vol" }

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = t.TempDir() // fio writes verify state files into its working directory
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func volFile(t *testing.T) string {
	// The work disk (ext4, O_DIRECT with real alignment checks), never tmpfs.
	dir, err := os.MkdirTemp(workDir(), "keel-clients-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "v.vol")
}

func workDir() string {
	if d := os.Getenv("KEEL_TEST_DIR"); d != "" {
		return d
	}
	return os.TempDir()
}

func TestQemuImgInfo(t *testing.T) {
	need(t, "qemu-img")
	s := startServe(t, volFile(t), "64M")
	out := run(t, "qemu-img", "info", "--output=json", s.uri())
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	if info.VirtualSize != 64<<20 {
		t.Fatalf("qemu-img sees %d bytes, want %d", info.VirtualSize, 64<<20)
	}
	s.stop()
}

func TestQemuIOPatterns(t *testing.T) {
	need(t, "qemu-io")
	s := startServe(t, volFile(t), "64M")
	// Aligned and unaligned offsets and lengths; unaligned neighbours share
	// 4 KiB blocks with each other, so read-modify-write must keep both.
	cases := []struct {
		off, n int64
		pat    int
	}{
		{0, 4096, 0x11}, {4096, 65536, 0x22}, {70145, 1000, 0x44},
		{73727, 2, 0x55}, {100000, 33333, 0x88}, {1 << 20, 1 << 20, 0x33},
		{3 << 20, 4 << 20, 0x66}, {(64 << 20) - 512, 512, 0x77},
	}
	for _, c := range cases {
		run(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P 0x%x %d %d", c.pat, c.off, c.n), s.uri())
	}
	for _, c := range cases {
		out := run(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("read -P 0x%x %d %d", c.pat, c.off, c.n), s.uri())
		if strings.Contains(out, "Pattern verification failed") {
			t.Fatalf("pattern 0x%x at %d+%d: %s", c.pat, c.off, c.n, out)
		}
	}
	// Zeroes (write -z) and discard read back as zeroes.
	run(t, "qemu-io", "-f", "raw", "-c", "write -z 4096 65536", s.uri())
	out := run(t, "qemu-io", "-f", "raw", "-c", "read -P 0 4096 65536", s.uri())
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("write -z did not read back zeroes: %s", out)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "discard 1M 1M", s.uri())
	s.stop()
	// Data survives a clean restart.
	s = startServe(t, s.file, "64M")
	out = run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x66 3M 4M", "-c", "read -P 0x44 70145 1000", s.uri())
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("after restart: %s", out)
	}
	s.stop()
}

func TestNbdinfo(t *testing.T) {
	need(t, "nbdinfo", "qemu-io")
	s := startServe(t, volFile(t), "64M")
	out := run(t, "nbdinfo", "--json", s.uri())
	var info struct {
		Exports []struct {
			Name         string `json:"export-name"`
			Size         int64  `json:"export-size"`
			Preferred    int64  `json:"block_size_preferred"`
			Maximum      int64  `json:"block_size_maximum"`
			CanMultiConn bool   `json:"can_multi_conn"`
			CanFlush     bool   `json:"can_flush"`
			CanFUA       bool   `json:"can_fua"`
			CanTrim      bool   `json:"can_trim"`
			CanZero      bool   `json:"can_zero"`
			CanFastZero  bool   `json:"can_fast_zero"`
			CanCache     bool   `json:"can_cache"`
			ReadOnly     bool   `json:"is_read_only"`
			CanDF        bool   `json:"can_df"`
			Contexts     []string
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %d exports\n%s", len(info.Exports), out)
	}
	e := info.Exports[0]
	if e.Size != 64<<20 || e.Preferred != 4096 || e.Maximum != 32<<20 {
		t.Fatalf("nbdinfo: size %d preferred %d maximum %d\n%s", e.Size, e.Preferred, e.Maximum, out)
	}
	if !e.CanMultiConn || !e.CanFlush || !e.CanFUA || !e.CanTrim || !e.CanZero || !e.CanCache || e.ReadOnly {
		t.Fatalf("nbdinfo: flags wrong\n%s", out)
	}
	// --map: written data is data, trimmed data is a hole.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 8M", s.uri())
	run(t, "qemu-io", "-f", "raw", "-c", "discard 2M 2M", s.uri())
	m := run(t, "nbdinfo", "--map", "--json", s.uri())
	var extents []struct {
		Offset int64 `json:"offset"`
		Length int64 `json:"length"`
		Type   int   `json:"type"`
	}
	if err := json.Unmarshal([]byte(m), &extents); err != nil {
		t.Fatalf("nbdinfo --map: %v\n%s", err, m)
	}
	typeAt := func(off int64) int {
		for _, x := range extents {
			if off >= x.Offset && off < x.Offset+x.Length {
				return x.Type
			}
		}
		t.Fatalf("offset %d not in map %s", off, m)
		return -1
	}
	if ty := typeAt(1 << 20); ty != 0 {
		t.Errorf("written region at 1M has type %d, want 0 (data)\n%s", ty, m)
	}
	if ty := typeAt(3 << 20); ty&1 == 0 {
		t.Errorf("trimmed region at 3M has type %d, want a hole\n%s", ty, m)
	}
	if ty := typeAt(5 << 20); ty != 0 {
		t.Errorf("written region at 5M has type %d, want 0 (data)\n%s", ty, m)
	}
	s.stop()
}

func sha(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func TestNbdcopyRoundTrip(t *testing.T) {
	need(t, "nbdcopy")
	const size = 48 << 20
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	buf := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range buf {
		buf[i] = byte(r.Uint32())
	}
	// a zero stretch in the middle so nbdcopy exercises zeroing too
	clear(buf[8<<20 : 12<<20])
	if err := os.WriteFile(src, buf, 0o600); err != nil {
		t.Fatal(err)
	}
	s := startServe(t, volFile(t), "48M")
	run(t, "nbdcopy", "--connections=4", src, s.uri())
	dst := filepath.Join(dir, "dst.img")
	run(t, "nbdcopy", s.uri(), dst)
	if a, b := sha(t, src), sha(t, dst); a != b {
		t.Fatalf("nbdcopy round trip: sha256 %s in, %s out", a, b)
	}
	s.stop()
}

func TestFioVerifyMultiConn(t *testing.T) {
	need(t, "fio")
	s := startServe(t, volFile(t), "128M")
	// 4 jobs = 4 connections, each writing its own quarter with verify.
	out := run(t, "fio", "--name=verify", "--ioengine=nbd", "--uri="+s.uri(),
		"--rw=randwrite", "--bs=4k", "--bsrange=4k-64k", "--iodepth=16", "--numjobs=4",
		"--size=32M", "--offset_increment=32M", "--verify=crc32c", "--verify_fatal=1",
		"--do_verify=1", "--group_reporting", "--output-format=json")
	var res struct {
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
	if i := strings.Index(out, "{"); i >= 0 {
		out = out[i:]
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("fio json: %v\n%s", err, out)
	}
	if len(res.Jobs) == 0 || res.Jobs[0].Error != 0 || res.Jobs[0].Write.IOBytes < 4*32<<20 || res.Jobs[0].Read.IOBytes < 4*32<<20 {
		t.Fatalf("fio verify: %+v", res.Jobs)
	}
	// The metrics endpoint counted the traffic.
	resp, err := http.Get("http://" + s.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "keel_nbd_") {
		t.Fatalf("metrics endpoint has no keel_nbd_ series:\n%.2000s", body)
	}
	s.stop()
}

func TestServeRefusesSizeMismatch(t *testing.T) {
	file := volFile(t)
	s := startServe(t, file, "64M")
	s.stop()
	out, err := exec.Command(keelBin(t), "serve", "--file", file, "--size", "128M", "--listen", freePort(t)).CombinedOutput()
	if err == nil {
		t.Fatalf("serve with a different size succeeded:\n%s", out)
	}
	if !strings.Contains(string(out), "64 MiB") || !strings.Contains(string(out), "128 MiB") {
		t.Fatalf("size mismatch message does not name both sizes:\n%s", out)
	}
}

func TestServeBadFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"serve", "--size", "1G", "--listen", "127.0.0.1:0"}, "--file is required"},
		{[]string{"serve", "--file", "/tmp/x", "--size", "1G"}, "--listen or --unix is required"},
		{[]string{"serve", "--file", "/tmp/x", "--size", "lots", "--listen", "127.0.0.1:0"}, "--size"},
	} {
		out, err := exec.Command(keelBin(t), c.args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("keel %v: err %v, output %q; want an error containing %q", c.args, err, out, c.want)
		}
	}
}

func TestServeReadOnlyAndUnixSocket(t *testing.T) {
	need(t, "qemu-io", "nbdinfo")
	file := volFile(t)
	s := startServe(t, file, "16M")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", s.uri())
	s.stop()

	sock := filepath.Join(t.TempDir(), "nbd.sock")
	s = startServe(t, file, "", "--read-only", "--unix", sock)
	out := run(t, "nbdinfo", "--json", "nbd+unix:///vol?socket="+sock)
	if !strings.Contains(out, `"is_read_only": true`) {
		t.Fatalf("read-only export not advertised read-only over the Unix socket:\n%s", out)
	}
	out = run(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", "nbd+unix:///vol?socket="+sock)
	if strings.Contains(out, "verification failed") {
		t.Fatalf("read over the Unix socket: %s", out)
	}
	// A write is refused (qemu-io opens read-write only to be told no).
	wout, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", s.uri()).CombinedOutput()
	if err == nil && !strings.Contains(string(wout), "ermission") && !strings.Contains(string(wout), "read-only") && !strings.Contains(string(wout), "read only") {
		t.Fatalf("write to a read-only export was not refused:\n%s", wout)
	}
	s.stop()
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("unix socket %s left behind after stop: %v", sock, err)
	}
}

// TestSigtermFinishesInFlight: SIGTERM while fio writes: the server exits
// 0 after in-flight requests finish, the volume is marked clean, and every
// write fio completed reads back (verified by a second fio pass).
func TestSigtermFinishesInFlight(t *testing.T) {
	need(t, "fio")
	file := volFile(t)
	s := startServe(t, file, "64M")
	fio := exec.Command("fio", "--name=w", "--ioengine=nbd", "--uri="+s.uri(), "--rw=write",
		"--bs=64k", "--iodepth=16", "--size=64M", "--loops=1000", "--time_based", "--runtime=30s")
	var fout bytes.Buffer
	fio.Stdout, fio.Stderr = &fout, &fout
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	defer fio.Process.Kill()
	// Wait until the server has data in flight: its metrics count writes.
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + s.metrics + "/metrics")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.Contains(string(body), `keel_nbd_written_bytes_total{export="vol"}`) && !strings.Contains(string(body), `keel_nbd_written_bytes_total{export="vol"} 0`) {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no writes reached the server in 30s; fio: %s", fout.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.stop() // fails the test unless keel exits 0
	fio.Wait()
	if !strings.Contains(s.stderr.String(), "marked clean") {
		t.Fatalf("keel did not report a clean stop:\n%s", s.stderr)
	}
	// Restart: the superblock says the last shutdown was clean.
	s = startServe(t, file, "64M")
	s.stop()
	if !strings.Contains(s.stderr.String(), "last_shutdown_clean=true") {
		t.Fatalf("volume not clean after SIGTERM:\n%s", s.stderr)
	}
}

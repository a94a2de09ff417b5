package fio

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Environment is where and how a report was measured.
type Environment struct {
	Date       time.Time `json:"date"`
	Command    []string  `json:"command"`
	FioVersion string    `json:"fio_version"`
	Kernel     string    `json:"kernel"`
	CPUModel   string    `json:"cpu_model"`
	CPUs       int       `json:"cpus"`
	MemTotal   int64     `json:"mem_total_bytes"`
	GoVersion  string    `json:"go_version"`
	// Commit is `git describe --always --dirty` of the working directory,
	// when it is a git tree (keel's, when run with `make bench`).
	Commit string `json:"commit,omitempty"`
	Disk   Disk   `json:"disk"`
	// Versions maps each target to what its program says its version is.
	Versions map[string]string `json:"versions,omitempty"`
}

// Disk is the device and filesystem the volume files lived on.
type Disk struct {
	Dir        string `json:"dir"`
	Device     string `json:"device"`      // mount source, e.g. /dev/vda
	DevNumber  string `json:"dev_number"`  // major:minor of the filesystem
	Filesystem string `json:"filesystem"`  // e.g. ext4
	MountPoint string `json:"mount_point"` //
	MountOpts  string `json:"mount_options"`
	Model      string `json:"model,omitempty"`      // from sysfs when known
	Rotational string `json:"rotational,omitempty"` // "0" or "1" from sysfs
}

func collectEnv(fioBin string, command []string, dir string) Environment {
	e := Environment{
		Date:      time.Now().UTC().Truncate(time.Second),
		Command:   command,
		CPUs:      runtime.NumCPU(),
		GoVersion: runtime.Version(),
		Versions:  map[string]string{},
	}
	e.FioVersion = firstLine(runQuiet(fioBin, "--version"))
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		e.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		e.CPUModel = cpuModel(b)
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if n, err := parseStatusField(b, "MemTotal"); err == nil {
			e.MemTotal = n
		}
	}
	e.Disk = diskOf(dir)
	e.Commit = firstLine(runQuiet("git", "describe", "--always", "--dirty"))
	if strings.HasPrefix(e.Commit, "fatal:") {
		e.Commit = ""
	}
	return e
}

func cpuModel(cpuinfo []byte) string {
	sc := bufio.NewScanner(bytes.NewReader(cpuinfo))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// diskOf finds the mount holding dir in /proc/self/mountinfo by device
// number, and the device's model in sysfs.
func diskOf(dir string) Disk {
	d := Disk{Dir: dir}
	var st unix.Stat_t
	if unix.Stat(dir, &st) != nil {
		return d
	}
	maj, mnr := unix.Major(st.Dev), unix.Minor(st.Dev)
	d.DevNumber = fmt.Sprintf("%d:%d", maj, mnr)
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		if m, ok := findMount(b, d.DevNumber, dir); ok {
			d.Device, d.Filesystem, d.MountPoint, d.MountOpts = m.source, m.fstype, m.point, m.opts
		}
	}
	sys := filepath.Join("/sys/dev/block", d.DevNumber)
	if b, err := os.ReadFile(filepath.Join(sys, "device", "model")); err == nil {
		d.Model = strings.TrimSpace(string(b))
	}
	// A partition's queue lives under its parent device.
	for _, q := range []string{filepath.Join(sys, "queue", "rotational"), filepath.Join(sys, "..", "queue", "rotational")} {
		if b, err := os.ReadFile(q); err == nil {
			d.Rotational = strings.TrimSpace(string(b))
			break
		}
	}
	return d
}

type mount struct{ point, fstype, source, opts string }

// findMount picks, among the mountinfo lines with device number dev, the
// one with the longest mount point that is a prefix of dir. A line is:
//
//	36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//	(1)(2)(3)   (4)   (5)         (6)      (7)       (8) (9)  (10)      (11)
func findMount(mountinfo []byte, dev, dir string) (mount, bool) {
	var best mount
	found := false
	for line := range strings.SplitSeq(string(mountinfo), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 6 || len(g) < 2 || f[2] != dev {
			continue
		}
		point := f[4]
		if !within(dir, point) || (found && len(point) <= len(best.point)) {
			continue
		}
		best = mount{point: point, fstype: g[0], source: g[1], opts: f[5]}
		found = true
	}
	return best, found
}

func within(path, dir string) bool {
	return dir == "/" || path == dir || strings.HasPrefix(path, dir+"/")
}

// checkNotTmpfs refuses a directory on tmpfs or ramfs: the files would live
// in memory, and tmpfs accepts O_DIRECT without checking anything, so the
// "raw" limit and every direct-I/O server would measure memory copies.
func checkNotTmpfs(dir string) error {
	var s unix.Statfs_t
	if err := unix.Statfs(dir, &s); err != nil {
		return fmt.Errorf("statfs %s: %w", dir, err)
	}
	switch s.Type {
	case unix.TMPFS_MAGIC, unix.RAMFS_MAGIC:
		return fmt.Errorf("%s is on tmpfs/ramfs: volume files must be on the disk under test (use --dir)", dir)
	}
	return nil
}

// programVersion asks a target's program for its version.
func programVersion(t Target, program string) string {
	if t.variant {
		return program
	}
	switch t.Name {
	case "raw":
		return ""
	case "go-nbd":
		return goNBDVersion
	case "nbd-server":
		return firstLine(runQuiet(program, "-V"))
	case "keel":
		// keel's version is the commit of the tree it was built from;
		// Environment.Commit records the tree the harness ran in.
		return program
	default:
		return firstLine(runQuiet(program, "--version"))
	}
}

// runQuiet runs a short informational command and returns its combined
// output, or "" if it fails to start or takes more than 5 s.
func runQuiet(name string, args ...string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil && len(out) == 0 {
		return ""
	}
	return string(out)
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return strings.TrimSpace(s)
}

// formatMiB renders n in MiB with one decimal.
func formatMiB(n int64) string {
	return strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64)
}

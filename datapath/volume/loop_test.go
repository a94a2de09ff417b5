package volume_test

import (
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"keel/datapath/dio"
	"keel/datapath/volume"
)

// TestLoop4K runs the model on a device with 4096-byte logical sectors — a
// loop device made with `losetup --sector-size 4096` — first raw, then
// through ext4 on it. The work disk accepts 512-byte-aligned direct I/O and
// tmpfs checks no alignment at all, so only this catches a request that is
// aligned to 512 but not to the device's real sector size.
func TestLoop4K(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a loop device with 4096-byte sectors")
	}
	for _, tool := range []string{"losetup", "mkfs.ext4", "mount", "umount", "dd"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (util-linux, e2fsprogs, coreutils): %v", tool, err)
		}
	}
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 96<<20); err != nil {
		t.Fatal(err)
	}
	dev := run("losetup", "--find", "--show", "--sector-size", "4096", img)
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v\n%s", dev, err, out)
		}
	})
	seed := testSeed(t)
	const size = 16 << 20
	ops := max(*opsFlag/2, 200)

	for _, mode := range []dio.AIOMode{dio.AIOOff, dio.AIOAlways} {
		t.Run("aio="+mode.String(), func(t *testing.T) {
			t.Run("raw", func(t *testing.T) {
				// Zero what a previous mode's volume (or ext4) left: the model
				// starts from a device that reads zeroes.
				run("dd", "if=/dev/zero", "of="+dev, "bs=1M", "count=20", "oflag=direct", "status=none")
				f, err := dio.Open(dev, false)
				if err != nil {
					t.Fatal(err)
				}
				if err := f.EnableAIO(mode, 16); err != nil {
					f.Close()
					t.Fatal(err)
				}
				if !f.IsBlockDevice() || f.OffsetAlign() != 4096 {
					f.Close()
					t.Fatalf("%s: block device %v, alignment %d; want a 4096-byte-sector block device", dev, f.IsBlockDevice(), f.OffsetAlign())
				}
				v, err := volume.OpenDevice(f, volume.Options{Create: true, Size: size, Logger: logger(t)})
				if err != nil {
					f.Close()
					t.Fatal(err)
				}
				closeAtEnd(t, v)
				if v.IOAlign() != 4096 {
					t.Errorf("IOAlign %d", v.IOAlign())
				}
				model := runModel(t, v, rand.New(rand.NewPCG(seed, 5)), ops, caps{punch: true, fastZero: true}, seed)
				if err := v.Close(); err != nil {
					t.Fatal(err)
				}
				f, err = dio.Open(dev, false)
				if err != nil {
					t.Fatal(err)
				}
				if err := f.EnableAIO(mode, 16); err != nil {
					f.Close()
					t.Fatal(err)
				}
				v, err = volume.OpenDevice(f, volume.Options{Size: size})
				if err != nil {
					f.Close()
					t.Fatal(err)
				}
				closeAtEnd(t, v)
				if !v.WasClean() {
					t.Error("raw device volume not clean after Close")
				}
				checkAll(t, v, model, seed)
			})

			t.Run("ext4", func(t *testing.T) {
				mnt := filepath.Join(dir, "mnt-"+mode.String())
				if err := os.Mkdir(mnt, 0o755); err != nil {
					t.Fatal(err)
				}
				run("mkfs.ext4", "-q", "-F", dev)
				run("mount", dev, mnt)
				t.Cleanup(func() {
					if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
						t.Errorf("umount %s: %v\n%s", mnt, err, out)
						// Detach it anyway, so the loop device goes when the
						// last file on it is closed.
						exec.Command("umount", "-l", mnt).Run()
					}
				})
				v, path := createFileAIO(t, mnt, size, mode)
				if v.IOAlign() != 4096 {
					v.Close()
					t.Fatalf("volume on ext4 over a 4K-sector device: IOAlign %d, want 4096", v.IOAlign())
				}
				model := runModel(t, v, rand.New(rand.NewPCG(seed, 6)), ops, caps{punch: true, fastZero: true}, seed)
				if err := v.Close(); err != nil {
					t.Fatal(err)
				}
				v, err := volume.Open(path, volume.Options{Size: size, AIO: mode})
				if err != nil {
					t.Fatal(err)
				}
				closeAtEnd(t, v)
				checkAll(t, v, model, seed)
			})
		})
	}
}

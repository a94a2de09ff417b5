package dio

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"keel/datapath/iobuf"
)

// TestAIOConcurrent: many goroutines write and read back their own blocks
// through AIO at once, plain and FUA; every byte must land, and the
// requests must have gone through the engine.
func TestAIOConcurrent(t *testing.T) {
	for _, mode := range []AIOMode{AIOAlways, AIOConcurrent} {
		t.Run(mode.String(), func(t *testing.T) {
			f := createAIO(t, mode, 8) // fewer slots than goroutines: some fall back
			const workers, rounds, blk = 16, 40, 8192
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rb := iobuf.Get(blk)
					defer rb.Release()
					for r := range rounds {
						off := int64((w*rounds + r) * blk)
						p := pattern(blk, byte(w*31+r))
						if err := f.WriteAt(p, off, r%5 == 0); err != nil {
							errs <- err
							return
						}
						if err := f.ReadAt(rb.Bytes(), off); err != nil {
							errs <- err
							return
						}
						if !bytes.Equal(rb.Bytes(), p) {
							errs <- fmt.Errorf("worker %d round %d: read back differs", w, r)
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			s := f.Stats()
			if s.AIORequests == 0 {
				t.Fatalf("no request went through AIO: %+v", s)
			}
			if s.AIORequests+s.AIOFallbacks > 2*workers*rounds {
				t.Fatalf("more requests counted than made: %+v", s)
			}
		})
	}
}

// TestAIOConcurrentAlone: in AIOConcurrent mode a lone request takes the
// synchronous path.
func TestAIOConcurrentAlone(t *testing.T) {
	f := createAIO(t, AIOConcurrent, 8)
	w := pattern(4096, 7)
	if err := f.WriteAt(w, 0, false); err != nil {
		t.Fatal(err)
	}
	if got := readBack(t, f, 0, 4096); !bytes.Equal(got, w) {
		t.Fatal("did not read back")
	}
	if s := f.Stats(); s.AIORequests != 0 || s.AIOFallbacks != 0 {
		t.Fatalf("lone requests: %+v, want all synchronous", s)
	}
}

// TestAIONoSlot: with every slot taken, a request is served synchronously
// and counted as a fallback.
func TestAIONoSlot(t *testing.T) {
	f := createAIO(t, AIOAlways, 1)
	slot := <-f.aio.free // hold the only slot
	w := pattern(4096, 3)
	if err := f.WriteAt(w, 4096, true); err != nil {
		t.Fatal(err)
	}
	if got := readBack(t, f, 4096, 4096); !bytes.Equal(got, w) {
		t.Fatal("did not read back")
	}
	if s := f.Stats(); s.AIOFallbacks != 2 || s.AIORequests != 0 {
		t.Fatalf("stats %+v, want 2 fallbacks", s)
	}
	f.aio.free <- slot
	readBack(t, f, 4096, 4096)
	if s := f.Stats(); s.AIORequests != 1 {
		t.Fatalf("stats %+v, want 1 AIO request once the slot is back", s)
	}
}

// TestAIOShortAndErrors: a read crossing the end of the file completes
// short through AIO, is finished synchronously and fails with EIO; a
// misaligned read completes with -EINVAL, which arrives as *Error.
func TestAIOShortAndErrors(t *testing.T) {
	f := createAIO(t, AIOAlways, 4)
	if err := f.WriteAt(pattern(8192, 1), testSize-8192, false); err != nil {
		t.Fatal(err)
	}
	b := iobuf.Get(8192).Bytes()
	err := f.ReadAt(b, testSize-4096)
	var de *Error
	if !errors.Is(err, unix.EIO) || !errors.As(err, &de) {
		t.Fatalf("read across the end: %v, want *Error wrapping EIO", err)
	}
	if s := f.Stats(); s.AIOShort != 1 {
		t.Fatalf("stats %+v, want one short completion", s)
	}
	err = f.ReadAt(b[:4096], testSize-8192+1)
	if !errors.Is(err, unix.EINVAL) || !errors.As(err, &de) || de.Op != "aio pread" {
		t.Fatalf("misaligned read: %v, want aio pread *Error wrapping EINVAL", err)
	}
	err = f.WriteAt(b[:4095], 0, true)
	if !errors.Is(err, unix.EINVAL) || !errors.As(err, &de) || de.Op != "aio pwrite" {
		t.Fatalf("misaligned write: %v, want aio pwrite *Error wrapping EINVAL", err)
	}
}

// TestAIOSetupFailure: when io_setup refuses (here: more events than
// aio-max-nr allows), the File stays synchronous, counts it and works.
func TestAIOSetupFailure(t *testing.T) {
	f, err := Create(filepath.Join(t.TempDir(), "dev"), testSize)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = f.EnableAIO(AIOAlways, 1<<30)
	var de *Error
	if !errors.As(err, &de) || de.Op != "io_setup" {
		t.Fatalf("EnableAIO with 2^30 slots: %v, want an io_setup *Error", err)
	}
	if f.AIO() != AIOOff || f.Stats().AIOSetupFailures != 1 {
		t.Fatalf("after a failed io_setup: mode %v stats %+v", f.AIO(), f.Stats())
	}
	w := pattern(4096, 5)
	if err := f.WriteAt(w, 0, true); err != nil {
		t.Fatal(err)
	}
	if got := readBack(t, f, 0, 4096); !bytes.Equal(got, w) {
		t.Fatal("did not read back")
	}
}

// TestAIOCloseDrains: Close waits for a request in flight (here: a slot
// held) before destroying the context, and the reaper ends.
func TestAIOCloseDrains(t *testing.T) {
	f, err := Create(filepath.Join(t.TempDir(), "dev"), testSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.EnableAIO(AIOAlways, 2); err != nil {
		t.Fatal(err)
	}
	readBack(t, f, 0, 4096)
	e := f.aio
	slot := <-e.free
	closed := make(chan error, 1)
	go func() { closed <- f.Close() }()
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) with a request in flight", err)
	default:
	}
	e.free <- slot
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	<-e.reapd // the reaper has destroyed the context and ended
	if s := f.Stats(); s.AIORequests != 1 {
		t.Fatalf("stats %+v", s)
	}
}

func TestParseAIOMode(t *testing.T) {
	for s, want := range map[string]AIOMode{"": AIODefault, "default": AIODefault, "off": AIOOff, "0": AIOOff,
		"always": AIOAlways, "1": AIOAlways, "on": AIOAlways, "concurrent": AIOConcurrent, "2": AIOConcurrent} {
		if m, err := ParseAIOMode(s); err != nil || m != want {
			t.Errorf("ParseAIOMode(%q) = %v, %v; want %v", s, m, err, want)
		}
	}
	if _, err := ParseAIOMode("uring"); !errors.Is(err, unix.EINVAL) {
		t.Errorf("ParseAIOMode(uring): %v", err)
	}
}

package dio

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
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

// holdSubmitter takes the submitter role of f's engine, starts n calls of
// fn (each gets its index) and returns once all n have queued their iocb,
// with a channel that yields each call's error. The caller then issues
// the batch with e.flush().
func holdSubmitter(t *testing.T, e *aioEngine, n int, fn func(i int) error) <-chan error {
	t.Helper()
	e.smu.Lock()
	if e.submitting {
		e.smu.Unlock()
		t.Fatal("submitter role already held")
	}
	e.submitting = true
	e.smu.Unlock()
	errs := make(chan error, n)
	for i := range n {
		go func() { errs <- fn(i) }()
	}
	for { // the callers only queue and park: this ends without any I/O completing
		e.smu.Lock()
		queued := len(e.sq)
		e.smu.Unlock()
		if queued == n {
			return errs
		}
		runtime.Gosched()
	}
}

// TestAIOBatchedSubmit: iocbs queued while another caller holds the
// submitter role go to the kernel in one io_submit, and each caller gets
// its own data back.
func TestAIOBatchedSubmit(t *testing.T) {
	f := createAIO(t, AIOAlways, 16)
	const n, blk = 8, 4096
	for i := range n {
		if err := f.WriteAt(pattern(blk, byte(i+1)), int64(i*blk), false); err != nil {
			t.Fatal(err)
		}
	}
	before := f.Stats()
	bufs := make([]*iobuf.Buf, n)
	for i := range bufs {
		bufs[i] = iobuf.Get(blk)
		defer bufs[i].Release()
	}
	errs := holdSubmitter(t, f.aio, n, func(i int) error { return f.ReadAt(bufs[i].Bytes(), int64(i*blk)) })
	f.aio.flush()
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		if !bytes.Equal(bufs[i].Bytes(), pattern(blk, byte(i+1))) {
			t.Fatalf("read %d: wrong data", i)
		}
	}
	s := f.Stats()
	if got := s.AIOSubmitCalls - before.AIOSubmitCalls; got != 1 {
		t.Errorf("%d io_submit calls for %d queued reads, want 1 (stats %+v)", got, n, s)
	}
	if got := s.AIORequests - before.AIORequests; got != n {
		t.Errorf("%d AIO requests, want %d (stats %+v)", got, n, s)
	}
}

// TestAIOBatchRefusal: an iocb io_submit refuses in the middle of a batch
// goes back to its caller (here: an aio_rw_flags bit no kernel knows,
// refused with EINVAL at submission), and the iocbs after it are still
// issued.
func TestAIOBatchRefusal(t *testing.T) {
	f := createAIO(t, AIOAlways, 8)
	e := f.aio
	const blk = 4096
	type result struct {
		res int64
		ok  bool
	}
	results := make([]result, 3)
	bufs := make([]*iobuf.Buf, 3)
	for i := range bufs {
		bufs[i] = iobuf.Get(blk)
		defer bufs[i].Release()
		copy(bufs[i].Bytes(), pattern(blk, byte(10+i)))
	}
	errs := holdSubmitter(t, e, 3, func(i int) error {
		r := <-e.free
		var flags uint32
		if i == 1 {
			flags = 1 << 30 // not an RWF_ flag
		}
		res, ok := e.submit(r, iocbCmdPwrite, bufs[i].Bytes(), int64(i*blk), flags)
		results[i] = result{res, ok}
		return nil
	})
	// The queue order is the order the goroutines ran in; find the bad one.
	e.smu.Lock()
	order := make([]uint32, len(e.sq))
	for k, cb := range e.sq {
		order[k] = cb.rwFlags
	}
	e.smu.Unlock()
	e.flush()
	for range 3 {
		<-errs
	}
	for i, r := range results {
		if i == 1 {
			if r.ok {
				t.Errorf("write with an unknown flag: ok (res %d), want refused", r.res)
			}
			continue
		}
		if !r.ok || r.res != blk {
			t.Errorf("write %d: res %d ok %v, want %d issued (queue flags %v)", i, r.res, r.ok, blk, order)
		}
	}
	for _, i := range []int{0, 2} {
		if got := readBack(t, f, int64(i*blk), blk); !bytes.Equal(got, pattern(blk, byte(10+i))) {
			t.Errorf("block %d did not read back", i)
		}
	}
	if s := f.Stats(); s.AIOFallbacks != 1 {
		t.Errorf("stats %+v, want 1 fallback (the refused write)", s)
	}
}

// TestSyncOnRequest: ReadAtSync and WriteAtSync bypass AIO whatever the
// mode, read what ReadAt wrote and the other way round, FUA included,
// allocate nothing, and are counted in SyncRequests.
func TestSyncOnRequest(t *testing.T) {
	for _, mode := range []AIOMode{AIOOff, AIOAlways, AIOConcurrent} {
		t.Run(mode.String(), func(t *testing.T) {
			f := createAIO(t, mode, 4)
			rb := iobuf.Get(8192)
			defer rb.Release()
			for i := range 8 {
				off := int64(i) * 8192
				p := pattern(8192, byte(i+1))
				if i%2 == 0 {
					if err := f.WriteAtSync(p, off, i%4 == 0); err != nil {
						t.Fatal(err)
					}
					if err := f.ReadAt(rb.Bytes(), off); err != nil {
						t.Fatal(err)
					}
				} else {
					if err := f.WriteAt(p, off, i%3 == 0); err != nil {
						t.Fatal(err)
					}
					if err := f.ReadAtSync(rb.Bytes(), off); err != nil {
						t.Fatal(err)
					}
				}
				if !bytes.Equal(rb.Bytes(), p) {
					t.Fatalf("block %d read back differs", i)
				}
			}
			before := f.Stats()
			b := rb.Bytes()[:4096]
			for _, c := range []struct {
				name string
				fn   func()
			}{
				{"ReadAtSync", func() { _ = f.ReadAtSync(b, 8192) }},
				{"WriteAtSync", func() { _ = f.WriteAtSync(b, 8192, false) }},
				{"WriteAtSync FUA", func() { _ = f.WriteAtSync(b, 8192, true) }},
			} {
				if a := testing.AllocsPerRun(50, c.fn); a != 0 {
					t.Errorf("%s allocates %.1f per call", c.name, a)
				}
			}
			s := f.Stats()
			if got := s.SyncRequests - before.SyncRequests; got != 3*51 {
				t.Errorf("SyncRequests went up by %d, want %d", got, 3*51)
			}
			if s.AIORequests != before.AIORequests || s.AIOFallbacks != 0 {
				t.Errorf("synchronous calls went through AIO: before %+v, after %+v", before, s)
			}
			if mode == AIOAlways && s.AIORequests == 0 {
				t.Errorf("ReadAt and WriteAt did not use AIO: %+v", s)
			}
		})
	}
}

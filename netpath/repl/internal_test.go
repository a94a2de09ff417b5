package repl

import (
	"errors"
	"syscall"
	"testing"
	"time"

	"keel/netpath/replproto"
)

func TestWindow(t *testing.T) {
	w := newWindow(4, 100)
	ops := make([]*Op, 6)
	for i := range ops {
		ops[i] = new(Op)
	}
	if w.Full() || !w.fits(1000) {
		t.Fatal("empty window: full, or a large frame does not fit")
	}
	for i := 0; i < 3; i++ {
		if !w.fits(30) {
			t.Fatalf("frame %d does not fit", i)
		}
		if seq := w.Add(ops[i], 30); seq != uint64(i+1) {
			t.Fatalf("seq %d, want %d", seq, i+1)
		}
	}
	if w.fits(30) { // 90 + 30 > 100
		t.Fatal("byte limit not enforced")
	}
	if !w.fits(10) {
		t.Fatal("a frame within the byte limit does not fit")
	}
	w.Add(ops[3], 10)
	if !w.Full() || w.fits(0) {
		t.Fatal("frame limit not enforced")
	}
	// Out-of-order answers: freeing 2 and 3 leaves 1 holding the span.
	w.Free(2)
	w.Free(3)
	if w.Get(2) != nil || w.Get(1) != ops[0] || w.Get(4) != ops[3] || w.Get(5) != nil || w.Get(0) != nil {
		t.Fatal("Get after out-of-order frees")
	}
	if w.fits(0) {
		t.Fatal("the span from the oldest unfinished frame is full")
	}
	if w.Oldest() != ops[0] {
		t.Fatal("Oldest")
	}
	w.Free(1)
	if w.Oldest() != ops[3] || w.count != 1 || w.bytes != 10 {
		t.Fatalf("after freeing the oldest: count %d bytes %d", w.count, w.bytes)
	}
	if !w.fits(30) {
		t.Fatal("space after the oldest frame was freed")
	}
	w.Add(ops[4], 30)
	w.Add(ops[5], 30)
	got := w.Drain(nil)
	if len(got) != 3 || got[0] != ops[3] || got[1] != ops[4] || got[2] != ops[5] {
		t.Fatalf("Drain: %v", got)
	}
	if w.count != 0 || w.bytes != 0 || w.Oldest() != nil || w.Full() {
		t.Fatal("window not empty after Drain")
	}
}

func TestZeroCopyLedger(t *testing.T) {
	var z zcTracker
	a, b, c := new(Op), new(Op), new(Op)
	z.push(zcEntry{op: a, first: 0, last: 1, bytes: 10})
	z.push(zcEntry{op: b, first: 2, last: 2, bytes: 20})
	z.push(zcEntry{op: c, first: 3, last: 5, bytes: 30})
	if _, ok := z.popDone(); ok {
		t.Fatal("popDone before any completion")
	}
	// Out of order: 3..5 completes first (copied), then 0..1.
	if n := z.complete(3, 5, true); n != 3 {
		t.Fatalf("complete covered %d sends", n)
	}
	if _, ok := z.popDone(); ok || z.isDone(3) {
		t.Fatal("completion beyond a gap counted as done")
	}
	z.complete(0, 1, false)
	e, ok := z.popDone()
	if !ok || e.op != a || e.copied {
		t.Fatalf("first pop %+v %v", e, ok)
	}
	if _, ok := z.popDone(); ok {
		t.Fatal("b popped before id 2 completed")
	}
	z.complete(2, 2, false)
	if e, _ := z.popDone(); e.op != b || e.copied {
		t.Fatalf("second pop %+v", e)
	}
	if e, _ := z.popDone(); e.op != c || !e.copied {
		t.Fatalf("third pop %+v: want c, copied", e)
	}
	if z.pending() != 0 || !z.isDone(5) || z.isDone(6) {
		t.Fatal("ledger state after all completions")
	}
	// A repeated notification changes nothing.
	z.complete(0, 5, false)
	if z.isDone(6) {
		t.Fatal("repeat advanced done")
	}
	// A frame ledgered before sending: its completion (copied) arrives
	// before the sender closes the entry.
	o := zcTracker{next: 10, done: 10}
	i := o.open(a)
	o.next += 2 // two sendmsg calls
	o.complete(10, 11, true)
	if _, ok := o.popDone(); ok {
		t.Fatal("an open entry was popped")
	}
	if !o.close(i, 2, 100) {
		t.Fatal("an entry with ids was dropped")
	}
	if e, ok := o.popDone(); !ok || !e.copied || e.bytes != 100 {
		t.Fatalf("entry completed while open: %+v %v, want copied", e, ok)
	}
	// An entry that took no id (ENOBUFS at once) is dropped.
	i = o.open(b)
	if o.close(i, 0, 0) || o.pending() != 0 {
		t.Fatal("an entry without ids stayed queued")
	}
	// Wrap-around of the 32-bit ids.
	w := zcTracker{done: 1<<32 - 2, next: 1<<32 - 2}
	w.push(zcEntry{op: a, first: 1<<32 - 2, last: 1})
	w.complete(1<<32-2, 1, false)
	if e, ok := w.popDone(); !ok || e.op != a {
		t.Fatal("wrap-around completion")
	}
}

func TestBackoff(t *testing.T) {
	b := backoff{min: 10 * time.Millisecond, max: 80 * time.Millisecond}
	wantCap := []time.Duration{10, 20, 40, 80, 80, 80}
	for i, c := range wantCap {
		c *= time.Millisecond
		d := b.next()
		if d < c/2 || d > c {
			t.Fatalf("attempt %d: %v outside [%v, %v]", i, d, c/2, c)
		}
	}
	b.reset()
	if d := b.next(); d > 10*time.Millisecond {
		t.Fatalf("after reset: %v", d)
	}
}

func TestNackErrors(t *testing.T) {
	e := &NackError{Peer: 2, Volume: 3, Seq: 4, Type: replproto.TypeWrite, Reason: replproto.ReasonIO, Errno: syscall.ENOSPC}
	if !errors.Is(e, syscall.ENOSPC) || !errors.Is(e, ErrRefused) || errors.Is(e, ErrFenced) {
		t.Fatalf("I/O NACK unwrap: %v", e)
	}
	s := &NackError{Reason: replproto.ReasonStaleEpoch, Epoch: 9}
	if !errors.Is(s, ErrFenced) {
		t.Fatal("stale NACK is not ErrFenced")
	}
	for _, c := range []struct {
		err    error
		reason replproto.Reason
		errno  syscall.Errno
	}{
		{ErrUnknownVolume, replproto.ReasonUnknownVolume, 0},
		{errors.New("x"), replproto.ReasonIO, syscall.EIO},
		{syscall.EINVAL, replproto.ReasonInvalid, syscall.EINVAL},
		{&wrapped{syscall.ENOSPC}, replproto.ReasonIO, syscall.ENOSPC},
	} {
		r, n := nackReason(c.err)
		if r != c.reason || n != c.errno {
			t.Errorf("nackReason(%v) = %v, %v", c.err, r, n)
		}
	}
	se := &StreamError{Peer: 1, Err: ErrTimeout}
	if !errors.Is(se, ErrPeerLost) || !errors.Is(se, ErrTimeout) {
		t.Fatal("StreamError unwrap")
	}
}

type wrapped struct{ err error }

func (w *wrapped) Error() string { return "wrapped: " + w.err.Error() }
func (w *wrapped) Unwrap() error { return w.err }

func TestFence(t *testing.T) {
	var calls []uint64
	f := NewFence(func(vol, e uint64) { calls = append(calls, vol, e) })
	if f.Fenced(1, 0) {
		t.Fatal("fenced with nothing seen")
	}
	if !f.Observe(1, 5) || f.Observe(1, 4) || f.Observe(1, 5) {
		t.Fatal("Observe raised wrongly")
	}
	if !f.Fenced(1, 4) || f.Fenced(1, 5) || f.Fenced(1, 6) || f.Fenced(2, 0) {
		t.Fatal("Fenced")
	}
	if len(calls) != 2 || calls[0] != 1 || calls[1] != 5 {
		t.Fatalf("callbacks %v", calls)
	}
}

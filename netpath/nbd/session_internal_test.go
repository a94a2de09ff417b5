package nbd

import (
	"testing"
	"testing/synctest"
)

func newTestSession(slots, maxBytes int) *session {
	ss := &session{maxBytes: maxBytes}
	ss.cond.L = &ss.mu
	reqs := make([]request, slots)
	for i := range reqs {
		ss.free = append(ss.free, &reqs[i])
	}
	return ss
}

// blocked reports whether done is still open once every goroutine of the
// bubble is blocked.
func blocked(done chan struct{}) bool {
	synctest.Wait()
	select {
	case <-done:
		return false
	default:
		return true
	}
}

// TestAcquireBounds: the reader waits for a slot when MaxInFlight requests
// are in flight, and for bytes when MaxInFlightBytes would be exceeded, but
// a request larger than the budget goes alone.
func TestAcquireBounds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ss := newTestSession(2, 8192)
		a := ss.acquire(8192)
		done := make(chan struct{})
		var b *request
		go func() { b = ss.acquire(4096); close(done) }()
		if !blocked(done) {
			t.Fatal("acquired 4096 bytes with the 8192-byte budget spent")
		}
		ss.release(a)
		if blocked(done) {
			t.Fatal("still waiting after the bytes were released")
		}

		// Slots: b holds one of two; take the other, then a third waits.
		c := ss.acquire(0)
		done = make(chan struct{})
		go func() { ss.release(ss.acquire(0)); close(done) }()
		if !blocked(done) {
			t.Fatal("acquired a third slot of two")
		}
		ss.release(c)
		if blocked(done) {
			t.Fatal("still waiting after a slot was released")
		}
		ss.release(b)

		// Larger than the budget: allowed when nothing else holds bytes.
		big := ss.acquire(1 << 20)
		done = make(chan struct{})
		go func() { ss.release(ss.acquire(1)); close(done) }()
		if !blocked(done) {
			t.Fatal("acquired bytes beside an over-budget request")
		}
		ss.release(big)
		if blocked(done) {
			t.Fatal("still waiting after the large request was released")
		}

		// waitIdle returns once every slot is back.
		x := ss.acquire(0)
		done = make(chan struct{})
		go func() { ss.waitIdle(); close(done) }()
		if !blocked(done) {
			t.Fatal("waitIdle returned with a request in flight")
		}
		ss.release(x)
		if blocked(done) {
			t.Fatal("waitIdle still waiting with every slot free")
		}
		if ss.bytes != 0 || ss.inflight.Load() != 0 {
			t.Fatalf("accounting left %d bytes, %d in flight", ss.bytes, ss.inflight.Load())
		}
	})
}

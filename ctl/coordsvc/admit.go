package coordsvc

import (
	"context"
	"time"

	"keel/ctl/coordapi"
)

// Limit bounds one operation class.
type Limit struct {
	// InFlight is how many calls of the class may be handled at once.
	InFlight int
	// Wait is the longest a call waits for a slot before it is shed. It is
	// short on purpose: a bounded wait absorbs bursts, a long one would
	// be the unbounded queue that starved the 2011 control plane.
	Wait time.Duration
	// Deadline bounds the whole call once admitted.
	Deadline time.Duration
	// MaxBody is the largest request body accepted (413 beyond).
	MaxBody int64
	// RetryAfter is what shed calls are told.
	RetryAfter time.Duration
}

// DefaultLimits: heartbeats get the most room and the shortest deadline
// (a node's attempt times out after its 2 s interval anyway); the admin
// classes are small so that a flood of them sheds fast; reads sit between.
func DefaultLimits() map[coordapi.Class]Limit {
	return map[coordapi.Class]Limit{
		coordapi.ClassHeartbeat:   {InFlight: 256, Wait: 100 * time.Millisecond, Deadline: 3 * time.Second, MaxBody: 4 << 20, RetryAfter: time.Second},
		coordapi.ClassNodeAdmin:   {InFlight: 8, Wait: 50 * time.Millisecond, Deadline: 10 * time.Second, MaxBody: 64 << 10, RetryAfter: 2 * time.Second},
		coordapi.ClassVolumeAdmin: {InFlight: 16, Wait: 50 * time.Millisecond, Deadline: 10 * time.Second, MaxBody: 64 << 10, RetryAfter: 2 * time.Second},
		coordapi.ClassRead:        {InFlight: 32, Wait: 50 * time.Millisecond, Deadline: 5 * time.Second, MaxBody: 4 << 10, RetryAfter: time.Second},
	}
}

// limiter is a counting semaphore with a bounded wait.
type limiter struct {
	Limit
	slots chan struct{}
}

func newLimiter(l Limit) *limiter {
	return &limiter{Limit: l, slots: make(chan struct{}, max(l.InFlight, 1))}
}

// acquire takes a slot, waiting at most l.Wait; false means shed.
func (l *limiter) acquire(ctx context.Context) bool {
	select {
	case l.slots <- struct{}{}:
		return true
	default:
	}
	if l.Wait <= 0 {
		return false
	}
	t := time.NewTimer(l.Wait)
	defer t.Stop()
	select {
	case l.slots <- struct{}{}:
		return true
	case <-t.C:
		return false
	case <-ctx.Done():
		return false
	}
}

func (l *limiter) release() { <-l.slots }

package sock

import (
	"container/list"
	"context"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"keel/ctl/coordapi"
)

// The recovery throttle: on the replication path, recovery traffic
// (catch-up and re-mirror) is rate limited so that it never takes the share
// that foreground replication (client writes being mirrored) needs.
//
//	                  Bandwidth (the path's capacity, bytes/s)
//	├──────────────── recovery share ────────────────┼──── reserved ────┤
//	                                                  max(Floor, measured
//	                                                  foreground rate)
//
//	effective = max(MinTrickle, min(Rate, Bandwidth - max(Floor, foreground)))
//
// With Bandwidth 0 (capacity unknown) the effective rate is just Rate, and
// with Rate 0 as well recovery is not throttled at all (Effective reports
// 0: unlimited). MinTrickle keeps recovery moving when foreground traffic
// fills the path: a replica that never finishes re-mirroring leaves its
// volume with one copy for good, which is worse than a little contention.
//
// Foreground replication only counts its bytes (Foreground: one atomic add,
// no lock, no allocation); it is never delayed here. The foreground rate is
// measured lazily, whenever Wait, Effective, Set or Stats runs, over the
// interval since the previous measurement once that is at least
// ForegroundWindow long: there is no goroutine per throttle. After a quiet
// spell the first measurement is the average over the whole spell.
//
// Recovery bytes go through Wait, a token bucket refilled at the effective
// rate, holding at most a tenth of a second of it (at least 64 KiB); it
// starts full. A Wait for more than the bucket holds waits for a full
// bucket and leaves it in debt, which later waiters repay, so any size is
// accepted and the rate holds over time. Waiters are served in arrival
// order; only the first one sleeps on a timer, at most ForegroundWindow at
// a time so that it sees foreground changes, and Set wakes it at once.

const (
	// MinTrickle is the recovery rate the throttle never goes below while
	// it throttles (bytes/s).
	MinTrickle = 1 << 20
	// MaxThrottleRate bounds every ThrottleConfig field (bytes/s): larger
	// values are typos (a 100 GiB/s path is 800 Gbit/s).
	MaxThrottleRate = 100 << 30
	// ForegroundWindow is the shortest interval the foreground rate is
	// measured over.
	ForegroundWindow = 200 * time.Millisecond
	minBurst         = 64 << 10
)

// ThrottleConfig sets the recovery throttle of a replication path. All
// fields are bytes per second. The zero value throttles nothing.
type ThrottleConfig struct {
	// Bandwidth is the replication path's capacity; 0: unknown (then only
	// Rate limits recovery, and Floor must be 0).
	Bandwidth int64 `json:"bandwidth"`
	// Floor is the share of Bandwidth reserved for foreground replication:
	// recovery gets at most Bandwidth-Floor, less while foreground traffic
	// uses more than Floor. It must be below Bandwidth.
	Floor int64 `json:"floor"`
	// Rate caps recovery traffic; 0: no cap other than Bandwidth-Floor.
	Rate int64 `json:"rate"`
}

// Validate checks the fields. Its message names the field, the allowed
// range and the fix. A rate or bandwidth, when given, must be between
// MinTrickle (1 MiB/s) and MaxThrottleRate (100 GiB/s); 0 means unknown
// bandwidth or no rate cap.
func (c ThrottleConfig) Validate() error {
	for _, f := range []struct {
		name, zero string
		v          int64
	}{{"bandwidth", "0 if unknown", c.Bandwidth}, {"rate", "0 for no cap", c.Rate}} {
		if f.v != 0 && (f.v < MinTrickle || f.v > MaxThrottleRate) {
			return fmt.Errorf("throttle %s %s: must be between %s and %s (or %s)",
				f.name, rateString(f.v), rateString(MinTrickle), rateString(MaxThrottleRate), f.zero)
		}
	}
	switch {
	case c.Floor < 0:
		return fmt.Errorf("throttle floor %s: must not be negative (0 reserves nothing beyond what foreground replication uses)", rateString(c.Floor))
	case c.Floor > 0 && c.Bandwidth == 0:
		return fmt.Errorf("throttle floor %s without a bandwidth: the floor is a share of the path's capacity; give the bandwidth too, or floor 0", rateString(c.Floor))
	case c.Bandwidth > 0 && c.Floor >= c.Bandwidth:
		return fmt.Errorf("throttle floor %s: must be below the bandwidth %s; lower the floor or raise the bandwidth", rateString(c.Floor), rateString(c.Bandwidth))
	}
	return nil
}

// rateString renders bytes/s for messages, e.g. "200MiB/s".
func rateString(n int64) string {
	if n < 0 {
		return "-" + coordapi.FormatBytes(-n) + "/s"
	}
	return coordapi.FormatBytes(n) + "/s"
}

// ThrottleStats are the throttle's counters, for metrics.
type ThrottleStats struct {
	Config ThrottleConfig
	// Effective is the recovery rate allowed now (bytes/s; 0: unlimited);
	// ForegroundRate the last measured foreground rate.
	Effective      int64
	ForegroundRate int64
	// RecoveryBytes were granted by Wait; ForegroundBytes counted by
	// Foreground.
	RecoveryBytes   int64
	ForegroundBytes int64
	// Waits counts Wait calls that had to block (cancelled ones included);
	// WaitTime is the time they spent blocked, summed over waiters.
	Waits    int64
	WaitTime time.Duration
	// Waiting is the number of Wait calls blocked now.
	Waiting int
}

// Throttle is one replication path's recovery throttle. It is safe for
// concurrent use. A nil *Throttle throttles nothing: Wait returns at once
// and Foreground does nothing, so callers need no check.
type Throttle struct {
	fg atomic.Int64 // foreground bytes counted, ever; the only hot-path field

	now   func() time.Time
	timer func(d time.Duration) (<-chan time.Time, func() bool)
	// queued, when set (tests), is called with t.mu held when a Wait
	// joins the queue.
	queued func()

	mu      sync.Mutex // guards following
	cfg     ThrottleConfig
	eff     int64         // effective rate as of last; 0: unlimited
	tokens  float64       // bytes; negative: debt
	last    time.Time     // tokens are refilled up to here
	winAt   time.Time     // foreground measurement started here
	winFG   int64         // fg at winAt
	fgRate  int64         // last measured foreground rate
	queue   list.List     // of *waiter, in arrival order; the front one may take tokens
	changed chan struct{} // closed (and replaced) when the front waiter or the rate changes
	granted int64
	waits   int64
	waited  time.Duration
}

type waiter struct{ n int }

// NewThrottle returns a throttle set to c.
func NewThrottle(c ThrottleConfig) (*Throttle, error) {
	return newThrottle(c, time.Now, func(d time.Duration) (<-chan time.Time, func() bool) {
		tm := time.NewTimer(d)
		return tm.C, tm.Stop
	})
}

// newThrottle is NewThrottle with a clock: now reads it, timer arms a
// one-shot timer on it and returns its channel and stop function.
func newThrottle(c ThrottleConfig, now func() time.Time, timer func(time.Duration) (<-chan time.Time, func() bool)) (*Throttle, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	t := &Throttle{now: now, timer: timer, cfg: c, changed: make(chan struct{})}
	at := now()
	t.last, t.winAt = at, at
	t.setEffLocked(t.computeLocked())
	return t, nil
}

// Set changes the configuration at run time. Waiters see the new rate at
// once; tokens already accrued are kept up to the new bucket size.
func (t *Throttle) Set(c ThrottleConfig) error {
	if err := c.Validate(); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.advanceLocked(t.now())
	t.cfg = c
	t.setEffLocked(t.computeLocked())
	t.wakeLocked()
	return nil
}

// Config returns the current configuration.
func (t *Throttle) Config() ThrottleConfig {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.cfg
}

// Foreground counts n bytes of foreground replication sent on the path.
// It is called per replication frame: one atomic add, no lock.
func (t *Throttle) Foreground(n int) {
	if t != nil {
		t.fg.Add(int64(n))
	}
}

// Effective returns the recovery rate allowed now, in bytes/s; 0 means
// unlimited.
func (t *Throttle) Effective() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.advanceLocked(t.now())
	return t.eff
}

// Stats returns the counters and the current rates.
func (t *Throttle) Stats() ThrottleStats {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.advanceLocked(t.now())
	return ThrottleStats{
		Config: t.cfg, Effective: t.eff, ForegroundRate: t.fgRate,
		RecoveryBytes: t.granted, ForegroundBytes: t.fg.Load(),
		Waits: t.waits, WaitTime: t.waited, Waiting: t.queue.Len(),
	}
}

// Wait blocks until n bytes of recovery traffic may be sent on the path,
// then counts them as sent. It returns an error wrapping ctx.Err() when ctx
// ends first; the bytes are then not counted.
func (t *Throttle) Wait(ctx context.Context, n int) error {
	if t == nil || n <= 0 {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("sock: recovery throttle: %w", err)
	}
	t.mu.Lock()
	start := t.now()
	t.advanceLocked(start)
	if t.queue.Len() == 0 && t.takeLocked(n) {
		t.mu.Unlock()
		return nil
	}
	e := t.queue.PushBack(&waiter{n: n})
	t.waits++
	if t.queued != nil {
		t.queued()
	}
	for {
		var wake <-chan time.Time
		var stop func() bool
		if t.queue.Front() == e {
			if t.takeLocked(n) {
				t.queue.Remove(e)
				t.wakeLocked() // the next waiter is first now
				t.waited += t.last.Sub(start)
				t.mu.Unlock()
				return nil
			}
			wake, stop = t.timer(t.delayLocked(n))
		}
		changed := t.changed
		t.mu.Unlock()
		select {
		case <-wake:
		case <-changed:
		case <-ctx.Done():
		}
		if stop != nil {
			stop()
		}
		t.mu.Lock()
		t.advanceLocked(t.now())
		if err := ctx.Err(); err != nil {
			if t.queue.Front() == e {
				t.wakeLocked()
			}
			t.queue.Remove(e)
			t.waited += t.last.Sub(start)
			t.mu.Unlock()
			return fmt.Errorf("sock: recovery throttle: %w", err)
		}
	}
}

// takeLocked takes n bytes' tokens when the bucket has them (all of them,
// or a full bucket for a Wait larger than the bucket) and counts them.
// REQUIRES: t.mu.
func (t *Throttle) takeLocked(n int) bool {
	if t.eff > 0 {
		// The tolerance absorbs float rounding of the refill, so that a
		// waiter woken by its timer (delayLocked rounds up) is served.
		if t.tokens+1e-3 < min(float64(n), burst(t.eff)) {
			return false
		}
		t.tokens -= float64(n)
	}
	t.granted += int64(n)
	return true
}

// delayLocked is how long until takeLocked(n) can succeed at the current
// rate, bounded by ForegroundWindow. REQUIRES: t.mu, t.eff > 0.
func (t *Throttle) delayLocked(n int) time.Duration {
	need := min(float64(n), burst(t.eff)) - t.tokens
	d := time.Duration(math.Ceil(need / float64(t.eff) * float64(time.Second)))
	return min(max(d, time.Microsecond), ForegroundWindow)
}

// advanceLocked refills the bucket up to now at the rate that was in
// force, measures the foreground rate when a window has passed, and
// recomputes the effective rate. REQUIRES: t.mu.
func (t *Throttle) advanceLocked(now time.Time) {
	if !now.After(t.last) {
		return
	}
	if t.eff > 0 {
		t.tokens = min(t.tokens+float64(t.eff)*now.Sub(t.last).Seconds(), burst(t.eff))
	}
	t.last = now
	if el := now.Sub(t.winAt); el >= ForegroundWindow {
		fg := t.fg.Load()
		t.fgRate = int64(float64(fg-t.winFG) / el.Seconds())
		t.winAt, t.winFG = now, fg
	}
	if eff := t.computeLocked(); eff != t.eff {
		t.setEffLocked(eff)
		t.wakeLocked()
	}
}

// computeLocked is the effective rate for the configuration and the
// measured foreground rate. REQUIRES: t.mu.
func (t *Throttle) computeLocked() int64 {
	c := t.cfg
	if c.Bandwidth == 0 {
		return c.Rate
	}
	share := c.Bandwidth - max(c.Floor, t.fgRate)
	if c.Rate > 0 {
		share = min(share, c.Rate)
	}
	return max(share, MinTrickle)
}

// setEffLocked installs a new effective rate: the bucket is full after an
// unlimited spell, and holds no more than the new size otherwise.
// REQUIRES: t.mu.
func (t *Throttle) setEffLocked(eff int64) {
	switch {
	case eff == 0:
	case t.eff == 0:
		t.tokens = burst(eff)
	default:
		t.tokens = min(t.tokens, burst(eff))
	}
	t.eff = eff
}

// wakeLocked wakes every waiter to look again. REQUIRES: t.mu.
func (t *Throttle) wakeLocked() {
	close(t.changed)
	t.changed = make(chan struct{})
}

// burst is the bucket size at rate eff: a tenth of a second, at least
// minBurst.
func burst(eff int64) float64 { return float64(max(eff/10, minBurst)) }

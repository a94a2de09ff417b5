package sock

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is a manual clock: time moves only in advance, and every timer
// armed on it is announced on armed so that a test knows a waiter sleeps.
type fakeClock struct {
	mu     sync.Mutex
	at     time.Time
	timers map[*fakeTimer]bool
	armed  chan time.Duration
}

type fakeTimer struct {
	when time.Time
	ch   chan time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{at: time.Unix(1e9, 0), timers: map[*fakeTimer]bool{}, armed: make(chan time.Duration, 64)}
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.at
}

func (c *fakeClock) timer(d time.Duration) (<-chan time.Time, func() bool) {
	c.mu.Lock()
	ft := &fakeTimer{when: c.at.Add(d), ch: make(chan time.Time, 1)}
	c.timers[ft] = true
	c.mu.Unlock()
	c.armed <- d
	return ft.ch, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		ok := c.timers[ft]
		delete(c.timers, ft)
		return ok
	}
}

// advance moves the clock and fires the timers due.
func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.at = c.at.Add(d)
	for ft := range c.timers {
		if !ft.when.After(c.at) {
			ft.ch <- c.at
			delete(c.timers, ft)
		}
	}
}

func newTestThrottle(t *testing.T, c ThrottleConfig) (*Throttle, *fakeClock) {
	t.Helper()
	clk := newFakeClock()
	th, err := newThrottle(c, clk.now, clk.timer)
	if err != nil {
		t.Fatal(err)
	}
	return th, clk
}

// armed waits for the next timer a waiter arms, failing the test if none
// comes (a waiter that returned instead, or one that never sleeps).
func (c *fakeClock) next(t *testing.T) time.Duration {
	t.Helper()
	select {
	case d := <-c.armed:
		return d
	case <-time.After(10 * time.Second):
		t.Fatal("no waiter armed a timer")
		return 0
	}
}

const MiB = 1 << 20

// near reports whether a timer of d is the one wanted, give or take the
// nanosecond rounding.
func near(d, want time.Duration) bool { return d >= want && d <= want+time.Microsecond }

// drive sends total bytes in chunks through th from one goroutine while
// the test advances the fake clock by whatever each sleeping waiter asks,
// and returns the simulated time it took.
func drive(t *testing.T, th *Throttle, clk *fakeClock, total, chunk int) time.Duration {
	t.Helper()
	start := clk.now()
	done := make(chan error, 1)
	go func() {
		for sent := 0; sent < total; sent += chunk {
			if err := th.Wait(context.Background(), chunk); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			return clk.now().Sub(start)
		case d := <-clk.armed:
			clk.advance(d)
		}
	}
}

func TestThrottleRateHonoured(t *testing.T) {
	for _, tc := range []struct {
		name  string
		cfg   ThrottleConfig
		rate  int64 // expected recovery bytes/s
		chunk int
	}{
		{"rate only", ThrottleConfig{Rate: 10 * MiB}, 10 * MiB, 256 << 10},
		{"bandwidth minus floor", ThrottleConfig{Bandwidth: 100 * MiB, Floor: 80 * MiB}, 20 * MiB, 1 * MiB},
		{"rate below the share", ThrottleConfig{Bandwidth: 100 * MiB, Floor: 10 * MiB, Rate: 5 * MiB}, 5 * MiB, 64 << 10},
		{"chunks larger than the bucket", ThrottleConfig{Rate: 4 * MiB}, 4 * MiB, 3 * MiB},
	} {
		t.Run(tc.name, func(t *testing.T) {
			th, clk := newTestThrottle(t, tc.cfg)
			if got := th.Effective(); got != tc.rate {
				t.Fatalf("Effective = %d, want %d", got, tc.rate)
			}
			total := 60 * int(tc.rate) / 10 // six seconds' worth
			took := drive(t, th, clk, total, tc.chunk)
			// The bucket starts full: the first burst(rate) bytes are free,
			// and the last chunk may leave the bucket in debt.
			lo := time.Duration(float64(total-int(burst(tc.rate))-tc.chunk) / float64(tc.rate) * float64(time.Second))
			hi := time.Duration(float64(total) / float64(tc.rate) * float64(time.Second))
			if took < lo || took > hi+time.Millisecond {
				t.Fatalf("%d bytes took %v of simulated time, want between %v and %v", total, took, lo, hi)
			}
			st := th.Stats()
			if st.RecoveryBytes != int64(total) || st.Waits == 0 || st.WaitTime <= 0 || st.Waiting != 0 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

func TestThrottleUnlimited(t *testing.T) {
	th, clk := newTestThrottle(t, ThrottleConfig{})
	if got := th.Effective(); got != 0 {
		t.Fatalf("Effective = %d, want 0 (unlimited)", got)
	}
	if took := drive(t, th, clk, 10<<30, 32*MiB); took != 0 {
		t.Fatalf("unlimited throttle made Wait sleep %v", took)
	}
	var nilT *Throttle
	nilT.Foreground(5)
	if err := nilT.Wait(context.Background(), 5); err != nil {
		t.Fatal(err)
	}
}

func TestThrottleSetWakesWaiter(t *testing.T) {
	th, clk := newTestThrottle(t, ThrottleConfig{Rate: MinTrickle})
	if err := th.Wait(context.Background(), int(burst(MinTrickle))); err != nil { // empty the bucket
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- th.Wait(context.Background(), 64<<10) }()
	if d := clk.next(t); !near(d, time.Second/16) {
		t.Fatalf("at 1MiB/s, 64KiB should wait 62.5ms, armed %v", d)
	}
	if err := th.Set(ThrottleConfig{Rate: 64 * MiB}); err != nil {
		t.Fatal(err)
	}
	// The waiter wakes on Set without the clock moving and waits at the
	// new rate: 64 KiB at 64 MiB/s.
	d := clk.next(t)
	if !near(d, time.Second/1024) {
		t.Fatalf("after Set to 64MiB/s, armed %v, want %v", d, time.Second/1024)
	}
	clk.advance(d)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := th.Config(); got != (ThrottleConfig{Rate: 64 * MiB}) {
		t.Fatalf("Config = %+v", got)
	}
}

func TestThrottleFloorAndForeground(t *testing.T) {
	th, clk := newTestThrottle(t, ThrottleConfig{Bandwidth: 1000 * MiB, Floor: 100 * MiB, Rate: 500 * MiB})
	if got := th.Effective(); got != 500*MiB {
		t.Fatalf("idle path: Effective = %d, want the rate cap %d", got, 500*MiB)
	}
	step := func(fgRate int64) int64 {
		th.Foreground(int(fgRate / 5)) // one ForegroundWindow of 200 ms
		clk.advance(ForegroundWindow)
		return th.Effective()
	}
	for _, tc := range []struct{ fg, want int64 }{
		{50 * MiB, 500 * MiB},  // below the floor: the cap still rules
		{700 * MiB, 300 * MiB}, // foreground takes more than the floor
		{990 * MiB, 10 * MiB},
		{1000 * MiB, MinTrickle}, // the path is full: recovery trickles
		{2000 * MiB, MinTrickle}, // more than the stated bandwidth: trickle
		{0, 500 * MiB},
	} {
		if got := step(tc.fg); got != tc.want {
			t.Fatalf("foreground %d MiB/s: Effective = %d MiB/s, want %d MiB/s", tc.fg/MiB, got/MiB, tc.want/MiB)
		}
	}
	if err := th.Set(ThrottleConfig{Bandwidth: 1000 * MiB, Floor: 900 * MiB}); err != nil {
		t.Fatal(err)
	}
	if got := step(10 * MiB); got != 100*MiB {
		t.Fatalf("floor 900 of 1000 MiB/s: Effective = %d MiB/s, want 100", got/MiB)
	}
	// Over simulated time with foreground steady at 600 MiB/s, recovery
	// gets the remaining 400 MiB/s and the sum stays within the path.
	if err := th.Set(ThrottleConfig{Bandwidth: 1000 * MiB, Floor: 100 * MiB}); err != nil {
		t.Fatal(err)
	}
	step(600 * MiB)
	start := clk.now()
	done := make(chan error, 1)
	total := 2000 * MiB
	go func() {
		for sent := 0; sent < total; sent += 4 * MiB {
			if err := th.Wait(context.Background(), 4*MiB); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	var fg int64
	for finished := false; !finished; {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			finished = true
		case d := <-clk.armed:
			// Foreground traffic flows at 600 MiB/s while time passes.
			th.Foreground(int(600 * MiB * d.Seconds()))
			fg += int64(600 * MiB * d.Seconds())
			clk.advance(d)
		}
	}
	took := clk.now().Sub(start).Seconds()
	if rate := float64(total) / took; rate > 425*MiB || rate < 360*MiB {
		t.Fatalf("recovery ran at %.0f MiB/s beside 600 MiB/s foreground on a 1000 MiB/s path, want about 400", rate/MiB)
	}
	if st := th.Stats(); st.ForegroundRate < 590*MiB || st.ForegroundRate > 610*MiB {
		t.Fatalf("measured foreground %d MiB/s, want 600", st.ForegroundRate/MiB)
	}
}

func TestThrottleWaitCancel(t *testing.T) {
	th, clk := newTestThrottle(t, ThrottleConfig{Rate: MinTrickle})
	queued := make(chan struct{}, 4)
	th.queued = func() { queued <- struct{}{} }
	if err := th.Wait(context.Background(), int(burst(MinTrickle))); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() { first <- th.Wait(ctx, MiB) }()
	<-queued
	clk.next(t)
	second := make(chan error, 1)
	go func() { second <- th.Wait(context.Background(), 64<<10) }()
	<-queued
	// The second waiter queues behind the first without a timer of its own.
	select {
	case d := <-clk.armed:
		t.Fatalf("a waiter behind another armed a timer (%v)", d)
	default:
	}
	if n := th.Stats().Waiting; n != 2 {
		t.Fatalf("%d waiters queued, want 2", n)
	}
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Wait returned %v", err)
	}
	// The second is first now: 64 KiB at 1 MiB/s.
	d := clk.next(t)
	if !near(d, time.Second/16) {
		t.Fatalf("second waiter armed %v, want 62.5ms", d)
	}
	clk.advance(d)
	if err := <-second; err != nil {
		t.Fatal(err)
	}
	if st := th.Stats(); st.RecoveryBytes != int64(burst(MinTrickle))+64<<10 {
		t.Fatalf("cancelled bytes were counted: %+v", st)
	}
	if err := th.Wait(ctx, 1); !errors.Is(err, context.Canceled) {
		t.Fatalf("Wait on a done context returned %v", err)
	}
}

func TestThrottleValidate(t *testing.T) {
	for _, tc := range []struct {
		cfg  ThrottleConfig
		want string // "" valid
	}{
		{ThrottleConfig{}, ""},
		{ThrottleConfig{Rate: 200 * MiB}, ""},
		{ThrottleConfig{Bandwidth: 1 << 30, Floor: 100 * MiB, Rate: 200 * MiB}, ""},
		{ThrottleConfig{Bandwidth: 1 << 30}, ""},
		{ThrottleConfig{Rate: -1}, "throttle rate -1B/s: must be between 1MiB/s and 100GiB/s (or 0 for no cap)"},
		{ThrottleConfig{Rate: 1000}, "throttle rate 1000B/s: must be between"},
		{ThrottleConfig{Rate: 101 << 30}, "throttle rate 101GiB/s: must be between"},
		{ThrottleConfig{Bandwidth: -5 * MiB}, "throttle bandwidth -5MiB/s: must be between 1MiB/s and 100GiB/s (or 0 if unknown)"},
		{ThrottleConfig{Bandwidth: 1 << 40}, "throttle bandwidth 1TiB/s"},
		{ThrottleConfig{Bandwidth: 1 << 30, Floor: -1}, "throttle floor -1B/s: must not be negative"},
		{ThrottleConfig{Floor: 100 * MiB}, "throttle floor 100MiB/s without a bandwidth"},
		{ThrottleConfig{Bandwidth: 1 << 30, Floor: 1 << 30}, "throttle floor 1GiB/s: must be below the bandwidth 1GiB/s; lower the floor or raise the bandwidth"},
		{ThrottleConfig{Bandwidth: 1 << 30, Floor: 2 << 30}, "must be below the bandwidth"},
	} {
		err := tc.cfg.Validate()
		if tc.want == "" {
			if err != nil {
				t.Errorf("%+v: %v", tc.cfg, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: got %v, want %q", tc.cfg, err, tc.want)
			continue
		}
		if _, err := NewThrottle(tc.cfg); err == nil {
			t.Errorf("NewThrottle accepted %+v", tc.cfg)
		}
		th, _ := NewThrottle(ThrottleConfig{Rate: 5 * MiB})
		if err := th.Set(tc.cfg); err == nil || th.Config() != (ThrottleConfig{Rate: 5 * MiB}) {
			t.Errorf("Set accepted %+v or changed the config", tc.cfg)
		}
	}
}

func TestThrottleForegroundAllocs(t *testing.T) {
	th, _ := NewThrottle(ThrottleConfig{Bandwidth: 1 << 30})
	if a := testing.AllocsPerRun(1000, func() { th.Foreground(4096) }); a != 0 {
		t.Fatalf("Foreground allocates %v times per call", a)
	}
}

func BenchmarkThrottleForeground(b *testing.B) {
	th, _ := NewThrottle(ThrottleConfig{Bandwidth: 1 << 30})
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			th.Foreground(4096)
		}
	})
}

package coordapi

import (
	"encoding/json"
	"fmt"
	"time"
)

// Duration is a time.Duration that travels in JSON as Go's duration text
// ("10s", "1.5s"); a bare number is read as nanoseconds.
type Duration time.Duration

// D is the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

func (d Duration) String() string { return time.Duration(d).String() }

// MarshalJSON writes the duration as text.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads "10s" or a number of nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("duration %q: %w", s, err)
		}
		*d = Duration(v)
		return nil
	}
	var n int64
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("duration: want text like \"10s\" or integer nanoseconds, got %s", b)
	}
	*d = Duration(n)
	return nil
}

// Lease holds the liveness parameters of a cell. The coordinator sends them
// in every heartbeat answer so that both sides compute with the same values.
//
// # Timing argument
//
// Let L be Duration, ρ MaxDrift (a bound on how far any clock's rate may be
// from real time: a clock advances between (1-ρ)·t and (1+ρ)·t in real time
// t), and m Margin. Every renewal is a heartbeat request that a node sends at
// its local monotonic time s, that the coordinator's leader stamps with its
// own clock at T when proposing it to raft (necessarily after s in real
// time), and that the node hears about only after it is committed.
//
//   - The node, on a successful answer, trusts its lease until its local
//     time reads NodeDeadline(s) = s + L·(1-ρ) - m. Its clock runs at least
//     at rate 1-ρ, so that local span takes at most L - m/(1-ρ) < L of real
//     time: the node stops acting on its lease strictly before
//     real(s) + L.
//   - The coordinator records CoordinatorExpiry(T) = T + L·(1+ρ) and expires
//     the node only when a tick stamped with a time at or past it is
//     applied. The leader's clock runs at most at rate 1+ρ, so that happens
//     no sooner than real(T) + L ≥ real(s) + L.
//
// Hence a node always stops acknowledging writes for the volumes it leads
// before the coordinator can expire it and promote another primary, by at
// least m plus whatever the clocks did not drift. Only a node's monotonic
// clock is used (never its wall clock), so clock steps do not matter on the
// node; the coordinator's leader keeps its own monotonic clock per term.
//
// A new leader's clock may be offset from its predecessor's, so the times in
// the replicated state are not comparable with its own. When a member
// becomes leader it therefore first commits a rebase: every live node gets a
// fresh expiry CoordinatorExpiry(T) from the new leader's clock. Every
// heartbeat committed before was sent before that leader was elected, so
// real(s) < real(T) again, and the argument holds across leader changes. The
// price is that a node that died just before a leader change is expired up
// to one lease later.
//
// Answers are taken in order: a node has at most one heartbeat in flight
// and drops an answer that arrives after it gave up on the request, so a
// late answer carrying old assignments can never be paired with a newer
// deadline.
type Lease struct {
	// Duration (L) is the nominal lease length.
	Duration Duration `json:"duration"`
	// MaxDrift (ρ) bounds the rate error of any clock in the cell, as a
	// fraction (0.01 = 1%).
	MaxDrift float64 `json:"max_drift"`
	// Margin (m) is subtracted on the node side to cover scheduling delay
	// between the lease check and the acknowledgement it guards.
	Margin Duration `json:"margin"`
	// Interval is how often a node heartbeats when nothing is happening.
	Interval Duration `json:"interval"`
}

// NodeDeadline is the local time until which a node may act on a lease
// renewed by a heartbeat it sent at sent (its monotonic clock).
func (l Lease) NodeDeadline(sent time.Time) time.Time {
	return sent.Add(time.Duration(float64(l.Duration)*(1-l.MaxDrift)) - time.Duration(l.Margin))
}

// CoordinatorExpiry is the leader-clock time at or after which the
// coordinator may expire a lease renewed by a heartbeat it stamped at.
func (l Lease) CoordinatorExpiry(at time.Time) time.Time {
	return at.Add(time.Duration(float64(l.Duration) * (1 + l.MaxDrift)))
}

// Validate checks that the parameters make the timing argument hold and
// leave a node several chances to renew before its lease lapses.
func (l Lease) Validate() error {
	switch {
	case l.Duration < Duration(time.Second) || l.Duration > Duration(10*time.Minute):
		return fmt.Errorf("lease duration %v: must be between 1s and 10m", l.Duration)
	case !(l.MaxDrift >= 0 && l.MaxDrift <= 0.1):
		return fmt.Errorf("lease max_drift %v: must be between 0 and 0.1 (10%%)", l.MaxDrift)
	case l.Margin < 0:
		return fmt.Errorf("lease margin %v: must not be negative", l.Margin)
	case float64(l.Margin) > float64(l.Duration)*(1-l.MaxDrift)/2:
		return fmt.Errorf("lease margin %v: must be at most half of duration·(1-max_drift)", l.Margin)
	case l.Interval <= 0 || l.Interval > l.Duration/3:
		return fmt.Errorf("heartbeat interval %v: must be positive and at most a third of the lease duration %v, so a node gets several tries per lease", l.Interval, l.Duration)
	}
	return nil
}

// Config is the cell-wide configuration, part of the replicated state.
type Config struct {
	Lease Lease `json:"lease"`
	// ReserveFraction of every node's capacity is kept for re-mirroring:
	// volume creation is refused before it would use it.
	ReserveFraction float64 `json:"reserve_fraction"`
	// Recovery is the storm control (grace, re-mirror limits,
	// mass-failure mode). A zero value (a configuration written before it
	// existed) means DefaultRecovery.
	Recovery RecoveryConfig `json:"recovery"`
}

// DefaultConfig: a 10 s lease, 1% clock-rate bound, 0.5 s margin, a
// heartbeat every 2 s, a 20% reserve.
//
// Why: failover takes about one lease (10.1 s at the coordinator), and the
// lease must outlast a coordinator leader election (1-3 s with raft's
// defaults) plus a couple of lost heartbeats, or every node would stop
// serving during a routine coordinator failover. A heartbeat every 2 s
// gives a node four or five tries inside its 9.4 s node-side deadline. 1%
// is far above a quartz clock's error (~50 ppm) and NTP's slew limit
// (500 ppm) and costs only 0.2 s of lease.
func DefaultConfig() Config {
	return Config{
		Lease: Lease{
			Duration: Duration(10 * time.Second),
			MaxDrift: 0.01,
			Margin:   Duration(500 * time.Millisecond),
			Interval: Duration(2 * time.Second),
		},
		ReserveFraction: 0.2,
		Recovery:        DefaultRecovery(),
	}
}

// Validate checks every field.
func (c Config) Validate() error {
	if err := c.Lease.Validate(); err != nil {
		return err
	}
	if !(c.ReserveFraction >= 0 && c.ReserveFraction <= 0.9) {
		return fmt.Errorf("reserve_fraction %v: must be between 0 and 0.9", c.ReserveFraction)
	}
	if c.Recovery != (RecoveryConfig{}) {
		if err := c.Recovery.Validate(); err != nil {
			return fmt.Errorf("recovery: %w", err)
		}
	}
	return nil
}

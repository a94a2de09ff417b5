package repl

import (
	"math/rand/v2"
	"time"
)

// backoff is exponential backoff with jitter and a cap, for reconnecting a
// lost stream: the n-th wait is drawn uniformly from [d/2, d] where
// d = min(Min * 2^n, Max). The jitter spreads the reconnects of many nodes
// that lost their peers at the same moment (a partition heals for all at
// once), so they do not arrive in lockstep.
type backoff struct {
	min, max time.Duration
	attempt  int
}

// next returns the wait before the next attempt and counts the attempt.
func (b *backoff) next() time.Duration {
	d := b.min
	for i := 0; i < b.attempt && d < b.max; i++ {
		d *= 2
	}
	if d > b.max {
		d = b.max
	}
	if b.attempt < 62 {
		b.attempt++
	}
	half := d / 2
	return half + rand.N(d-half+1)
}

func (b *backoff) reset() { b.attempt = 0 }

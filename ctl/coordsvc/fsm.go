package coordsvc

import (
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/hashicorp/raft"

	"keel/ctl/coord"
	"keel/ctl/coordapi"
)

// fsm is the raft state machine: coord.Machine behind a lock.
type fsm struct {
	log      *slog.Logger
	onResult func(coord.Op, coord.Result) // called after each apply, outside the lock

	mu sync.RWMutex // guards m
	m  *coord.Machine
}

// maxSnapshot bounds a snapshot read on restore (1 GiB).
const maxSnapshot = 1 << 30

func newFSM(cfg coordapi.Config, log *slog.Logger, onResult func(coord.Op, coord.Result)) *fsm {
	return &fsm{m: coord.New(cfg), log: log, onResult: onResult}
}

// applied is what Apply hands back through raft's ApplyFuture.
type applied struct {
	op  coord.Op
	res coord.Result
}

// Apply decodes one log entry and applies it. An entry that does not
// decode (corrupt, or from a newer version) is refused the same way on
// every member, so they stay identical.
func (f *fsm) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	c, err := coord.DecodeCommand(l.Data)
	if err != nil {
		f.log.Error("refusing a raft log entry", "index", l.Index, "err", err)
		return applied{res: coord.Result{Err: coordapi.Errorf(coordapi.CodeInternal, "log entry %d: %v", l.Index, err)}}
	}
	f.mu.Lock()
	r := f.m.Apply(c)
	f.mu.Unlock()
	if f.onResult != nil {
		f.onResult(c.Op, r)
	}
	return applied{op: c.Op, res: r}
}

// read runs fn with the machine under the read lock. fn must not retain
// the machine.
func (f *fsm) read(fn func(m *coord.Machine)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	fn(f.m)
}

// Snapshot encodes the state now (under the read lock: applies wait for
// the encoding, which is linear in the state's size).
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	b, err := f.m.MarshalSnapshot()
	f.mu.RUnlock()
	if err != nil {
		return nil, fmt.Errorf("coordsvc: encoding snapshot: %w", err)
	}
	return &fsmSnapshot{data: b}, nil
}

// Restore replaces the state with a snapshot's.
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, maxSnapshot+1))
	if err != nil {
		return fmt.Errorf("coordsvc: reading snapshot: %w", err)
	}
	if len(b) > maxSnapshot {
		return fmt.Errorf("coordsvc: snapshot larger than %d bytes", maxSnapshot)
	}
	m, err := coord.RestoreSnapshot(b)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.m = m
	f.mu.Unlock()
	return nil
}

// fsmSnapshot owns its encoded bytes.
type fsmSnapshot struct{ data []byte }

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s.data); err != nil {
		sink.Cancel()
		return fmt.Errorf("coordsvc: writing snapshot: %w", err)
	}
	return sink.Close()
}

func (s *fsmSnapshot) Release() {}

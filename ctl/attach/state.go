package attach

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// DefaultStateDir is where attach records what it attached, one JSON file
// per device (nbd0.json), plus the supervisors' log (attach.log).
const DefaultStateDir = "/run/keel/attach"

// Phase is where a device's supervisor stands.
type Phase string

const (
	// PhaseConnected: every connection of the device is up.
	PhaseConnected Phase = "connected"
	// PhaseReconnecting: at least one connection is down and the
	// supervisor is bringing it back (to the same server, or to a new
	// primary); I/O waits in the kernel.
	PhaseReconnecting Phase = "reconnecting"
	// PhaseFailed: no server could be reached within the dead-connection
	// timeout, so the kernel fails I/O with EIO; the supervisor keeps
	// trying and the device recovers when a server comes back.
	PhaseFailed Phase = "failed"
	// PhaseUnsupervised: the supervisor stopped (signal, or it exited);
	// the device stays attached but nobody reconnects it.
	PhaseUnsupervised Phase = "unsupervised"
)

// State is the record of one attached device, in DefaultStateDir/nbdN.json:
//
//	{
//	  "device": "/dev/nbd0", "index": 0, "backend": "keel:nbd://127.0.0.1:10809/v1",
//	  "volume": "", "coord": "", "addr": "127.0.0.1:10809", "export": "v1",
//	  "node": "", "epoch": 0, "connections": 4, "live": 4, "timeout_seconds": 30,
//	  "size": 1073741824, "block_size": 4096, "flags": 1389,
//	  "pid": 1234, "state": "connected", "why": "", "since": "...", "updated": "..."
//	}
//
// The file is replaced atomically (write to a temporary file, rename).
type State struct {
	Device         string    `json:"device"`
	Index          int       `json:"index"`
	Backend        string    `json:"backend"`
	Volume         string    `json:"volume,omitempty"`
	Coord          string    `json:"coord,omitempty"`
	Addr           string    `json:"addr"`
	Export         string    `json:"export"`
	Node           string    `json:"node,omitempty"`
	Epoch          uint64    `json:"epoch,omitempty"`
	Connections    int       `json:"connections"`
	Live           int       `json:"live"`
	TimeoutSeconds int       `json:"timeout_seconds"`
	Size           uint64    `json:"size"`
	BlockSize      uint32    `json:"block_size"`
	Flags          uint16    `json:"flags"`
	PID            int       `json:"pid"`
	Phase          Phase     `json:"state"`
	Why            string    `json:"why,omitempty"`
	Since          time.Time `json:"since"`
	Updated        time.Time `json:"updated"`
}

func statePath(dir string, index int) string {
	return filepath.Join(dir, fmt.Sprintf("nbd%d.json", index))
}

// writeState replaces dir/nbdN.json with st.
func writeState(dir string, st State) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("attach state: %w", err)
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("attach state: %w", err)
	}
	f, err := os.CreateTemp(dir, ".nbd*.tmp")
	if err != nil {
		return fmt.Errorf("attach state: %w", err)
	}
	_, werr := f.Write(append(b, '\n'))
	merr := f.Chmod(0o644) // readable by `keel attach --list` for anyone
	cerr := f.Close()
	if err := errors.Join(werr, merr, cerr); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("attach state: %w", err)
	}
	if err := os.Rename(f.Name(), statePath(dir, st.Index)); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("attach state: %w", err)
	}
	return nil
}

// readState reads dir/nbdN.json; a missing file is an error wrapping
// fs.ErrNotExist.
func readState(dir string, index int) (State, error) {
	var st State
	b, err := os.ReadFile(statePath(dir, index))
	if err != nil {
		return st, fmt.Errorf("attach state: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("attach state %s: %w", statePath(dir, index), err)
	}
	return st, nil
}

func removeState(dir string, index int) error {
	if err := os.Remove(statePath(dir, index)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("attach state: %w", err)
	}
	return nil
}

// readStates reads every state file in dir, ordered by device index. A
// missing directory is no states; an unreadable file is skipped and
// reported in the error list.
func readStates(dir string) ([]State, []error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, []error{fmt.Errorf("attach state: %w", err)}
	}
	var out []State
	var errs []error
	for _, e := range ents {
		var idx int
		name := e.Name()
		if !strings.HasPrefix(name, "nbd") || !strings.HasSuffix(name, ".json") {
			continue
		}
		if _, err := fmt.Sscanf(name, "nbd%d.json", &idx); err != nil {
			continue
		}
		st, err := readState(dir, idx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out, errs
}

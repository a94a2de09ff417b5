package repl

import (
	"errors"
	"fmt"
	"syscall"

	"keel/netpath/replproto"
)

// Errors a replicated operation can end with. Each op's error wraps one of
// these (errors.Is), with the detail in a *NackError or *StreamError.
var (
	// ErrClosed: the Peer or Server was closed.
	ErrClosed = errors.New("repl: closed")
	// ErrPeerDown: the peer has no stream up; the frame was not sent.
	ErrPeerDown = errors.New("repl: peer not connected")
	// ErrPeerLost: the stream failed (reset, timeout, protocol error) with
	// the frame unanswered; the peer may or may not have applied it.
	ErrPeerLost = errors.New("repl: replication stream lost")
	// ErrTimeout: a frame or ping went unanswered past the frame deadline.
	ErrTimeout = errors.New("repl: no answer within the frame deadline")
	// ErrFenced: the volume's epoch is older than one a replica has seen;
	// this node must stop acknowledging writes for the volume.
	ErrFenced = errors.New("repl: volume fenced by a newer epoch")
	// ErrUnknownVolume: the peer holds no replica of the volume. An Applier
	// returns it (wrapped) for a volume it does not hold.
	ErrUnknownVolume = errors.New("repl: unknown volume")
	// ErrBadChecksum: the payload arrived corrupted; not applied.
	ErrBadChecksum = errors.New("repl: payload checksum mismatch")
	// ErrRefused: the peer refused the frame for another reason (see
	// NackError.Reason).
	ErrRefused = errors.New("repl: frame refused by peer")
	// ErrProtocol: the other side broke the protocol; the stream is closed.
	ErrProtocol = errors.New("repl: protocol violation")
)

// NackError is a peer's refusal of one frame (a NACK), or a refusal before
// sending because the volume is already known to be fenced.
type NackError struct {
	Peer   uint64
	Volume uint64
	Seq    uint64 // 0: refused before sending
	Type   replproto.Type
	Reason replproto.Reason
	Epoch  uint64        // ReasonStaleEpoch: the replica's epoch
	Errno  syscall.Errno // ReasonIO, ReasonInvalid: the replica's errno
}

func (e *NackError) Error() string {
	s := fmt.Sprintf("repl: peer %d refused %s of volume %d (seq %d): %s", e.Peer, e.Type, e.Volume, e.Seq, e.Reason)
	switch {
	case e.Reason == replproto.ReasonStaleEpoch:
		s += fmt.Sprintf(" (replica at epoch %d)", e.Epoch)
	case e.Errno != 0:
		s += ": " + e.Errno.Error()
	}
	return s
}

// Unwrap gives the class sentinel and, for disk errors, the errno, so that
// errors.Is(err, ErrFenced) and errors.Is(err, unix.EIO) both work.
func (e *NackError) Unwrap() []error {
	var sentinel error
	switch e.Reason {
	case replproto.ReasonStaleEpoch:
		sentinel = ErrFenced
	case replproto.ReasonUnknownVolume:
		sentinel = ErrUnknownVolume
	case replproto.ReasonBadChecksum:
		sentinel = ErrBadChecksum
	default:
		sentinel = ErrRefused
	}
	if e.Errno != 0 {
		return []error{sentinel, e.Errno}
	}
	return []error{sentinel}
}

// StreamError is the failure of a whole stream to a peer: every frame
// unanswered on it fails with it.
type StreamError struct {
	Peer uint64
	Err  error // the cause: ErrTimeout, io.EOF, a *net.OpError, ErrProtocol...
}

func (e *StreamError) Error() string {
	return fmt.Sprintf("repl: stream to peer %d lost: %v", e.Peer, e.Err)
}

// Unwrap gives ErrPeerLost and the cause.
func (e *StreamError) Unwrap() []error { return []error{ErrPeerLost, e.Err} }

// Loss is what OnPeerLost reports: a peer that must be treated as out of
// sync for Volume (or for every volume it holds, when Volume is 0).
type Loss struct {
	Peer   uint64
	Volume uint64 // 0: the stream failed; every volume replicated to Peer is affected
	Err    error
}

// nackReason maps an Applier error to the NACK reason and errno a replica
// sends back.
func nackReason(err error) (replproto.Reason, syscall.Errno) {
	if errors.Is(err, ErrUnknownVolume) {
		return replproto.ReasonUnknownVolume, 0
	}
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		errno = syscall.EIO
	}
	if errno == syscall.EINVAL {
		return replproto.ReasonInvalid, errno
	}
	return replproto.ReasonIO, errno
}

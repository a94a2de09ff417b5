// Package replproto owns the wire format of keel's replication streams: the
// fixed 64-byte frame header, the frame types and their fields, the reasons a
// replica refuses a frame, and the checksums. It encodes into and decodes from
// a caller's fixed-size array without allocating; it does no I/O.
//
// A replication stream is one TCP connection from a primary node to a peer
// node. It carries frames of many volumes. The primary sends requests (HELLO,
// PING, WRITE, TRIM, ZEROES, FLUSH and the catch-up/re-mirror types); the
// peer answers each request that has a sequence number with exactly one ACK
// or NACK carrying the same sequence, in any order, and answers HELLO with
// HELLO_ACK (or NACK) and PING with PONG.
//
// # Frame
//
// Every frame is a 64-byte header, all integers little endian, followed by
// PayloadLen() bytes of payload (WRITE and the catch-up/re-mirror write types
// only; every other type has none):
//
//	 0        4   5   6       8                16               24
//	 +--------+---+---+-------+----------------+----------------+
//	 | magic  |ver|typ| flags |   volume id    |     epoch      |
//	 +--------+---+---+-------+----------------+----------------+
//	24                32               40       44       48
//	 +----------------+----------------+--------+--------+
//	 |    sequence    |     offset     | length |  pcrc  |
//	 +----------------+----------------+--------+--------+
//	48                56       60       64
//	 +----------------+--------+--------+
//	 |      aux       |  code  |  hcrc  |  payload (length bytes, data types only)
//	 +----------------+--------+--------+
//
//	magic     uint32  0x4c45454b: the bytes "KEEL" on the wire
//	ver       uint8   protocol version, Version (1)
//	typ       uint8   frame type (Type)
//	flags     uint16  FlagFUA, FlagNoHole, FlagDegraded, FlagSync (data and
//	                  range types; HELLO: FlagSplit, FlagReplies); other bits
//	                  must be zero
//	volume    uint64  the coordinator's numeric volume id (0: none)
//	epoch     uint64  requests: the sender's epoch for the volume;
//	                  ACK/NACK: the replica's highest epoch for the volume
//	sequence  uint64  per stream, assigned by the sender from 1 upwards for
//	                  every frame that occupies the in-flight window; a reply
//	                  carries the sequence of the request it answers
//	offset    uint64  byte offset in the volume
//	length    uint32  data types: payload bytes (at most MaxPayload);
//	                  TRIM, ZEROES: length of the range; others: 0
//	pcrc      uint32  CRC32C (Castagnoli) of the payload; 0 without payload
//	aux       uint64  type specific, below
//	code      uint32  NACK: the Reason; others: 0
//	hcrc      uint32  CRC32C of header bytes [0, 60)
//
// Type-specific fields:
//
//	HELLO      aux = sender's node id, offset = node id the sender expects to
//	           reach (0: any); seq 0; flags FlagSplit or FlagReplies with
//	           volume = a stream id the sender chose (below)
//	HELLO_ACK  aux = replier's node id; seq 0
//	PING/PONG  aux = sender's clock reading, echoed unchanged by PONG; seq 0
//	ACK        volume, seq of the request; epoch = replica's epoch
//	NACK       volume, seq of the request; code = Reason;
//	           ReasonStaleEpoch: epoch = the replica's (newer) epoch;
//	           ReasonIO: aux = the errno the replica's disk returned
//
// A stream is normally one connection carrying requests one way and
// replies the other. A primary that sends with MSG_ZEROCOPY splits it in
// two: the first connection's HELLO has FlagSplit and carries only
// requests; the primary then opens a second connection whose HELLO has
// FlagReplies and the same stream id, and the replica writes every reply of
// the stream there. (Zero-copy completions arrive on the sending socket's
// error queue, and Go's netpoller fails reads on a socket whose only event
// is an error-queue one, so the primary must never read the socket it sends
// zero-copy on.)
//
// Flags by type (a combination outside this table is a framing error):
//
//	                 FUA  NO_HOLE  DEGRADED  SYNC  SPLIT  REPLIES
//	WRITE            yes    -        yes     yes     -      -
//	TRIM             yes    -        yes     yes     -      -
//	ZEROES           yes   yes       yes     yes     -      -
//	HELLO             -     -         -       -     yes    yes   (not both)
//	types 32, 33     yes    -         -       -      -      -
//	others            -     -         -       -      -      -
//
// and DEGRADED never with SYNC, nor FUA with SYNC.
//
//	FUA       the data is on stable storage before the ACK
//	NO_HOLE   ZEROES must allocate, not punch a hole
//	DEGRADED  a live write sent while a member of the volume is out of sync:
//	          the replica records the range in its write-intent bitmap
//	          before applying it (DESIGN invariant 6), so that whichever
//	          in-sync replica is promoted later knows what the out-of-sync
//	          one may lack. A live write without it tells the replica the
//	          volume is fully in sync again: it clears its bitmap.
//	SYNC      a catch-up or re-mirror copy frame: the primary's data of a
//	          range read from its replica (WRITE), or a range that is all
//	          zeroes there (ZEROES), sent to a member being brought back in
//	          sync; counted apart from live writes, never FUA (the copy ends
//	          with a FLUSH)
//
// Offsets plus lengths must not overflow a uint64. Sizes: a header is 64
// bytes, so a 4 KiB write costs 1.6% framing.
//
// # Extending
//
// Catch-up and re-mirror travel as WRITE and ZEROES frames with FlagSync,
// so that the replica applies them through the same ordering as live
// writes (a copy and a live write of one range are applied in stream
// order). Types 32–47 stay reserved: TypeCatchupWrite and TypeRemirrorWrite
// are framed like WRITE so that a decoder can skip them, and a replica
// answers them NACK ReasonUnsupported without losing the stream. Any other
// unknown type is a framing error, because its payload length is unknown.
package replproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
)

const (
	// HeaderSize is the fixed size of every frame header.
	HeaderSize = 64
	// Magic is the first four header bytes ("KEEL" on the wire).
	Magic uint32 = 0x4c45454b
	// Version is the protocol version this package speaks.
	Version uint8 = 1
	// MaxPayload is the largest payload a frame may carry (the largest NBD
	// request keel accepts, and iobuf's largest buffer).
	MaxPayload = 32 << 20
)

// Type is a frame type.
type Type uint8

// Frame types. The numbering is part of the wire format.
const (
	TypeHello    Type = 1
	TypeHelloAck Type = 2
	TypePing     Type = 3
	TypePong     Type = 4
	TypeAck      Type = 5
	TypeNack     Type = 6

	TypeWrite  Type = 16 // payload: the data; FlagFUA allowed
	TypeTrim   Type = 17 // range in offset/length; FlagFUA allowed
	TypeZeroes Type = 18 // range in offset/length; FlagFUA, FlagNoHole allowed
	TypeFlush  Type = 19 // volume-wide: covers every write acknowledged before it

	// Reserved (framed like WRITE, answered ReasonUnsupported): catch-up
	// and re-mirror use WRITE and ZEROES with FlagSync.
	TypeCatchupWrite  Type = 32
	TypeRemirrorWrite Type = 33
)

var typeNames = [...]string{
	TypeHello: "HELLO", TypeHelloAck: "HELLO_ACK", TypePing: "PING", TypePong: "PONG",
	TypeAck: "ACK", TypeNack: "NACK", TypeWrite: "WRITE", TypeTrim: "TRIM",
	TypeZeroes: "ZEROES", TypeFlush: "FLUSH", TypeCatchupWrite: "CATCHUP_WRITE",
	TypeRemirrorWrite: "REMIRROR_WRITE",
}

func (t Type) String() string {
	if int(t) < len(typeNames) && typeNames[t] != "" {
		return typeNames[t]
	}
	return fmt.Sprintf("Type(%d)", uint8(t))
}

// Known reports whether t is a type of this protocol version.
func (t Type) Known() bool { return int(t) < len(typeNames) && typeNames[t] != "" }

// HasPayload reports whether frames of type t carry Length payload bytes.
func (t Type) HasPayload() bool {
	return t == TypeWrite || t == TypeCatchupWrite || t == TypeRemirrorWrite
}

// IsRequest reports whether t travels from primary to replica.
func (t Type) IsRequest() bool {
	switch t {
	case TypeHello, TypePing, TypeWrite, TypeTrim, TypeZeroes, TypeFlush, TypeCatchupWrite, TypeRemirrorWrite:
		return true
	}
	return false
}

// Windowed reports whether a request of type t takes a sequence number and
// a place in the in-flight window, and so is answered by ACK or NACK.
func (t Type) Windowed() bool { return t.IsRequest() && t != TypeHello && t != TypePing }

// HasRange reports whether offset and length name a byte range of the volume.
func (t Type) HasRange() bool {
	return t.HasPayload() || t == TypeTrim || t == TypeZeroes
}

// Flags are the header's flag bits.
type Flags uint16

const (
	// FlagFUA: the data is on stable storage before the ACK (WRITE, TRIM,
	// ZEROES and the data types).
	FlagFUA Flags = 1 << 0
	// FlagNoHole: ZEROES must allocate (not punch a hole).
	FlagNoHole Flags = 1 << 1
	// FlagSplit (HELLO): this connection carries the requests of stream
	// id volume; its replies go on the FlagReplies connection that follows.
	FlagSplit Flags = 1 << 2
	// FlagReplies (HELLO): this connection carries the replies of the split
	// stream id volume.
	FlagReplies Flags = 1 << 3
	// FlagDegraded (WRITE, TRIM, ZEROES): a live write sent while a member
	// of the volume is out of sync: the replica marks the range in its
	// write-intent bitmap before applying it.
	FlagDegraded Flags = 1 << 4
	// FlagSync (WRITE, TRIM, ZEROES): a catch-up or re-mirror copy frame.
	FlagSync Flags = 1 << 5
)

// allowedFlags returns the flags a frame of type t may carry.
func allowedFlags(t Type) Flags {
	switch {
	case t == TypeHello:
		return FlagSplit | FlagReplies
	case t == TypeZeroes:
		return FlagFUA | FlagNoHole | FlagDegraded | FlagSync
	case t == TypeWrite || t == TypeTrim:
		return FlagFUA | FlagDegraded | FlagSync
	case t.HasRange():
		return FlagFUA
	}
	return 0
}

// badCombination reports flags that are each allowed but not together.
func badCombination(f Flags) bool {
	return f&(FlagSplit|FlagReplies) == FlagSplit|FlagReplies ||
		f&FlagSync != 0 && f&(FlagDegraded|FlagFUA) != 0
}

// Reason is the code of a NACK: why the replica refused or failed a frame.
type Reason uint32

// NACK reasons. The numbering is part of the wire format.
const (
	// ReasonStaleEpoch: the frame's epoch is lower than the highest the
	// replica has seen for the volume; the NACK's epoch is that one. The
	// frame was not applied.
	ReasonStaleEpoch Reason = 1
	// ReasonIO: the replica's disk failed the operation; aux is the errno.
	ReasonIO Reason = 2
	// ReasonUnknownVolume: the replica holds no such volume.
	ReasonUnknownVolume Reason = 3
	// ReasonBadChecksum: the payload did not match pcrc; not applied.
	ReasonBadChecksum Reason = 4
	// ReasonWrongNode: HELLO named a node id other than the replier's.
	ReasonWrongNode Reason = 5
	// ReasonVersion: the replier does not speak the HELLO's version.
	ReasonVersion Reason = 6
	// ReasonUnsupported: a well-formed type the replier does not implement.
	ReasonUnsupported Reason = 7
	// ReasonShutdown: the replier is stopping; not applied.
	ReasonShutdown Reason = 8
	// ReasonInvalid: a field the replier cannot accept, e.g. a range past
	// the end of the volume (the replica returned EINVAL).
	ReasonInvalid Reason = 9
)

var reasonNames = [...]string{
	ReasonStaleEpoch: "stale epoch", ReasonIO: "I/O error", ReasonUnknownVolume: "unknown volume",
	ReasonBadChecksum: "bad payload checksum", ReasonWrongNode: "wrong node",
	ReasonVersion: "unsupported version", ReasonUnsupported: "unsupported frame type",
	ReasonShutdown: "shutting down", ReasonInvalid: "invalid request",
}

func (r Reason) String() string {
	if int(r) < len(reasonNames) && reasonNames[r] != "" {
		return reasonNames[r]
	}
	return fmt.Sprintf("Reason(%d)", uint32(r))
}

// Known reports whether r is a reason of this protocol version.
func (r Reason) Known() bool { return int(r) < len(reasonNames) && reasonNames[r] != "" }

// Header is a decoded frame header. The zero value is not a valid frame.
type Header struct {
	Type       Type
	Flags      Flags
	Volume     uint64
	Epoch      uint64
	Seq        uint64
	Offset     uint64
	Length     uint32
	PayloadCRC uint32
	Aux        uint64
	Code       Reason
}

// PayloadLen is the number of payload bytes that follow the header.
func (h *Header) PayloadLen() int {
	if h.Type.HasPayload() {
		return int(h.Length)
	}
	return 0
}

// Decode errors. Decode wraps one of these with the offending value, so
// errors.Is tells the class and the message the detail.
var (
	ErrShort          = errors.New("replproto: short header")
	ErrBadMagic       = errors.New("replproto: bad magic")
	ErrBadVersion     = errors.New("replproto: unsupported version")
	ErrHeaderChecksum = errors.New("replproto: header checksum mismatch")
	ErrUnknownType    = errors.New("replproto: unknown frame type")
	ErrBadFlags       = errors.New("replproto: flags not allowed for this type")
	ErrTooLarge       = errors.New("replproto: payload larger than MaxPayload")
	ErrBadField       = errors.New("replproto: field not valid for this type")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// PayloadCRC is the checksum a frame carries for payload p (CRC32C).
func PayloadCRC(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// UpdatePayloadCRC continues a payload checksum over more bytes, for a
// payload that is checksummed in pieces.
func UpdatePayloadCRC(crc uint32, p []byte) uint32 { return crc32.Update(crc, castagnoli, p) }

// Validate checks the fields of h against the rules of its type, as Decode
// does after the checksum. Encode does not call it: a sender encodes what
// it built, and a test may build invalid frames on purpose.
func (h *Header) Validate() error {
	t := h.Type
	if !t.Known() {
		return fmt.Errorf("%w: %d", ErrUnknownType, uint8(t))
	}
	if h.Flags&^allowedFlags(t) != 0 || badCombination(h.Flags) {
		return fmt.Errorf("%w: %s with flags %#x", ErrBadFlags, t, uint16(h.Flags))
	}
	if t == TypeHello && (h.Flags&(FlagSplit|FlagReplies) != 0) != (h.Volume != 0) {
		return fmt.Errorf("%w: HELLO stream id %d with flags %#x (a split stream needs an id, only a split stream has one)", ErrBadField, h.Volume, uint16(h.Flags))
	}
	if t.HasPayload() && h.Length > MaxPayload {
		return fmt.Errorf("%w: %s of %d bytes", ErrTooLarge, t, h.Length)
	}
	if t.HasRange() {
		if h.Offset > math.MaxUint64-uint64(h.Length) {
			return fmt.Errorf("%w: %s offset %d + length %d overflows", ErrBadField, t, h.Offset, h.Length)
		}
	} else if h.Length != 0 {
		return fmt.Errorf("%w: %s with length %d", ErrBadField, t, h.Length)
	}
	if !t.HasPayload() && h.PayloadCRC != 0 {
		return fmt.Errorf("%w: %s with payload checksum %#x but no payload", ErrBadField, t, h.PayloadCRC)
	}
	if t == TypeNack {
		if !h.Code.Known() {
			return fmt.Errorf("%w: NACK reason %d", ErrBadField, uint32(h.Code))
		}
	} else if h.Code != 0 {
		return fmt.Errorf("%w: %s with code %d", ErrBadField, t, uint32(h.Code))
	}
	if t.Windowed() || t == TypeAck || t == TypeNack {
		// Requests in the window and their replies name a sequence; HELLO's
		// NACK is the one reply with sequence 0.
		if h.Seq == 0 && t != TypeNack {
			return fmt.Errorf("%w: %s with sequence 0", ErrBadField, t)
		}
	} else if h.Seq != 0 {
		return fmt.Errorf("%w: %s with sequence %d", ErrBadField, t, h.Seq)
	}
	return nil
}

// Encode writes h as a frame header into b, with magic, version and the
// header checksum. It does not allocate and does not validate.
func (h *Header) Encode(b *[HeaderSize]byte) {
	le := binary.LittleEndian
	le.PutUint32(b[0:], Magic)
	b[4] = Version
	b[5] = byte(h.Type)
	le.PutUint16(b[6:], uint16(h.Flags))
	le.PutUint64(b[8:], h.Volume)
	le.PutUint64(b[16:], h.Epoch)
	le.PutUint64(b[24:], h.Seq)
	le.PutUint64(b[32:], h.Offset)
	le.PutUint32(b[40:], h.Length)
	le.PutUint32(b[44:], h.PayloadCRC)
	le.PutUint64(b[48:], h.Aux)
	le.PutUint32(b[56:], uint32(h.Code))
	le.PutUint32(b[60:], crc32.Checksum(b[:60], castagnoli))
}

// Decode parses and validates a frame header from b. On error h is left
// in an unspecified state. The checks run in order magic, version, header
// checksum, then the fields (Validate), so a stream that lost its framing
// reports bad magic rather than a field error. It does not allocate unless
// it returns an error.
func (h *Header) Decode(b *[HeaderSize]byte) error {
	le := binary.LittleEndian
	if m := le.Uint32(b[0:]); m != Magic {
		return fmt.Errorf("%w: %#08x", ErrBadMagic, m)
	}
	if b[4] != Version {
		return fmt.Errorf("%w: %d (speak %d)", ErrBadVersion, b[4], Version)
	}
	if got, want := crc32.Checksum(b[:60], castagnoli), le.Uint32(b[60:]); got != want {
		return fmt.Errorf("%w: computed %#08x, header says %#08x", ErrHeaderChecksum, got, want)
	}
	h.Type = Type(b[5])
	h.Flags = Flags(le.Uint16(b[6:]))
	h.Volume = le.Uint64(b[8:])
	h.Epoch = le.Uint64(b[16:])
	h.Seq = le.Uint64(b[24:])
	h.Offset = le.Uint64(b[32:])
	h.Length = le.Uint32(b[40:])
	h.PayloadCRC = le.Uint32(b[44:])
	h.Aux = le.Uint64(b[48:])
	h.Code = Reason(le.Uint32(b[56:]))
	return h.Validate()
}

// DecodeBytes is Decode for a slice; it returns ErrShort when b holds fewer
// than HeaderSize bytes and ignores bytes past HeaderSize.
func (h *Header) DecodeBytes(b []byte) error {
	if len(b) < HeaderSize {
		return fmt.Errorf("%w: %d bytes", ErrShort, len(b))
	}
	return h.Decode((*[HeaderSize]byte)(b[:HeaderSize]))
}

func (h Header) String() string {
	s := fmt.Sprintf("%s vol=%d epoch=%d seq=%d", h.Type, h.Volume, h.Epoch, h.Seq)
	if h.Type.HasRange() {
		s += fmt.Sprintf(" off=%d len=%d", h.Offset, h.Length)
	}
	if h.Flags != 0 {
		s += fmt.Sprintf(" flags=%#x", uint16(h.Flags))
	}
	if h.Type == TypeNack {
		s += fmt.Sprintf(" reason=%q aux=%d", h.Code, h.Aux)
	}
	return s
}

// Package nbdproto owns the NBD wire format: the protocol's constants and
// the encoders and decoders of its handshake and transmission messages, as
// set out in the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md).
// It does no I/O; netpath/nbd (the server) and keel's tests build on it.
//
// All integers are big-endian. Fixed newstyle handshake:
//
//	S: greeting (18 bytes)
//	+----------------------+----------------------+-----------------+
//	| NBDMAGIC (8)         | IHAVEOPT (8)         | hs flags (2)    |
//	+----------------------+----------------------+-----------------+
//	C: client flags (4)
//	C: option (16 + length)
//	+----------------------+--------------+--------------+--------------+
//	| IHAVEOPT (8)         | option (4)   | length (4)   | data ...     |
//	+----------------------+--------------+--------------+--------------+
//	S: option reply (20 + length)
//	+----------------------+--------------+--------------+--------------+-------------+
//	| 0x3e889045565a9 (8)  | option (4)   | reply (4)    | length (4)   | data ...    |
//	+----------------------+--------------+--------------+--------------+-------------+
//	S: reply to NBD_OPT_EXPORT_NAME (10, or 134 without NO_ZEROES)
//	| export size (8) | transmission flags (2) | 124 zero bytes |
//
// Option payloads parsed here:
//
//	NBD_OPT_INFO / NBD_OPT_GO:
//	| name length (4) | name | n (2) | n x info type (2) |
//	NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT:
//	| name length (4) | name | n (4) | n x ( query length (4) | query ) |
//
// Transmission phase, request (28 bytes, then length bytes of data for
// NBD_CMD_WRITE):
//
//	 0               4       6       8                       16                      24              28
//	+---------------+-------+-------+-----------------------+-----------------------+---------------+
//	| 0x25609513    | flags | type  | handle                | offset                | length        |
//	+---------------+-------+-------+-----------------------+-----------------------+---------------+
//
// Simple reply (16 bytes, then the data of a successful NBD_CMD_READ):
//
//	 0               4               8                       16
//	+---------------+---------------+-----------------------+
//	| 0x67446698    | error         | handle                |
//	+---------------+---------------+-----------------------+
//
// Structured reply chunk (20 bytes, then length bytes of payload):
//
//	 0               4       6       8                       16              20
//	+---------------+-------+-------+-----------------------+---------------+
//	| 0x668e33ef    | flags | type  | handle                | length        |
//	+---------------+-------+-------+-----------------------+---------------+
//
// Chunk payloads:
//
//	NBD_REPLY_TYPE_OFFSET_DATA:  | offset (8) | data (length - 8) |
//	NBD_REPLY_TYPE_OFFSET_HOLE:  | offset (8) | hole size (4) |
//	NBD_REPLY_TYPE_BLOCK_STATUS: | context id (4) | n x ( extent length (4) | status flags (4) ) |
//	NBD_REPLY_TYPE_ERROR:        | error (4) | message length (2) | message |
//	NBD_REPLY_TYPE_ERROR_OFFSET: | error (4) | message length (2) | message | offset (8) |
//
// Extended headers (NBD_OPT_EXTENDED_HEADERS, 32-byte requests, 64-bit
// lengths) are not part of keel's protocol: their constants are here so
// that the server can name what it refuses.
package nbdproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
)

// Magic numbers.
const (
	// Magic ("NBDMAGIC") opens the server greeting.
	Magic uint64 = 0x4e42444d41474943
	// OptMagic ("IHAVEOPT") follows Magic in the greeting and opens every
	// option the client sends.
	OptMagic uint64 = 0x49484156454F5054
	// OptReplyMagic opens every option reply.
	OptReplyMagic uint64 = 0x3e889045565a9
	// RequestMagic opens every transmission request.
	RequestMagic uint32 = 0x25609513
	// SimpleReplyMagic opens a simple reply.
	SimpleReplyMagic uint32 = 0x67446698
	// StructuredReplyMagic opens a structured reply chunk.
	StructuredReplyMagic uint32 = 0x668e33ef
)

// Sizes of the fixed parts of messages, in bytes.
const (
	GreetingSize          = 18  // Magic, OptMagic, handshake flags
	OptionHeaderSize      = 16  // OptMagic, option, length
	OptionReplyHeaderSize = 20  // OptReplyMagic, option, reply type, length
	ExportNameReplySize   = 10  // size, transmission flags (zeroes not counted)
	ExportNameZeroes      = 124 // zero padding after ExportNameReply without NO_ZEROES
	RequestSize           = 28
	SimpleReplySize       = 16
	ChunkHeaderSize       = 20
	BlockDescriptorSize   = 8
	ErrorPayloadSize      = 6 // error, message length (before the message)
	OffsetDataHeaderSize  = 8 // offset before the data of NBD_REPLY_TYPE_OFFSET_DATA
	MaxStringLength       = 4096
)

// HandshakeFlags are the 16 bits the server sends in its greeting.
type HandshakeFlags uint16

// Handshake flags.
const (
	FlagFixedNewstyle HandshakeFlags = 1 << 0
	FlagNoZeroes      HandshakeFlags = 1 << 1
)

// ClientFlags are the 32 bits the client answers the greeting with.
type ClientFlags uint32

// Client flags.
const (
	FlagCFixedNewstyle ClientFlags = 1 << 0
	FlagCNoZeroes      ClientFlags = 1 << 1
)

// TransmissionFlags describe an export and the features the server exposes.
type TransmissionFlags uint16

// Transmission flags.
const (
	FlagHasFlags         TransmissionFlags = 1 << 0
	FlagReadOnly         TransmissionFlags = 1 << 1
	FlagSendFlush        TransmissionFlags = 1 << 2
	FlagSendFUA          TransmissionFlags = 1 << 3
	FlagRotational       TransmissionFlags = 1 << 4
	FlagSendTrim         TransmissionFlags = 1 << 5
	FlagSendWriteZeroes  TransmissionFlags = 1 << 6
	FlagSendDF           TransmissionFlags = 1 << 7
	FlagCanMultiConn     TransmissionFlags = 1 << 8
	FlagSendResize       TransmissionFlags = 1 << 9
	FlagSendCache        TransmissionFlags = 1 << 10
	FlagSendFastZero     TransmissionFlags = 1 << 11
	FlagBlockStatPayload TransmissionFlags = 1 << 12
)

// Option is an option type sent during the handshake.
type Option uint32

// Options.
const (
	OptExportName      Option = 1
	OptAbort           Option = 2
	OptList            Option = 3
	OptPeekExport      Option = 4 // withdrawn
	OptStartTLS        Option = 5
	OptInfo            Option = 6
	OptGo              Option = 7
	OptStructuredReply Option = 8
	OptListMetaContext Option = 9
	OptSetMetaContext  Option = 10
	OptExtendedHeaders Option = 11
)

var optNames = map[Option]string{
	OptExportName: "EXPORT_NAME", OptAbort: "ABORT", OptList: "LIST",
	OptPeekExport: "PEEK_EXPORT", OptStartTLS: "STARTTLS", OptInfo: "INFO",
	OptGo: "GO", OptStructuredReply: "STRUCTURED_REPLY",
	OptListMetaContext: "LIST_META_CONTEXT", OptSetMetaContext: "SET_META_CONTEXT",
	OptExtendedHeaders: "EXTENDED_HEADERS",
}

func (o Option) String() string {
	if s, ok := optNames[o]; ok {
		return "NBD_OPT_" + s
	}
	return "NBD_OPT(" + strconv.FormatUint(uint64(o), 10) + ")"
}

// Rep is an option reply type. Error replies have bit 31 set.
type Rep uint32

// Option reply types.
const (
	RepAck         Rep = 1
	RepServer      Rep = 2
	RepInfo        Rep = 3
	RepMetaContext Rep = 4

	repErr              Rep = 1 << 31
	RepErrUnsup         Rep = repErr + 1
	RepErrPolicy        Rep = repErr + 2
	RepErrInvalid       Rep = repErr + 3
	RepErrPlatform      Rep = repErr + 4
	RepErrTLSReqd       Rep = repErr + 5
	RepErrUnknown       Rep = repErr + 6
	RepErrShutdown      Rep = repErr + 7
	RepErrBlockSizeReqd Rep = repErr + 8
	RepErrTooBig        Rep = repErr + 9
	RepErrExtHeaderReqd Rep = repErr + 10
)

// IsError reports whether r is an error reply.
func (r Rep) IsError() bool { return r&repErr != 0 }

var repNames = map[Rep]string{
	RepAck: "ACK", RepServer: "SERVER", RepInfo: "INFO", RepMetaContext: "META_CONTEXT",
	RepErrUnsup: "ERR_UNSUP", RepErrPolicy: "ERR_POLICY", RepErrInvalid: "ERR_INVALID",
	RepErrPlatform: "ERR_PLATFORM", RepErrTLSReqd: "ERR_TLS_REQD", RepErrUnknown: "ERR_UNKNOWN",
	RepErrShutdown: "ERR_SHUTDOWN", RepErrBlockSizeReqd: "ERR_BLOCK_SIZE_REQD",
	RepErrTooBig: "ERR_TOO_BIG", RepErrExtHeaderReqd: "ERR_EXT_HEADER_REQD",
}

func (r Rep) String() string {
	if s, ok := repNames[r]; ok {
		return "NBD_REP_" + s
	}
	return "NBD_REP(" + strconv.FormatUint(uint64(r), 16) + ")"
}

// InfoType is an information item of NBD_OPT_INFO and NBD_OPT_GO.
type InfoType uint16

// Information types.
const (
	InfoExport      InfoType = 0
	InfoName        InfoType = 1
	InfoDescription InfoType = 2
	InfoBlockSize   InfoType = 3
)

// Cmd is a transmission request type.
type Cmd uint16

// Commands.
const (
	CmdRead        Cmd = 0
	CmdWrite       Cmd = 1
	CmdDisc        Cmd = 2
	CmdFlush       Cmd = 3
	CmdTrim        Cmd = 4
	CmdCache       Cmd = 5
	CmdWriteZeroes Cmd = 6
	CmdBlockStatus Cmd = 7
	CmdResize      Cmd = 8 // experimental RESIZE extension; keel does not implement it
)

var cmdNames = [...]string{"read", "write", "disc", "flush", "trim", "cache", "write_zeroes", "block_status", "resize"}

// String returns the command's lower-case name ("read", "write_zeroes"),
// the form keel uses in metric labels, or "unknown".
func (c Cmd) String() string {
	if int(c) < len(cmdNames) {
		return cmdNames[c]
	}
	return "unknown"
}

// CmdFlags are the 16 command flag bits of a request.
type CmdFlags uint16

// Command flags.
const (
	CmdFlagFUA        CmdFlags = 1 << 0
	CmdFlagNoHole     CmdFlags = 1 << 1
	CmdFlagDF         CmdFlags = 1 << 2
	CmdFlagReqOne     CmdFlags = 1 << 3
	CmdFlagFastZero   CmdFlags = 1 << 4
	CmdFlagPayloadLen CmdFlags = 1 << 5 // extended headers only
)

// ReplyType is the type of a structured reply chunk. Error chunks have
// bit 15 set.
type ReplyType uint16

// Structured reply chunk types.
const (
	ReplyTypeNone           ReplyType = 0
	ReplyTypeOffsetData     ReplyType = 1
	ReplyTypeOffsetHole     ReplyType = 2
	ReplyTypeBlockStatus    ReplyType = 5
	ReplyTypeBlockStatusExt ReplyType = 6 // extended headers only
	ReplyTypeError          ReplyType = 1<<15 + 1
	ReplyTypeErrorOffset    ReplyType = 1<<15 + 2
)

// IsError reports whether t is an error chunk type.
func (t ReplyType) IsError() bool { return t&(1<<15) != 0 }

// ReplyFlagDone marks the final chunk of a structured reply.
const ReplyFlagDone uint16 = 1 << 0

// Status flags of the base:allocation metadata context.
const (
	StateHole uint32 = 1 << 0
	StateZero uint32 = 1 << 1
)

// ContextBaseAllocation is the one metadata context the protocol defines.
const ContextBaseAllocation = "base:allocation"

// Errno is an NBD error value. The protocol fixes these numbers; they match
// Linux's errno values of the same names.
type Errno uint32

// Error values.
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

// Errnos lists every defined error value, in numeric order.
var Errnos = [...]Errno{EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}

// String returns the errno's name ("EINVAL"), the form keel uses in metric
// labels, or "E<number>" for an undefined value.
func (e Errno) String() string {
	switch e {
	case 0:
		return "OK"
	case EPERM:
		return "EPERM"
	case EIO:
		return "EIO"
	case ENOMEM:
		return "ENOMEM"
	case EINVAL:
		return "EINVAL"
	case ENOSPC:
		return "ENOSPC"
	case EOVERFLOW:
		return "EOVERFLOW"
	case ENOTSUP:
		return "ENOTSUP"
	case ESHUTDOWN:
		return "ESHUTDOWN"
	}
	return "E" + strconv.FormatUint(uint64(e), 10)
}

// Errors returned by the decoders.
var (
	ErrBadMagic  = errors.New("nbdproto: bad magic")
	ErrShort     = errors.New("nbdproto: message too short")
	ErrMalformed = errors.New("nbdproto: malformed option payload")
	ErrTooLong   = errors.New("nbdproto: string longer than 4096 bytes")
)

var be = binary.BigEndian

// Request is a decoded transmission request header.
type Request struct {
	Flags  CmdFlags
	Type   Cmd
	Handle uint64
	Offset uint64
	Length uint32
}

// DecodeRequest decodes a request header. The only error is ErrBadMagic:
// every other field value is representable and validated by the server.
// It does not allocate.
func DecodeRequest(b *[RequestSize]byte) (Request, error) {
	if be.Uint32(b[0:4]) != RequestMagic {
		return Request{}, ErrBadMagic
	}
	return Request{
		Flags:  CmdFlags(be.Uint16(b[4:6])),
		Type:   Cmd(be.Uint16(b[6:8])),
		Handle: be.Uint64(b[8:16]),
		Offset: be.Uint64(b[16:24]),
		Length: be.Uint32(b[24:28]),
	}, nil
}

// Encode writes the request header into b.
func (r Request) Encode(b *[RequestSize]byte) {
	be.PutUint32(b[0:4], RequestMagic)
	be.PutUint16(b[4:6], uint16(r.Flags))
	be.PutUint16(b[6:8], uint16(r.Type))
	be.PutUint64(b[8:16], r.Handle)
	be.PutUint64(b[16:24], r.Offset)
	be.PutUint32(b[24:28], r.Length)
}

// PutSimpleReply writes a simple reply header into b[:SimpleReplySize].
func PutSimpleReply(b []byte, errno Errno, handle uint64) {
	_ = b[SimpleReplySize-1]
	be.PutUint32(b[0:4], SimpleReplyMagic)
	be.PutUint32(b[4:8], uint32(errno))
	be.PutUint64(b[8:16], handle)
}

// SimpleReply is a decoded simple reply header.
type SimpleReply struct {
	Errno  Errno
	Handle uint64
}

// DecodeSimpleReply decodes a simple reply header from b[:SimpleReplySize].
func DecodeSimpleReply(b []byte) (SimpleReply, error) {
	if len(b) < SimpleReplySize {
		return SimpleReply{}, ErrShort
	}
	if be.Uint32(b[0:4]) != SimpleReplyMagic {
		return SimpleReply{}, ErrBadMagic
	}
	return SimpleReply{Errno: Errno(be.Uint32(b[4:8])), Handle: be.Uint64(b[8:16])}, nil
}

// ChunkHeader is a structured reply chunk header.
type ChunkHeader struct {
	Flags  uint16
	Type   ReplyType
	Handle uint64
	Length uint32
}

// PutChunkHeader writes a structured reply chunk header into
// b[:ChunkHeaderSize].
func PutChunkHeader(b []byte, h ChunkHeader) {
	_ = b[ChunkHeaderSize-1]
	be.PutUint32(b[0:4], StructuredReplyMagic)
	be.PutUint16(b[4:6], h.Flags)
	be.PutUint16(b[6:8], uint16(h.Type))
	be.PutUint64(b[8:16], h.Handle)
	be.PutUint32(b[16:20], h.Length)
}

// DecodeChunkHeader decodes a structured reply chunk header from
// b[:ChunkHeaderSize].
func DecodeChunkHeader(b []byte) (ChunkHeader, error) {
	if len(b) < ChunkHeaderSize {
		return ChunkHeader{}, ErrShort
	}
	if be.Uint32(b[0:4]) != StructuredReplyMagic {
		return ChunkHeader{}, ErrBadMagic
	}
	return ChunkHeader{
		Flags:  be.Uint16(b[4:6]),
		Type:   ReplyType(be.Uint16(b[6:8])),
		Handle: be.Uint64(b[8:16]),
		Length: be.Uint32(b[16:20]),
	}, nil
}

// PutErrorPayload writes the fixed part of an error chunk payload (error,
// message length) into b[:ErrorPayloadSize]; the message follows it.
func PutErrorPayload(b []byte, errno Errno, msgLen int) {
	_ = b[ErrorPayloadSize-1]
	be.PutUint32(b[0:4], uint32(errno))
	be.PutUint16(b[4:6], uint16(msgLen))
}

// PutBlockDescriptor writes one block status descriptor into
// b[:BlockDescriptorSize].
func PutBlockDescriptor(b []byte, length, status uint32) {
	_ = b[BlockDescriptorSize-1]
	be.PutUint32(b[0:4], length)
	be.PutUint32(b[4:8], status)
}

// BlockDescriptor is one extent of a block status reply.
type BlockDescriptor struct {
	Length uint32
	Status uint32
}

// DecodeBlockStatus decodes a NBD_REPLY_TYPE_BLOCK_STATUS payload.
func DecodeBlockStatus(p []byte) (contextID uint32, descs []BlockDescriptor, err error) {
	if len(p) < 4+BlockDescriptorSize || (len(p)-4)%BlockDescriptorSize != 0 {
		return 0, nil, fmt.Errorf("%w: block status payload of %d bytes", ErrMalformed, len(p))
	}
	contextID = be.Uint32(p[0:4])
	for q := p[4:]; len(q) > 0; q = q[BlockDescriptorSize:] {
		descs = append(descs, BlockDescriptor{Length: be.Uint32(q[0:4]), Status: be.Uint32(q[4:8])})
	}
	return contextID, descs, nil
}

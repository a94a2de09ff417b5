package nbdkernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// Transmission flags a server advertises for an export (NBD protocol,
// "Transmission flags"). The kernel acts on READ_ONLY, SEND_FLUSH,
// SEND_FUA, SEND_TRIM, CAN_MULTI_CONN (and, on newer kernels, a few more).
const (
	FlagHasFlags           uint16 = 1 << 0
	FlagReadOnly           uint16 = 1 << 1
	FlagSendFlush          uint16 = 1 << 2
	FlagSendFUA            uint16 = 1 << 3
	FlagRotational         uint16 = 1 << 4
	FlagSendTrim           uint16 = 1 << 5
	FlagSendWriteZeroes    uint16 = 1 << 6
	FlagSendDF             uint16 = 1 << 7
	FlagCanMultiConn       uint16 = 1 << 8
	FlagSendResize         uint16 = 1 << 9
	FlagSendCache          uint16 = 1 << 10
	FlagSendFastZero       uint16 = 1 << 11
	FlagBlockStatusPayload uint16 = 1 << 12
)

// Handshake constants go-nbd's protocol package does not define.
const (
	hsFlagNoZeroes      = 1 << 1 // NBD_FLAG_NO_ZEROES (server) / NBD_FLAG_C_NO_ZEROES (client)
	optExportName       = 1      // NBD_OPT_EXPORT_NAME
	repFlagError        = 1 << 31
	repErrUnsup         = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	oldstyleMagic       = 0x00420281861253 // the second magic of an oldstyle server
	maxOptionReplyBytes = 64 << 10         // longer replies are refused, not buffered
	exportNameZeroes    = 124
)

// Export is what a server said about an export during the handshake.
type Export struct {
	Name string
	Size uint64
	// Flags are the transmission flags (FlagSendFlush, FlagCanMultiConn...).
	Flags uint16
	// MinBlock, PrefBlock and MaxBlock are the server's block size
	// constraints (NBD_INFO_BLOCK_SIZE); all zero when it sent none.
	MinBlock, PrefBlock, MaxBlock uint32
}

// KernelBlockSize is the logical block size to give the kernel: the
// server's preferred block size clamped to what kernel 6.1 accepts
// (512..4096, a power of two) and never below the server's minimum; 4096
// when the server states no preference and the size allows it.
func (e Export) KernelBlockSize() (uint32, error) {
	bs := uint32(4096)
	if e.PrefBlock != 0 {
		bs = e.PrefBlock
	} else if e.Size%4096 != 0 {
		bs = 512
	}
	bs = max(min(bs, 4096), 512)
	if bs&(bs-1) != 0 {
		return 0, fmt.Errorf("export %q: preferred block size %d is not a power of two", e.Name, e.PrefBlock)
	}
	if e.MinBlock > bs {
		return 0, fmt.Errorf("export %q: minimum block size %d is above the kernel's limit of 4096", e.Name, e.MinBlock)
	}
	if e.MaxBlock != 0 && e.MaxBlock < bs {
		return 0, fmt.Errorf("export %q: maximum block size %d is below the block size %d", e.Name, e.MaxBlock, bs)
	}
	return bs, nil
}

// ReplyError is a refusal the server sent during option haggling
// (NBD_REP_ERR_*), with its message.
type ReplyError struct {
	Option uint32
	Reply  uint32
	Msg    string
}

var replyErrorNames = map[uint32]string{
	repFlagError | 1:  "NBD_REP_ERR_UNSUP",
	repFlagError | 2:  "NBD_REP_ERR_POLICY",
	repFlagError | 3:  "NBD_REP_ERR_INVALID",
	repFlagError | 4:  "NBD_REP_ERR_PLATFORM",
	repFlagError | 5:  "NBD_REP_ERR_TLS_REQD",
	repFlagError | 6:  "NBD_REP_ERR_UNKNOWN",
	repFlagError | 7:  "NBD_REP_ERR_SHUTDOWN",
	repFlagError | 8:  "NBD_REP_ERR_BLOCK_SIZE_REQD",
	repFlagError | 9:  "NBD_REP_ERR_TOO_BIG",
	repFlagError | 10: "NBD_REP_ERR_EXT_HEADER_REQD",
}

func (e *ReplyError) Error() string {
	name, ok := replyErrorNames[e.Reply]
	if !ok {
		name = fmt.Sprintf("error reply %#x", e.Reply)
	}
	if e.Reply == protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN {
		name += " (no such export)"
	}
	if e.Msg != "" {
		return fmt.Sprintf("nbd handshake: server refused option %d: %s: %s", e.Option, name, e.Msg)
	}
	return fmt.Sprintf("nbd handshake: server refused option %d: %s", e.Option, name)
}

// ErrProtocol marks a server that broke the handshake protocol.
var ErrProtocol = errors.New("nbd handshake: protocol violation")

// Handshake runs the client side of the fixed newstyle handshake on rw and
// leaves the connection at the start of the transmission phase, ready for
// the kernel. It asks with NBD_OPT_GO for the export and its block size
// constraints and falls back to NBD_OPT_EXPORT_NAME when the server does
// not know NBD_OPT_GO. It reads exactly what the server sends and nothing
// beyond the end of the handshake, so rw must not be buffered.
//
// The exchange:
//
//	S: NBDMAGIC (8) | IHAVEOPT (8) | handshake flags (2)
//	C: client flags (4): FIXED_NEWSTYLE, and NO_ZEROES if offered
//	C: IHAVEOPT (8) | NBD_OPT_GO (4) | length (4) | name length (4) | name | 1 (2) | NBD_INFO_BLOCK_SIZE (2)
//	S: reply magic (8) | option (4) | reply type (4) | length (4) | data   ... until NBD_REP_ACK
//	   NBD_REP_INFO data: NBD_INFO_EXPORT (2) | size (8) | flags (2)
//	                      NBD_INFO_BLOCK_SIZE (2) | min (4) | preferred (4) | max (4)
//
// Errors: *ReplyError for a refusal, an error wrapping ErrProtocol for a
// malformed answer, else the I/O error.
func Handshake(rw io.ReadWriter, export string) (Export, error) {
	if len(export) > 4096 {
		return Export{}, fmt.Errorf("nbd handshake: export name of %d bytes is longer than 4096", len(export))
	}
	var greet [18]byte
	if _, err := io.ReadFull(rw, greet[:]); err != nil {
		return Export{}, fmt.Errorf("nbd handshake: reading the greeting: %w", err)
	}
	if m := binary.BigEndian.Uint64(greet[0:8]); m != protocol.NEGOTIATION_MAGIC_OLDSTYLE {
		return Export{}, fmt.Errorf("%w: greeting magic %#x is not NBDMAGIC", ErrProtocol, m)
	}
	switch m := binary.BigEndian.Uint64(greet[8:16]); m {
	case protocol.NEGOTIATION_MAGIC_OPTION:
	case oldstyleMagic:
		return Export{}, fmt.Errorf("%w: the server speaks the oldstyle handshake, which has no export names", ErrProtocol)
	default:
		return Export{}, fmt.Errorf("%w: greeting magic %#x is not IHAVEOPT", ErrProtocol, m)
	}
	hsFlags := binary.BigEndian.Uint16(greet[16:18])
	if hsFlags&protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE == 0 {
		return Export{}, fmt.Errorf("%w: the server does not offer the fixed newstyle handshake", ErrProtocol)
	}
	clientFlags := uint32(protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE)
	noZeroes := hsFlags&hsFlagNoZeroes != 0
	if noZeroes {
		clientFlags |= hsFlagNoZeroes
	}

	// Client flags and the NBD_OPT_GO request in one write.
	req := binary.BigEndian.AppendUint32(nil, clientFlags)
	req = appendGo(req, export)
	if _, err := rw.Write(req); err != nil {
		return Export{}, fmt.Errorf("nbd handshake: sending NBD_OPT_GO: %w", err)
	}

	e := Export{Name: export}
	haveExport := false
	for {
		typ, data, err := readOptionReply(rw, protocol.NEGOTIATION_ID_OPTION_GO)
		if err != nil {
			return Export{}, err
		}
		switch {
		case typ == protocol.NEGOTIATION_TYPE_REPLY_INFO:
			if len(data) < 2 {
				return Export{}, fmt.Errorf("%w: NBD_REP_INFO of %d bytes", ErrProtocol, len(data))
			}
			switch binary.BigEndian.Uint16(data[0:2]) {
			case protocol.NEGOTIATION_TYPE_INFO_EXPORT:
				if len(data) != 12 {
					return Export{}, fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes, want 12", ErrProtocol, len(data))
				}
				e.Size = binary.BigEndian.Uint64(data[2:10])
				e.Flags = binary.BigEndian.Uint16(data[10:12])
				haveExport = true
			case protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE:
				if len(data) != 14 {
					return Export{}, fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes, want 14", ErrProtocol, len(data))
				}
				e.MinBlock = binary.BigEndian.Uint32(data[2:6])
				e.PrefBlock = binary.BigEndian.Uint32(data[6:10])
				e.MaxBlock = binary.BigEndian.Uint32(data[10:14])
			default:
				// NBD_INFO_NAME, NBD_INFO_DESCRIPTION and anything newer:
				// the protocol says to ignore what we do not use.
			}
		case typ == protocol.NEGOTIATION_TYPE_REPLY_ACK:
			if !haveExport {
				return Export{}, fmt.Errorf("%w: NBD_REP_ACK to NBD_OPT_GO without NBD_INFO_EXPORT", ErrProtocol)
			}
			return e, e.check()
		case typ == repErrUnsup:
			// A server without NBD_OPT_GO: the old way, which ends the
			// handshake on success and hangs up on failure.
			return exportName(rw, export, noZeroes)
		case typ&repFlagError != 0:
			return Export{}, &ReplyError{Option: protocol.NEGOTIATION_ID_OPTION_GO, Reply: typ, Msg: printable(data)}
		default:
			return Export{}, fmt.Errorf("%w: reply type %#x to NBD_OPT_GO", ErrProtocol, typ)
		}
	}
}

func appendGo(b []byte, export string) []byte {
	b = binary.BigEndian.AppendUint64(b, protocol.NEGOTIATION_MAGIC_OPTION)
	b = binary.BigEndian.AppendUint32(b, protocol.NEGOTIATION_ID_OPTION_GO)
	b = binary.BigEndian.AppendUint32(b, uint32(4+len(export)+2+2))
	b = binary.BigEndian.AppendUint32(b, uint32(len(export)))
	b = append(b, export...)
	b = binary.BigEndian.AppendUint16(b, 1)
	b = binary.BigEndian.AppendUint16(b, protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE)
	return b
}

// readOptionReply reads one option reply header and its data.
func readOptionReply(r io.Reader, option uint32) (uint32, []byte, error) {
	var h [20]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("nbd handshake: reading an option reply: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[0:8]); m != protocol.NEGOTIATION_MAGIC_REPLY {
		return 0, nil, fmt.Errorf("%w: option reply magic %#x", ErrProtocol, m)
	}
	if o := binary.BigEndian.Uint32(h[8:12]); o != option {
		return 0, nil, fmt.Errorf("%w: reply to option %d while %d was asked", ErrProtocol, o, option)
	}
	typ := binary.BigEndian.Uint32(h[12:16])
	n := binary.BigEndian.Uint32(h[16:20])
	if n > maxOptionReplyBytes {
		return 0, nil, fmt.Errorf("%w: option reply of %d bytes (limit %d)", ErrProtocol, n, maxOptionReplyBytes)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(r, data); err != nil {
		return 0, nil, fmt.Errorf("nbd handshake: reading option reply data: %w", err)
	}
	return typ, data, nil
}

// exportName ends the handshake with NBD_OPT_EXPORT_NAME:
//
//	C: IHAVEOPT (8) | NBD_OPT_EXPORT_NAME (4) | length (4) | name
//	S: size (8) | flags (2) | 124 zero bytes unless NO_ZEROES was agreed
func exportName(rw io.ReadWriter, export string, noZeroes bool) (Export, error) {
	b := binary.BigEndian.AppendUint64(nil, protocol.NEGOTIATION_MAGIC_OPTION)
	b = binary.BigEndian.AppendUint32(b, optExportName)
	b = binary.BigEndian.AppendUint32(b, uint32(len(export)))
	b = append(b, export...)
	if _, err := rw.Write(b); err != nil {
		return Export{}, fmt.Errorf("nbd handshake: sending NBD_OPT_EXPORT_NAME: %w", err)
	}
	n := 10
	if !noZeroes {
		n += exportNameZeroes
	}
	reply := make([]byte, n)
	if _, err := io.ReadFull(rw, reply); err != nil {
		return Export{}, fmt.Errorf("nbd handshake: reading the NBD_OPT_EXPORT_NAME reply (the server hangs up on an unknown export): %w", err)
	}
	e := Export{
		Name:  export,
		Size:  binary.BigEndian.Uint64(reply[0:8]),
		Flags: binary.BigEndian.Uint16(reply[8:10]),
	}
	return e, e.check()
}

func (e Export) check() error {
	if e.Size == 0 {
		return fmt.Errorf("%w: export %q has size 0", ErrProtocol, e.Name)
	}
	if e.Size > 1<<62 {
		return fmt.Errorf("%w: export %q claims %d bytes", ErrProtocol, e.Name, e.Size)
	}
	return nil
}

// printable keeps a server's message readable and short.
func printable(b []byte) string {
	const limit = 256
	if len(b) > limit {
		b = b[:limit]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || r == 0xfffd {
			return '?'
		}
		return r
	}, string(b))
}

package nbdproto

import "fmt"

// PutGreeting writes the server greeting (Magic, OptMagic, handshake flags)
// into b[:GreetingSize].
func PutGreeting(b []byte, flags HandshakeFlags) {
	_ = b[GreetingSize-1]
	be.PutUint64(b[0:8], Magic)
	be.PutUint64(b[8:16], OptMagic)
	be.PutUint16(b[16:18], uint16(flags))
}

// DecodeGreeting decodes the server greeting.
func DecodeGreeting(b []byte) (HandshakeFlags, error) {
	if len(b) < GreetingSize {
		return 0, ErrShort
	}
	if be.Uint64(b[0:8]) != Magic || be.Uint64(b[8:16]) != OptMagic {
		return 0, ErrBadMagic
	}
	return HandshakeFlags(be.Uint16(b[16:18])), nil
}

// OptionHeader is the fixed part of an option sent by the client.
type OptionHeader struct {
	Option Option
	Length uint32 // of the option data that follows
}

// DecodeOptionHeader decodes an option header from b[:OptionHeaderSize].
func DecodeOptionHeader(b []byte) (OptionHeader, error) {
	if len(b) < OptionHeaderSize {
		return OptionHeader{}, ErrShort
	}
	if be.Uint64(b[0:8]) != OptMagic {
		return OptionHeader{}, ErrBadMagic
	}
	return OptionHeader{Option: Option(be.Uint32(b[8:12])), Length: be.Uint32(b[12:16])}, nil
}

// AppendOption appends an option with its data to dst (client side).
func AppendOption(dst []byte, opt Option, data []byte) []byte {
	dst = be.AppendUint64(dst, OptMagic)
	dst = be.AppendUint32(dst, uint32(opt))
	dst = be.AppendUint32(dst, uint32(len(data)))
	return append(dst, data...)
}

// OptionReplyHeader is the fixed part of an option reply.
type OptionReplyHeader struct {
	Option Option
	Reply  Rep
	Length uint32
}

// AppendOptionReply appends an option reply carrying payload to dst.
func AppendOptionReply(dst []byte, opt Option, rep Rep, payload []byte) []byte {
	dst = be.AppendUint64(dst, OptReplyMagic)
	dst = be.AppendUint32(dst, uint32(opt))
	dst = be.AppendUint32(dst, uint32(rep))
	dst = be.AppendUint32(dst, uint32(len(payload)))
	return append(dst, payload...)
}

// DecodeOptionReplyHeader decodes an option reply header from
// b[:OptionReplyHeaderSize].
func DecodeOptionReplyHeader(b []byte) (OptionReplyHeader, error) {
	if len(b) < OptionReplyHeaderSize {
		return OptionReplyHeader{}, ErrShort
	}
	if be.Uint64(b[0:8]) != OptReplyMagic {
		return OptionReplyHeader{}, ErrBadMagic
	}
	return OptionReplyHeader{
		Option: Option(be.Uint32(b[8:12])),
		Reply:  Rep(be.Uint32(b[12:16])),
		Length: be.Uint32(b[16:20]),
	}, nil
}

// AppendExportNameReply appends the reply to NBD_OPT_EXPORT_NAME: export
// size and transmission flags, then 124 zero bytes unless the client
// negotiated NO_ZEROES.
func AppendExportNameReply(dst []byte, size uint64, flags TransmissionFlags, noZeroes bool) []byte {
	dst = be.AppendUint64(dst, size)
	dst = be.AppendUint16(dst, uint16(flags))
	if !noZeroes {
		dst = append(dst, make([]byte, ExportNameZeroes)...)
	}
	return dst
}

// AppendInfoExport appends the payload of an NBD_REP_INFO of type
// NBD_INFO_EXPORT (12 bytes).
func AppendInfoExport(dst []byte, size uint64, flags TransmissionFlags) []byte {
	dst = be.AppendUint16(dst, uint16(InfoExport))
	dst = be.AppendUint64(dst, size)
	return be.AppendUint16(dst, uint16(flags))
}

// AppendInfoString appends the payload of an NBD_REP_INFO of type
// NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
func AppendInfoString(dst []byte, typ InfoType, s string) []byte {
	dst = be.AppendUint16(dst, uint16(typ))
	return append(dst, s...)
}

// AppendInfoBlockSize appends the payload of an NBD_REP_INFO of type
// NBD_INFO_BLOCK_SIZE (14 bytes).
func AppendInfoBlockSize(dst []byte, minimum, preferred, maximum uint32) []byte {
	dst = be.AppendUint16(dst, uint16(InfoBlockSize))
	dst = be.AppendUint32(dst, minimum)
	dst = be.AppendUint32(dst, preferred)
	return be.AppendUint32(dst, maximum)
}

// Info is a decoded NBD_REP_INFO payload. Only the fields of its Type are
// set.
type Info struct {
	Type                        InfoType
	Size                        uint64            // InfoExport
	Flags                       TransmissionFlags // InfoExport
	Text                        string            // InfoName, InfoDescription
	Minimum, Preferred, Maximum uint32            // InfoBlockSize
}

// DecodeInfo decodes an NBD_REP_INFO payload. Unknown types decode with
// only Type set, as the protocol asks clients to ignore them.
func DecodeInfo(p []byte) (Info, error) {
	if len(p) < 2 {
		return Info{}, fmt.Errorf("%w: info of %d bytes", ErrMalformed, len(p))
	}
	in := Info{Type: InfoType(be.Uint16(p[0:2]))}
	switch in.Type {
	case InfoExport:
		if len(p) != 12 {
			return Info{}, fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrMalformed, len(p))
		}
		in.Size = be.Uint64(p[2:10])
		in.Flags = TransmissionFlags(be.Uint16(p[10:12]))
	case InfoName, InfoDescription:
		in.Text = string(p[2:])
	case InfoBlockSize:
		if len(p) != 14 {
			return Info{}, fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes", ErrMalformed, len(p))
		}
		in.Minimum = be.Uint32(p[2:6])
		in.Preferred = be.Uint32(p[6:10])
		in.Maximum = be.Uint32(p[10:14])
	}
	return in, nil
}

// AppendRepServer appends the payload of an NBD_REP_SERVER: the export
// name and, after it, a description for humans.
func AppendRepServer(dst []byte, name, description string) []byte {
	dst = be.AppendUint32(dst, uint32(len(name)))
	dst = append(dst, name...)
	return append(dst, description...)
}

// DecodeRepServer decodes an NBD_REP_SERVER payload.
func DecodeRepServer(p []byte) (name, description string, err error) {
	if len(p) < 4 {
		return "", "", fmt.Errorf("%w: NBD_REP_SERVER of %d bytes", ErrMalformed, len(p))
	}
	n := be.Uint32(p[0:4])
	if uint64(n) > uint64(len(p)-4) {
		return "", "", fmt.Errorf("%w: name length %d beyond payload", ErrMalformed, n)
	}
	return string(p[4 : 4+n]), string(p[4+n:]), nil
}

// AppendRepMetaContext appends the payload of an NBD_REP_META_CONTEXT.
func AppendRepMetaContext(dst []byte, id uint32, name string) []byte {
	dst = be.AppendUint32(dst, id)
	return append(dst, name...)
}

// DecodeRepMetaContext decodes an NBD_REP_META_CONTEXT payload.
func DecodeRepMetaContext(p []byte) (id uint32, name string, err error) {
	if len(p) < 4 {
		return 0, "", fmt.Errorf("%w: NBD_REP_META_CONTEXT of %d bytes", ErrMalformed, len(p))
	}
	return be.Uint32(p[0:4]), string(p[4:]), nil
}

// InfoRequest is the data of NBD_OPT_INFO and NBD_OPT_GO.
type InfoRequest struct {
	Name  string
	Infos []InfoType
}

// ParseInfoRequest parses the data of NBD_OPT_INFO or NBD_OPT_GO. It
// accepts only payloads it consumes exactly, so that AppendInfoRequest of
// the result reproduces p.
func ParseInfoRequest(p []byte) (InfoRequest, error) {
	if len(p) < 6 {
		return InfoRequest{}, fmt.Errorf("%w: %d bytes, need at least 6", ErrMalformed, len(p))
	}
	n := be.Uint32(p[0:4])
	if uint64(n) > uint64(len(p)-6) {
		return InfoRequest{}, fmt.Errorf("%w: name length %d beyond option data of %d bytes", ErrMalformed, n, len(p))
	}
	if n > MaxStringLength {
		return InfoRequest{}, ErrTooLong
	}
	req := InfoRequest{Name: string(p[4 : 4+n])}
	q := p[4+n:]
	count := int(be.Uint16(q[0:2]))
	q = q[2:]
	if len(q) != 2*count {
		return InfoRequest{}, fmt.Errorf("%w: %d information requests in %d bytes", ErrMalformed, count, len(q))
	}
	if count > 0 {
		req.Infos = make([]InfoType, count)
		for i := range req.Infos {
			req.Infos[i] = InfoType(be.Uint16(q[2*i:]))
		}
	}
	return req, nil
}

// AppendInfoRequest appends the data of NBD_OPT_INFO or NBD_OPT_GO.
func AppendInfoRequest(dst []byte, r InfoRequest) []byte {
	dst = be.AppendUint32(dst, uint32(len(r.Name)))
	dst = append(dst, r.Name...)
	dst = be.AppendUint16(dst, uint16(len(r.Infos)))
	for _, t := range r.Infos {
		dst = be.AppendUint16(dst, uint16(t))
	}
	return dst
}

// MetaContextRequest is the data of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
type MetaContextRequest struct {
	Name    string
	Queries []string
}

// ParseMetaContextRequest parses the data of NBD_OPT_LIST_META_CONTEXT or
// NBD_OPT_SET_META_CONTEXT. Like ParseInfoRequest it accepts only payloads
// it consumes exactly. Strings longer than MaxStringLength are refused with
// ErrTooLong.
func ParseMetaContextRequest(p []byte) (MetaContextRequest, error) {
	if len(p) < 8 {
		return MetaContextRequest{}, fmt.Errorf("%w: %d bytes, need at least 8", ErrMalformed, len(p))
	}
	n := be.Uint32(p[0:4])
	if uint64(n) > uint64(len(p)-8) {
		return MetaContextRequest{}, fmt.Errorf("%w: name length %d beyond option data of %d bytes", ErrMalformed, n, len(p))
	}
	if n > MaxStringLength {
		return MetaContextRequest{}, ErrTooLong
	}
	req := MetaContextRequest{Name: string(p[4 : 4+n])}
	q := p[4+n:]
	count := be.Uint32(q[0:4])
	q = q[4:]
	// Each query takes at least its 4-byte length: bound count by the
	// bytes left before allocating.
	if uint64(count) > uint64(len(q)/4) {
		return MetaContextRequest{}, fmt.Errorf("%w: %d queries in %d bytes", ErrMalformed, count, len(q))
	}
	if count > 0 {
		req.Queries = make([]string, 0, count)
	}
	for i := uint32(0); i < count; i++ {
		if len(q) < 4 {
			return MetaContextRequest{}, fmt.Errorf("%w: query %d truncated", ErrMalformed, i)
		}
		l := be.Uint32(q[0:4])
		if uint64(l) > uint64(len(q)-4) {
			return MetaContextRequest{}, fmt.Errorf("%w: query %d length %d beyond option data", ErrMalformed, i, l)
		}
		if l > MaxStringLength {
			return MetaContextRequest{}, ErrTooLong
		}
		req.Queries = append(req.Queries, string(q[4:4+l]))
		q = q[4+l:]
	}
	if len(q) != 0 {
		return MetaContextRequest{}, fmt.Errorf("%w: %d bytes after the last query", ErrMalformed, len(q))
	}
	return req, nil
}

// AppendMetaContextRequest appends the data of NBD_OPT_LIST_META_CONTEXT
// or NBD_OPT_SET_META_CONTEXT.
func AppendMetaContextRequest(dst []byte, r MetaContextRequest) []byte {
	dst = be.AppendUint32(dst, uint32(len(r.Name)))
	dst = append(dst, r.Name...)
	dst = be.AppendUint32(dst, uint32(len(r.Queries)))
	for _, q := range r.Queries {
		dst = be.AppendUint32(dst, uint32(len(q)))
		dst = append(dst, q...)
	}
	return dst
}

package nbdkernel

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Netlink attribute (struct nlattr) layout, host byte order:
//
//	 0       2       4
//	+-------+-------+---------------------------+-----------+
//	| len   | type  | payload (len - 4 bytes)   | pad to 4  |
//	+-------+-------+---------------------------+-----------+
//
// type carries two flag bits: NLA_F_NESTED (0x8000, the payload is itself
// a run of attributes) and NLA_F_NET_BYTEORDER (0x4000). len counts the
// header and the payload, not the padding.

const (
	attrHeaderLen = 4
	attrFlagMask  = 0x8000 | 0x4000 // NLA_F_NESTED | NLA_F_NET_BYTEORDER
	attrNested    = 0x8000
)

// errShortAttr reports attribute bytes that do not hold what their
// headers claim.
var errShortAttr = errors.New("nbdkernel: truncated netlink attribute")

func align4(n int) int { return (n + 3) &^ 3 }

// attr is one decoded attribute. Data aliases the buffer it was parsed
// from.
type attr struct {
	Type   uint16 // without the flag bits
	Nested bool
	Data   []byte
}

// parseAttrs splits b into attributes. It never panics on any input and
// never reads past b; a header that claims more than b holds is an error.
func parseAttrs(b []byte) ([]attr, error) {
	var out []attr
	for len(b) > 0 {
		if len(b) < attrHeaderLen {
			return nil, fmt.Errorf("%w: %d bytes left, header needs %d", errShortAttr, len(b), attrHeaderLen)
		}
		n := int(binary.NativeEndian.Uint16(b[0:2]))
		typ := binary.NativeEndian.Uint16(b[2:4])
		if n < attrHeaderLen || n > len(b) {
			return nil, fmt.Errorf("%w: length %d with %d bytes left", errShortAttr, n, len(b))
		}
		out = append(out, attr{Type: typ &^ attrFlagMask, Nested: typ&attrNested != 0, Data: b[attrHeaderLen:n]})
		next := align4(n)
		if next >= len(b) {
			break // the last attribute may omit its padding
		}
		b = b[next:]
	}
	return out, nil
}

// find returns the first attribute of type t.
func find(attrs []attr, t uint16) (attr, bool) {
	for _, a := range attrs {
		if a.Type == t {
			return a, true
		}
	}
	return attr{}, false
}

func (a attr) u8() (uint8, error) {
	if len(a.Data) < 1 {
		return 0, fmt.Errorf("%w: u8 attribute %d has %d bytes", errShortAttr, a.Type, len(a.Data))
	}
	return a.Data[0], nil
}

func (a attr) u16() (uint16, error) {
	if len(a.Data) < 2 {
		return 0, fmt.Errorf("%w: u16 attribute %d has %d bytes", errShortAttr, a.Type, len(a.Data))
	}
	return binary.NativeEndian.Uint16(a.Data), nil
}

func (a attr) u32() (uint32, error) {
	if len(a.Data) < 4 {
		return 0, fmt.Errorf("%w: u32 attribute %d has %d bytes", errShortAttr, a.Type, len(a.Data))
	}
	return binary.NativeEndian.Uint32(a.Data), nil
}

func (a attr) u64() (uint64, error) {
	if len(a.Data) < 8 {
		return 0, fmt.Errorf("%w: u64 attribute %d has %d bytes", errShortAttr, a.Type, len(a.Data))
	}
	return binary.NativeEndian.Uint64(a.Data), nil
}

// str decodes a string attribute, dropping the trailing NUL (and
// anything after the first NUL).
func (a attr) str() string {
	for i, c := range a.Data {
		if c == 0 {
			return string(a.Data[:i])
		}
	}
	return string(a.Data)
}

// attrWriter appends attributes to a buffer. Nested attributes are written
// by Nest, which patches the outer length when the inner ones are done.
type attrWriter struct {
	b []byte
}

func (w *attrWriter) header(typ uint16, payload int) {
	var h [attrHeaderLen]byte
	binary.NativeEndian.PutUint16(h[0:2], uint16(attrHeaderLen+payload))
	binary.NativeEndian.PutUint16(h[2:4], typ)
	w.b = append(w.b, h[:]...)
}

func (w *attrWriter) pad() {
	for len(w.b)%4 != 0 {
		w.b = append(w.b, 0)
	}
}

func (w *attrWriter) U8(typ uint16, v uint8) {
	w.header(typ, 1)
	w.b = append(w.b, v)
	w.pad()
}

func (w *attrWriter) U16(typ uint16, v uint16) {
	w.header(typ, 2)
	w.b = binary.NativeEndian.AppendUint16(w.b, v)
	w.pad()
}

func (w *attrWriter) U32(typ uint16, v uint32) {
	w.header(typ, 4)
	w.b = binary.NativeEndian.AppendUint32(w.b, v)
}

func (w *attrWriter) U64(typ uint16, v uint64) {
	w.header(typ, 8)
	w.b = binary.NativeEndian.AppendUint64(w.b, v)
}

// String writes s NUL-terminated, as the kernel's NLA_STRING and
// NLA_NUL_STRING policies both accept.
func (w *attrWriter) String(typ uint16, s string) {
	w.header(typ, len(s)+1)
	w.b = append(w.b, s...)
	w.b = append(w.b, 0)
	w.pad()
}

// Nest writes an attribute of type typ|NLA_F_NESTED whose payload is what
// fn writes.
func (w *attrWriter) Nest(typ uint16, fn func(w *attrWriter)) {
	start := len(w.b)
	w.header(typ|attrNested, 0)
	fn(w)
	binary.NativeEndian.PutUint16(w.b[start:start+2], uint16(len(w.b)-start))
	w.pad()
}

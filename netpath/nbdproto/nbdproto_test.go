package nbdproto

import (
	"bytes"
	"encoding/hex"
	"errors"
	"reflect"
	"testing"
)

// TestConstants pins every value to the number in the protocol document, so
// that an accidental edit of a constant fails here rather than on a client.
func TestConstants(t *testing.T) {
	cases := []struct {
		name string
		got  uint64
		want uint64
	}{
		{"NBDMAGIC", Magic, 0x4e42444d41474943},
		{"IHAVEOPT", OptMagic, 0x49484156454F5054},
		{"option reply magic", OptReplyMagic, 0x0003e889045565a9},
		{"request magic", uint64(RequestMagic), 0x25609513},
		{"simple reply magic", uint64(SimpleReplyMagic), 0x67446698},
		{"structured reply magic", uint64(StructuredReplyMagic), 0x668e33ef},
		{"FIXED_NEWSTYLE", uint64(FlagFixedNewstyle), 1},
		{"NO_ZEROES", uint64(FlagNoZeroes), 2},
		{"C_FIXED_NEWSTYLE", uint64(FlagCFixedNewstyle), 1},
		{"C_NO_ZEROES", uint64(FlagCNoZeroes), 2},
		{"HAS_FLAGS", uint64(FlagHasFlags), 1},
		{"READ_ONLY", uint64(FlagReadOnly), 2},
		{"SEND_FLUSH", uint64(FlagSendFlush), 4},
		{"SEND_FUA", uint64(FlagSendFUA), 8},
		{"ROTATIONAL", uint64(FlagRotational), 16},
		{"SEND_TRIM", uint64(FlagSendTrim), 32},
		{"SEND_WRITE_ZEROES", uint64(FlagSendWriteZeroes), 64},
		{"SEND_DF", uint64(FlagSendDF), 128},
		{"CAN_MULTI_CONN", uint64(FlagCanMultiConn), 256},
		{"SEND_RESIZE", uint64(FlagSendResize), 512},
		{"SEND_CACHE", uint64(FlagSendCache), 1024},
		{"SEND_FAST_ZERO", uint64(FlagSendFastZero), 2048},
		{"OPT_EXPORT_NAME", uint64(OptExportName), 1},
		{"OPT_ABORT", uint64(OptAbort), 2},
		{"OPT_LIST", uint64(OptList), 3},
		{"OPT_STARTTLS", uint64(OptStartTLS), 5},
		{"OPT_INFO", uint64(OptInfo), 6},
		{"OPT_GO", uint64(OptGo), 7},
		{"OPT_STRUCTURED_REPLY", uint64(OptStructuredReply), 8},
		{"OPT_LIST_META_CONTEXT", uint64(OptListMetaContext), 9},
		{"OPT_SET_META_CONTEXT", uint64(OptSetMetaContext), 10},
		{"OPT_EXTENDED_HEADERS", uint64(OptExtendedHeaders), 11},
		{"REP_ACK", uint64(RepAck), 1},
		{"REP_SERVER", uint64(RepServer), 2},
		{"REP_INFO", uint64(RepInfo), 3},
		{"REP_META_CONTEXT", uint64(RepMetaContext), 4},
		{"REP_ERR_UNSUP", uint64(RepErrUnsup), 1<<31 + 1},
		{"REP_ERR_POLICY", uint64(RepErrPolicy), 1<<31 + 2},
		{"REP_ERR_INVALID", uint64(RepErrInvalid), 1<<31 + 3},
		{"REP_ERR_PLATFORM", uint64(RepErrPlatform), 1<<31 + 4},
		{"REP_ERR_TLS_REQD", uint64(RepErrTLSReqd), 1<<31 + 5},
		{"REP_ERR_UNKNOWN", uint64(RepErrUnknown), 1<<31 + 6},
		{"REP_ERR_SHUTDOWN", uint64(RepErrShutdown), 1<<31 + 7},
		{"REP_ERR_BLOCK_SIZE_REQD", uint64(RepErrBlockSizeReqd), 1<<31 + 8},
		{"REP_ERR_TOO_BIG", uint64(RepErrTooBig), 1<<31 + 9},
		{"INFO_EXPORT", uint64(InfoExport), 0},
		{"INFO_NAME", uint64(InfoName), 1},
		{"INFO_DESCRIPTION", uint64(InfoDescription), 2},
		{"INFO_BLOCK_SIZE", uint64(InfoBlockSize), 3},
		{"CMD_READ", uint64(CmdRead), 0},
		{"CMD_WRITE", uint64(CmdWrite), 1},
		{"CMD_DISC", uint64(CmdDisc), 2},
		{"CMD_FLUSH", uint64(CmdFlush), 3},
		{"CMD_TRIM", uint64(CmdTrim), 4},
		{"CMD_CACHE", uint64(CmdCache), 5},
		{"CMD_WRITE_ZEROES", uint64(CmdWriteZeroes), 6},
		{"CMD_BLOCK_STATUS", uint64(CmdBlockStatus), 7},
		{"CMD_FLAG_FUA", uint64(CmdFlagFUA), 1},
		{"CMD_FLAG_NO_HOLE", uint64(CmdFlagNoHole), 2},
		{"CMD_FLAG_DF", uint64(CmdFlagDF), 4},
		{"CMD_FLAG_REQ_ONE", uint64(CmdFlagReqOne), 8},
		{"CMD_FLAG_FAST_ZERO", uint64(CmdFlagFastZero), 16},
		{"REPLY_FLAG_DONE", uint64(ReplyFlagDone), 1},
		{"REPLY_TYPE_NONE", uint64(ReplyTypeNone), 0},
		{"REPLY_TYPE_OFFSET_DATA", uint64(ReplyTypeOffsetData), 1},
		{"REPLY_TYPE_OFFSET_HOLE", uint64(ReplyTypeOffsetHole), 2},
		{"REPLY_TYPE_BLOCK_STATUS", uint64(ReplyTypeBlockStatus), 5},
		{"REPLY_TYPE_ERROR", uint64(ReplyTypeError), 32769},
		{"REPLY_TYPE_ERROR_OFFSET", uint64(ReplyTypeErrorOffset), 32770},
		{"STATE_HOLE", uint64(StateHole), 1},
		{"STATE_ZERO", uint64(StateZero), 2},
		{"EPERM", uint64(EPERM), 1},
		{"EIO", uint64(EIO), 5},
		{"ENOMEM", uint64(ENOMEM), 12},
		{"EINVAL", uint64(EINVAL), 22},
		{"ENOSPC", uint64(ENOSPC), 28},
		{"EOVERFLOW", uint64(EOVERFLOW), 75},
		{"ENOTSUP", uint64(ENOTSUP), 95},
		{"ESHUTDOWN", uint64(ESHUTDOWN), 108},
	}
	for _, c := range cases {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
	if !RepErrTooBig.IsError() || RepAck.IsError() {
		t.Error("Rep.IsError")
	}
	if !ReplyTypeErrorOffset.IsError() || ReplyTypeBlockStatus.IsError() {
		t.Error("ReplyType.IsError")
	}
}

func TestRequestGolden(t *testing.T) {
	raw, _ := hex.DecodeString("25609513" + "0001" + "0001" + "0102030405060708" + "0000000000001000" + "00001000")
	var b [RequestSize]byte
	copy(b[:], raw)
	r, err := DecodeRequest(&b)
	if err != nil {
		t.Fatal(err)
	}
	want := Request{Flags: CmdFlagFUA, Type: CmdWrite, Handle: 0x0102030405060708, Offset: 4096, Length: 4096}
	if r != want {
		t.Fatalf("decoded %+v, want %+v", r, want)
	}
	var out [RequestSize]byte
	r.Encode(&out)
	if out != b {
		t.Fatalf("encode %x, want %x", out, b)
	}
	b[0] = 0x26
	if _, err := DecodeRequest(&b); !errors.Is(err, ErrBadMagic) {
		t.Fatalf("bad magic: err %v", err)
	}
}

func TestRepliesGolden(t *testing.T) {
	var b [SimpleReplySize]byte
	PutSimpleReply(b[:], EINVAL, 0xa1a2a3a4a5a6a7a8)
	if got, want := hex.EncodeToString(b[:]), "67446698"+"00000016"+"a1a2a3a4a5a6a7a8"; got != want {
		t.Fatalf("simple reply %s, want %s", got, want)
	}
	sr, err := DecodeSimpleReply(b[:])
	if err != nil || sr.Errno != EINVAL || sr.Handle != 0xa1a2a3a4a5a6a7a8 {
		t.Fatalf("decode simple reply: %+v %v", sr, err)
	}

	var c [ChunkHeaderSize]byte
	h := ChunkHeader{Flags: ReplyFlagDone, Type: ReplyTypeOffsetData, Handle: 7, Length: 8 + 4096}
	PutChunkHeader(c[:], h)
	if got, want := hex.EncodeToString(c[:]), "668e33ef"+"0001"+"0001"+"0000000000000007"+"00001008"; got != want {
		t.Fatalf("chunk header %s, want %s", got, want)
	}
	if dh, err := DecodeChunkHeader(c[:]); err != nil || dh != h {
		t.Fatalf("decode chunk header: %+v %v", dh, err)
	}

	var e [ErrorPayloadSize]byte
	PutErrorPayload(e[:], EOVERFLOW, 3)
	if got, want := hex.EncodeToString(e[:]), "0000004b"+"0003"; got != want {
		t.Fatalf("error payload %s, want %s", got, want)
	}

	var g [GreetingSize]byte
	PutGreeting(g[:], FlagFixedNewstyle|FlagNoZeroes)
	if got, want := string(g[:16]), "NBDMAGICIHAVEOPT"; got != want {
		t.Fatalf("greeting %q", got)
	}
	if f, err := DecodeGreeting(g[:]); err != nil || f != FlagFixedNewstyle|FlagNoZeroes {
		t.Fatalf("decode greeting: %v %v", f, err)
	}
}

func TestBlockStatusRoundTrip(t *testing.T) {
	p := []byte{0, 0, 0, 1}
	var d [BlockDescriptorSize]byte
	PutBlockDescriptor(d[:], 4096, StateHole|StateZero)
	p = append(p, d[:]...)
	PutBlockDescriptor(d[:], 8192, 0)
	p = append(p, d[:]...)
	id, descs, err := DecodeBlockStatus(p)
	if err != nil || id != 1 || !reflect.DeepEqual(descs, []BlockDescriptor{{4096, 3}, {8192, 0}}) {
		t.Fatalf("got %d %v %v", id, descs, err)
	}
	if _, _, err := DecodeBlockStatus(p[:7]); err == nil {
		t.Fatal("short payload accepted")
	}
}

func TestOptionMessages(t *testing.T) {
	msg := AppendOption(nil, OptGo, []byte{1, 2})
	h, err := DecodeOptionHeader(msg)
	if err != nil || h.Option != OptGo || h.Length != 2 || !bytes.Equal(msg[16:], []byte{1, 2}) {
		t.Fatalf("option header %+v %v", h, err)
	}
	rep := AppendOptionReply(nil, OptList, RepServer, AppendRepServer(nil, "vol", "a volume"))
	rh, err := DecodeOptionReplyHeader(rep)
	if err != nil || rh.Option != OptList || rh.Reply != RepServer || int(rh.Length) != len(rep)-OptionReplyHeaderSize {
		t.Fatalf("reply header %+v %v", rh, err)
	}
	name, desc, err := DecodeRepServer(rep[OptionReplyHeaderSize:])
	if err != nil || name != "vol" || desc != "a volume" {
		t.Fatalf("rep server %q %q %v", name, desc, err)
	}
	in, err := DecodeInfo(AppendInfoExport(nil, 1<<30, FlagHasFlags|FlagSendFlush))
	if err != nil || in.Size != 1<<30 || in.Flags != FlagHasFlags|FlagSendFlush {
		t.Fatalf("info export %+v %v", in, err)
	}
	in, err = DecodeInfo(AppendInfoBlockSize(nil, 1, 4096, 32<<20))
	if err != nil || in.Minimum != 1 || in.Preferred != 4096 || in.Maximum != 32<<20 {
		t.Fatalf("info block size %+v %v", in, err)
	}
	in, err = DecodeInfo(AppendInfoString(nil, InfoDescription, "hello"))
	if err != nil || in.Type != InfoDescription || in.Text != "hello" {
		t.Fatalf("info description %+v %v", in, err)
	}
	id, ctx, err := DecodeRepMetaContext(AppendRepMetaContext(nil, 9, ContextBaseAllocation))
	if err != nil || id != 9 || ctx != ContextBaseAllocation {
		t.Fatalf("meta context %d %q %v", id, ctx, err)
	}
	if got := AppendExportNameReply(nil, 1, FlagHasFlags, false); len(got) != ExportNameReplySize+ExportNameZeroes {
		t.Fatalf("export name reply of %d bytes", len(got))
	}
	if got := AppendExportNameReply(nil, 1, FlagHasFlags, true); len(got) != ExportNameReplySize {
		t.Fatalf("export name reply (no zeroes) of %d bytes", len(got))
	}
}

// infoCases and metaCases seed the fuzzers and the table tests.
var infoCases = []struct {
	raw string
	ok  bool
}{
	{"00000000" + "0000", true},
	{"00000003" + "766f6c" + "0002" + "0003" + "0001", true},
	{"00000003" + "766f6c" + "0001", false},             // count 1, no entry
	{"000000ff" + "766f6c" + "0000", false},             // name beyond data
	{"00000000" + "0000" + "00", false},                 // trailing byte
	{"0000", false},                                     // short
	{"ffffffff" + "0000" + "0000", false},               // huge name length
	{"00000001" + "61" + "0001" + "0000" + "00", false}, // odd tail
}

var metaCases = []struct {
	raw string
	ok  bool
}{
	{"00000000" + "00000000", true},
	{"00000003" + "766f6c" + "00000001" + "0000000f" + "626173653a616c6c6f636174696f6e", true},
	{"00000000" + "00000002" + "00000005" + "626173653a" + "00000000", true},
	{"00000000" + "00000002" + "00000005" + "626173653a", false}, // second query missing
	{"00000000" + "ffffffff", false},                             // absurd count
	{"00000000" + "00000001" + "00000010" + "626173653a", false}, // query beyond data
	{"00000000" + "00000000" + "00", false},                      // trailing byte
	{"0000", false},                                              // short
}

func TestParseInfoRequest(t *testing.T) {
	for _, c := range infoCases {
		p, _ := hex.DecodeString(c.raw)
		r, err := ParseInfoRequest(p)
		if (err == nil) != c.ok {
			t.Errorf("%s: err %v, want ok=%v", c.raw, err, c.ok)
			continue
		}
		if err == nil && !bytes.Equal(AppendInfoRequest(nil, r), p) {
			t.Errorf("%s: round trip gives %x", c.raw, AppendInfoRequest(nil, r))
		}
	}
	r, _ := ParseInfoRequest(AppendInfoRequest(nil, InfoRequest{Name: "vol", Infos: []InfoType{InfoBlockSize, InfoName}}))
	if r.Name != "vol" || !reflect.DeepEqual(r.Infos, []InfoType{InfoBlockSize, InfoName}) {
		t.Fatalf("parsed %+v", r)
	}
	long := AppendInfoRequest(nil, InfoRequest{Name: string(make([]byte, MaxStringLength+1))})
	if _, err := ParseInfoRequest(long); !errors.Is(err, ErrTooLong) {
		t.Fatalf("long name: %v", err)
	}
}

func TestParseMetaContextRequest(t *testing.T) {
	for _, c := range metaCases {
		p, _ := hex.DecodeString(c.raw)
		r, err := ParseMetaContextRequest(p)
		if (err == nil) != c.ok {
			t.Errorf("%s: err %v, want ok=%v", c.raw, err, c.ok)
			continue
		}
		if err == nil && !bytes.Equal(AppendMetaContextRequest(nil, r), p) {
			t.Errorf("%s: round trip gives %x", c.raw, AppendMetaContextRequest(nil, r))
		}
	}
	r, _ := ParseMetaContextRequest(AppendMetaContextRequest(nil, MetaContextRequest{Name: "v", Queries: []string{"base:", ContextBaseAllocation}}))
	if r.Name != "v" || !reflect.DeepEqual(r.Queries, []string{"base:", ContextBaseAllocation}) {
		t.Fatalf("parsed %+v", r)
	}
}

func TestStrings(t *testing.T) {
	if CmdWriteZeroes.String() != "write_zeroes" || Cmd(99).String() != "unknown" {
		t.Error("Cmd.String")
	}
	if EOVERFLOW.String() != "EOVERFLOW" || Errno(3).String() != "E3" {
		t.Error("Errno.String")
	}
	if OptGo.String() != "NBD_OPT_GO" || Option(77).String() != "NBD_OPT(77)" {
		t.Error("Option.String")
	}
	if RepErrUnsup.String() != "NBD_REP_ERR_UNSUP" {
		t.Error("Rep.String")
	}
}

func TestDecodeRequestNoAlloc(t *testing.T) {
	var b [RequestSize]byte
	Request{Type: CmdRead, Handle: 1, Offset: 4096, Length: 4096}.Encode(&b)
	var sink Request
	allocs := testing.AllocsPerRun(1000, func() {
		r, err := DecodeRequest(&b)
		if err != nil {
			panic(err)
		}
		sink = r
	})
	if allocs != 0 {
		t.Fatalf("DecodeRequest allocates %.1f times per call", allocs)
	}
	_ = sink
}

func FuzzDecodeRequest(f *testing.F) {
	var b [RequestSize]byte
	for _, r := range []Request{
		{Type: CmdRead, Handle: 1, Offset: 0, Length: 4096},
		{Type: CmdWrite, Flags: CmdFlagFUA, Handle: ^uint64(0), Offset: 1 << 40, Length: 32 << 20},
		{Type: CmdBlockStatus, Flags: CmdFlagReqOne, Length: ^uint32(0)},
		{Type: CmdDisc},
		{Type: 0xffff, Flags: 0xffff},
	} {
		r.Encode(&b)
		f.Add(b[:])
	}
	f.Add(make([]byte, RequestSize))
	f.Add([]byte{0x25, 0x60})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < RequestSize {
			return
		}
		var in [RequestSize]byte
		copy(in[:], data)
		r, err := DecodeRequest(&in)
		if err != nil {
			if !errors.Is(err, ErrBadMagic) {
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
		var out [RequestSize]byte
		r.Encode(&out)
		if out != in {
			t.Fatalf("round trip: %x became %x", in, out)
		}
	})
}

// FuzzParseOption feeds one payload to both option parsers (INFO/GO and
// LIST/SET_META_CONTEXT); whatever either accepts must re-encode to the
// same bytes.
func FuzzParseOption(f *testing.F) {
	for _, c := range infoCases {
		p, _ := hex.DecodeString(c.raw)
		f.Add(p)
	}
	for _, c := range metaCases {
		p, _ := hex.DecodeString(c.raw)
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		if r, err := ParseInfoRequest(p); err == nil {
			if got := AppendInfoRequest(nil, r); !bytes.Equal(got, p) {
				t.Fatalf("info round trip: %x became %x", p, got)
			}
		}
		if r, err := ParseMetaContextRequest(p); err == nil {
			if got := AppendMetaContextRequest(nil, r); !bytes.Equal(got, p) {
				t.Fatalf("meta context round trip: %x became %x", p, got)
			}
		}
		_, _ = DecodeInfo(p)
		_, _, _ = DecodeRepServer(p)
		_, _, _ = DecodeBlockStatus(p)
		_, _ = DecodeOptionHeader(p)
		_, _ = DecodeChunkHeader(p)
	})
}

func BenchmarkDecodeRequest(b *testing.B) {
	var raw [RequestSize]byte
	Request{Type: CmdRead, Handle: 42, Offset: 1 << 30, Length: 4096}.Encode(&raw)
	b.ReportAllocs()
	b.SetBytes(RequestSize)
	var sink uint64
	for b.Loop() {
		r, err := DecodeRequest(&raw)
		if err != nil {
			b.Fatal(err)
		}
		sink += r.Offset
	}
	_ = sink
}

func BenchmarkEncodeReply(b *testing.B) {
	var hdr [ChunkHeaderSize + OffsetDataHeaderSize]byte
	var simple [SimpleReplySize]byte
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		PutSimpleReply(simple[:], 0, uint64(i))
		PutChunkHeader(hdr[:], ChunkHeader{Flags: ReplyFlagDone, Type: ReplyTypeOffsetData, Handle: uint64(i), Length: 8 + 4096})
		be.PutUint64(hdr[ChunkHeaderSize:], uint64(i)*4096)
	}
}

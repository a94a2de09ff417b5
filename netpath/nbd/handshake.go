package nbd

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"strings"
	"time"

	"keel/netpath/nbdproto"
)

var (
	errAbort       = errors.New("nbd: client aborted the handshake")
	errClientFlags = errors.New("nbd: unknown client flags")
)

// metaContextID is the id keel gives base:allocation in
// NBD_OPT_SET_META_CONTEXT replies (LIST replies carry 0, as asked).
const metaContextID = 1

// handshake runs the fixed newstyle handshake. On success the session has
// its export and negotiated features and the stream is positioned at the
// first request. Any error means the connection is to be closed.
func (ss *session) handshake() error {
	nc := ss.nc
	nc.SetDeadline(time.Now().Add(ss.srv.cfg.HandshakeTimeout))
	w := bufio.NewWriterSize(nc, 4096)

	var greet [nbdproto.GreetingSize]byte
	nbdproto.PutGreeting(greet[:], nbdproto.FlagFixedNewstyle|nbdproto.FlagNoZeroes)
	if _, err := nc.Write(greet[:]); err != nil {
		return err
	}
	var cf [4]byte
	if _, err := io.ReadFull(nc, cf[:]); err != nil {
		return err
	}
	flags := nbdproto.ClientFlags(be32(cf[:]))
	if flags&^(nbdproto.FlagCFixedNewstyle|nbdproto.FlagCNoZeroes) != 0 {
		return fmt.Errorf("%w %#x", errClientFlags, uint32(flags))
	}
	noZeroes := flags&nbdproto.FlagCNoZeroes != 0
	// A client without FlagCFixedNewstyle is still served fixed newstyle
	// replies, as the protocol allows.

	var (
		sr         bool    // structured replies negotiated
		metaExport *Export // export of the last successful SET_META_CONTEXT
		metaSel    bool    // base:allocation selected by it
		hdr        [nbdproto.OptionHeaderSize]byte
		data       []byte
	)
	send := func(opt nbdproto.Option, rep nbdproto.Rep, payload []byte) error {
		_, err := w.Write(nbdproto.AppendOptionReply(nil, opt, rep, payload))
		return err
	}
	sendErr := func(opt nbdproto.Option, rep nbdproto.Rep, msg string) error {
		if err := send(opt, rep, []byte(msg)); err != nil {
			return err
		}
		return w.Flush()
	}

	for {
		if _, err := io.ReadFull(nc, hdr[:]); err != nil {
			return err
		}
		oh, err := nbdproto.DecodeOptionHeader(hdr[:])
		if err != nil {
			return fmt.Errorf("option header: %w", err)
		}
		opt := oh.Option
		if oh.Length > maxOptionLen {
			if opt == nbdproto.OptExportName || oh.Length > maxOptionDrain {
				return fmt.Errorf("%v with %d bytes of data: too large", opt, oh.Length)
			}
			if _, err := io.CopyN(io.Discard, nc, int64(oh.Length)); err != nil {
				return err
			}
			if err := sendErr(opt, nbdproto.RepErrTooBig, "option data too large"); err != nil {
				return err
			}
			continue
		}
		if cap(data) < int(oh.Length) {
			data = make([]byte, oh.Length)
		}
		data = data[:oh.Length]
		if _, err := io.ReadFull(nc, data); err != nil {
			return err
		}

		if ss.srv.isClosing() && opt != nbdproto.OptAbort {
			if opt == nbdproto.OptExportName {
				return errors.New("server shutting down")
			}
			if err := sendErr(opt, nbdproto.RepErrShutdown, "server shutting down"); err != nil {
				return err
			}
			continue
		}

		switch opt {
		case nbdproto.OptExportName:
			exp := ss.srv.lookup(string(data))
			if exp == nil {
				return fmt.Errorf("NBD_OPT_EXPORT_NAME: no export %q", data)
			}
			ss.setExport(exp, sr, metaSel && metaExport == exp)
			b := nbdproto.AppendExportNameReply(nil, ss.size, ss.flags, noZeroes)
			w.Write(b)
			return w.Flush()

		case nbdproto.OptAbort:
			send(opt, nbdproto.RepAck, nil)
			w.Flush()
			return errAbort

		case nbdproto.OptList:
			if len(data) != 0 {
				if err := sendErr(opt, nbdproto.RepErrInvalid, "NBD_OPT_LIST takes no data"); err != nil {
					return err
				}
				continue
			}
			for _, e := range ss.srv.listExports() {
				send(opt, nbdproto.RepServer, nbdproto.AppendRepServer(nil, e.Name, e.Description))
			}
			if err := sendErr(opt, nbdproto.RepAck, ""); err != nil {
				return err
			}

		case nbdproto.OptStartTLS:
			rep, msg := nbdproto.RepErrPolicy, "TLS is not configured on this server"
			if len(data) != 0 {
				rep, msg = nbdproto.RepErrInvalid, "NBD_OPT_STARTTLS takes no data"
			}
			if err := sendErr(opt, rep, msg); err != nil {
				return err
			}

		case nbdproto.OptStructuredReply:
			if len(data) != 0 {
				if err := sendErr(opt, nbdproto.RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data"); err != nil {
					return err
				}
				continue
			}
			sr = true
			if err := sendErr(opt, nbdproto.RepAck, ""); err != nil {
				return err
			}

		case nbdproto.OptInfo, nbdproto.OptGo:
			req, err := nbdproto.ParseInfoRequest(data)
			if err != nil {
				if err := sendErr(opt, nbdproto.RepErrInvalid, err.Error()); err != nil {
					return err
				}
				continue
			}
			exp := ss.srv.lookup(req.Name)
			if exp == nil {
				if err := sendErr(opt, nbdproto.RepErrUnknown, "no export named "+quote(req.Name)); err != nil {
					return err
				}
				continue
			}
			size, flags := exportSize(exp), transmissionFlags(exp, sr)
			minB, prefB := blockSizes(exp.Backend)
			send(opt, nbdproto.RepInfo, nbdproto.AppendInfoExport(nil, size, flags))
			for _, t := range req.Infos {
				switch t {
				case nbdproto.InfoName:
					send(opt, nbdproto.RepInfo, nbdproto.AppendInfoString(nil, nbdproto.InfoName, exp.Name))
				case nbdproto.InfoDescription:
					if exp.Description != "" {
						send(opt, nbdproto.RepInfo, nbdproto.AppendInfoString(nil, nbdproto.InfoDescription, exp.Description))
					}
				}
			}
			// Block sizes are sent whether asked or not: the maximum is
			// not the protocol's default.
			send(opt, nbdproto.RepInfo, nbdproto.AppendInfoBlockSize(nil, minB, prefB, uint32(ss.srv.cfg.MaxRequest)))
			if err := sendErr(opt, nbdproto.RepAck, ""); err != nil {
				return err
			}
			if opt == nbdproto.OptGo {
				ss.setExport(exp, sr, metaSel && metaExport == exp)
				return nil
			}

		case nbdproto.OptListMetaContext, nbdproto.OptSetMetaContext:
			set := opt == nbdproto.OptSetMetaContext
			if set {
				// Replaced even when this request fails.
				metaExport, metaSel = nil, false
			}
			if !sr {
				if err := sendErr(opt, nbdproto.RepErrInvalid, "negotiate NBD_OPT_STRUCTURED_REPLY first"); err != nil {
					return err
				}
				continue
			}
			req, err := nbdproto.ParseMetaContextRequest(data)
			if err != nil {
				if err := sendErr(opt, nbdproto.RepErrInvalid, err.Error()); err != nil {
					return err
				}
				continue
			}
			exp := ss.srv.lookup(req.Name)
			if exp == nil {
				if err := sendErr(opt, nbdproto.RepErrUnknown, "no export named "+quote(req.Name)); err != nil {
					return err
				}
				continue
			}
			if matchAllocation(req.Queries, set) {
				id := uint32(0)
				if set {
					id = metaContextID
				}
				send(opt, nbdproto.RepMetaContext, nbdproto.AppendRepMetaContext(nil, id, nbdproto.ContextBaseAllocation))
				if set {
					metaExport, metaSel = exp, true
				}
			}
			if err := sendErr(opt, nbdproto.RepAck, ""); err != nil {
				return err
			}

		default:
			if err := sendErr(opt, nbdproto.RepErrUnsup, "option not supported: "+opt.String()); err != nil {
				return err
			}
		}
	}
}

// matchAllocation reports whether the queries of a LIST (set false) or SET
// (set true) META_CONTEXT select base:allocation. For LIST, no query and
// the namespace wildcard "base:" list it; for SET, only its full name
// selects it. Queries of other namespaces and unknown leaf names are
// ignored, as the protocol requires.
func matchAllocation(queries []string, set bool) bool {
	if len(queries) == 0 {
		return !set
	}
	for _, q := range queries {
		if q == nbdproto.ContextBaseAllocation || (!set && q == "base:") {
			return true
		}
	}
	return false
}

// exportSize is the size advertised for exp.
func exportSize(exp *Export) uint64 {
	if n := exp.Backend.Size(); n > 0 {
		return uint64(n)
	}
	return 0
}

// transmissionFlags are the features exposed for exp: exactly what the
// server implements. Read-only exports do not advertise TRIM, WRITE_ZEROES,
// FAST_ZERO or FUA (the commands would fail with EPERM anyway); DF is only
// advertised with structured replies, as the protocol requires, and is
// always honoured because reads are always answered in one chunk.
func transmissionFlags(exp *Export, sr bool) nbdproto.TransmissionFlags {
	f := nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagSendCache | nbdproto.FlagCanMultiConn
	if exp.readOnly() {
		f |= nbdproto.FlagReadOnly
	} else {
		f |= nbdproto.FlagSendFUA | nbdproto.FlagSendTrim | nbdproto.FlagSendWriteZeroes | nbdproto.FlagSendFastZero
	}
	if sr {
		f |= nbdproto.FlagSendDF
	}
	return f
}

// blockSizes returns the minimum and preferred block sizes to advertise,
// corrected to what the protocol allows if the backend says otherwise.
func blockSizes(b Backend) (minimum, preferred uint32) {
	minimum = 1
	if m := b.MinBlockSize(); m > 1 && m <= 64<<10 && bits.OnesCount(uint(m)) == 1 {
		minimum = uint32(m)
	}
	preferred = 4096
	if p := b.BlockSize(); p >= 512 && p <= 32<<20 && bits.OnesCount(uint(p)) == 1 {
		preferred = uint32(p)
	}
	preferred = max(preferred, minimum)
	return minimum, preferred
}

func quote(s string) string {
	if len(s) > 64 {
		s = s[:64] + "..."
	}
	return "\"" + strings.ToValidUTF8(s, "?") + "\""
}

func be32(b []byte) uint32 {
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

package repl

import (
	"context"
	"fmt"
	"time"

	"keel/netpath/replproto"
)

// The sending half of a stream: how admitted frames reach the socket.
//
// One goroutine at a time holds the stream's writer role (stream.writing,
// under stream.mu) and it alone writes to the frame connection. A
// submitter that finds the role free takes it and writes its frame itself,
// at once, with one writev that never waits for the socket: no hand-off to
// another goroutine, which at queue depth 1 costs a wake-up and a trip
// through the scheduler before the first byte goes out. A submitter that
// finds the role held appends its frame to stream.pend and returns; the
// holder, each time round, takes everything pending and writes it with one
// writev, so frames that arrive during a write go out together. The holder
// gives the role up when nothing is pending. A submitter hands the role to
// the stream's sender goroutine instead (stream.kick) when
//
//   - the socket did not take everything at once (the rest must wait for
//     the socket to drain, and a submitter must not wait for that);
//   - a frame due to go with MSG_ZEROCOPY is pending (sendmsg may wait,
//     and the ledger is the sender's);
//   - it has written directRounds times in a row: it goes back to its own
//     request rather than serve everyone else's.
//
// The sender goroutine writes with waiting writes until nothing is pending,
// then gives the role up. Without a raw socket (a Dial that returns no
// syscall.Conn) the sender writes everything.
//
// Frames reach the wire in sequence order: sequence numbers are assigned
// and frames appended to pend under stream.mu, and the one role holder
// writes pend in order, after whatever is left of an earlier write.
//
// No write deadline is set (it would cost two timer updates per write). A
// write that blocks because the peer stopped reading carries a frame or a
// PING that stays unanswered, so the watchdog goroutine, which never
// writes, fails the stream after FrameTimeout; the close ends the write.
//
// Memory ordering: a frame's header is encoded and its payload slice read
// under stream.mu (submit, take); its ACK is handled under stream.mu, after
// the bytes were sent; so the writer's reads come before the op's finish,
// and before its owner reuses it, in the memory model and not only through
// the network. After the take the writer touches an op only through its
// header array and payload (handed to the kernel), and a zero-copy op
// under stream.mu while its completion is pending.

// directRounds is how many writes a submitter makes in a row, its own and
// others' frames, before it hands the writer role to the sender goroutine.
const directRounds = 4

// submit admits op to the window, waiting for space, and sends it or
// leaves it to the writer.
func (st *stream) submit(ctx context.Context, op *Op) {
	n := 0
	if op.Req.Type.HasPayload() {
		n = len(op.Req.Payload)
		if !op.hasCRC {
			op.crc, op.hasCRC = replproto.PayloadCRC(op.Req.Payload), true
		}
	}
	op.acked, op.zcPending = false, false
	for {
		st.mu.Lock()
		if st.err != nil {
			err := st.err
			st.mu.Unlock()
			op.finish(&StreamError{Peer: st.p.cfg.Node, Err: err})
			return
		}
		if st.win.fits(n) {
			st.win.Add(op, n)
			op.queued = st.now()
			r := &op.Req
			h := replproto.Header{Type: r.Type, Flags: r.Flags, Volume: r.Volume, Epoch: r.Epoch,
				Seq: op.seq, Offset: r.Offset, Length: r.length(), PayloadCRC: op.crc}
			h.Encode(&op.hdr)
			st.pend = append(st.pend, op)
			if st.zcOn && n >= st.zcMin {
				st.pendZC = true
			}
			take := !st.writing
			st.writing = true
			more := !st.win.Full()
			st.p.m.inflightFrames.Inc()
			st.p.m.inflightBytes.Add(float64(n))
			st.mu.Unlock()
			if more {
				st.poke()
			}
			if take {
				if st.direct {
					st.write(true)
				} else {
					st.handoff()
				}
			}
			return
		}
		st.mu.Unlock()
		select {
		case <-st.space:
		case <-st.dead:
		case <-ctx.Done():
			op.finish(ctx.Err())
			return
		}
	}
}

// handoff gives the writer role to the sender goroutine. Only the role's
// holder calls it, so at most one hand-off is outstanding and the send
// never blocks.
func (st *stream) handoff() { st.kick <- struct{}{} }

// sendLoop takes the writer role when it is handed over.
func (st *stream) sendLoop() {
	defer st.wg.Done()
	for {
		select {
		case <-st.kick:
			st.write(false)
		case <-st.dead:
			return
		}
	}
}

// write runs the writer role until nothing is pending, then gives it up;
// see the comment at the top of this file. direct: the caller is a
// submitter, whose writes never wait.
func (st *stream) write(direct bool) {
	for round := 0; ; round++ {
		if len(st.out) > 0 { // the rest of a write the socket did not take at once
			if err := st.flush(true); err != nil {
				st.fail(err)
				return
			}
		}
		st.mu.Lock()
		if st.err != nil {
			st.mu.Unlock()
			return
		}
		if len(st.pend) == 0 && !st.pingDue {
			st.writing = false
			st.mu.Unlock()
			return
		}
		if direct && (round >= directRounds || st.pendZC) {
			st.mu.Unlock()
			st.handoff()
			return
		}
		batch, ping := st.takeLocked()
		st.mu.Unlock()
		err := st.sendBatch(batch, ping, direct)
		clear(batch)
		st.spare = batch[:0]
		if err != nil {
			st.fail(err)
			return
		}
		if direct && len(st.out) > 0 {
			st.handoff()
			return
		}
	}
}

// takeLocked moves what is pending to the writer: pend's frames, whose
// payload slices it collects into st.payloads, and a due PING.
// REQUIRES: st.mu, the writer role.
func (st *stream) takeLocked() (batch []*Op, ping bool) {
	batch = st.pend
	st.pend, st.spare = st.spare[:0], nil
	st.pendZC = false
	ping, st.pingDue = st.pingDue, false
	payloads := st.payloads[:0]
	for _, op := range batch {
		var p []byte
		if op.Req.Type.HasPayload() {
			p = op.Req.Payload
		}
		payloads = append(payloads, p)
	}
	st.payloads = payloads
	return batch, ping
}

// sendBatch writes a PING (when ping) and batch's frames: small ones
// together with one writev straight from the callers' buffers, large ones
// with MSG_ZEROCOPY (never when direct: takeLocked's caller hands those to
// the sender). When direct, what the socket did not take stays in st.out.
func (st *stream) sendBatch(batch []*Op, ping, direct bool) error {
	out := st.out[:0]
	if ping {
		out = append(out, st.ping[:])
	}
	var frames, wire, payload int
	for i, op := range batch {
		p := st.payloads[i]
		if st.zcOn && len(p) >= st.zcMin {
			if len(out) > 0 {
				st.out = out
				if err := st.flush(true); err != nil {
					return err
				}
				out = st.out[:0]
			}
			if err := st.sendZeroCopy(op, p); err != nil {
				return err
			}
			continue
		}
		out = append(out, op.hdr[:])
		if len(p) > 0 {
			out = append(out, p)
		}
		frames++
		wire += replproto.HeaderSize + len(p)
		payload += len(p)
	}
	clear(st.payloads)
	st.out = out
	if frames > 0 {
		m := st.p.m
		m.txFrames.Add(float64(frames))
		m.txBytes.Add(float64(wire))
		m.payload.Add(float64(payload))
		m.kernelCopy.Add(float64(payload)) // writev: the kernel copies into socket buffers
	}
	if len(out) == 0 {
		return nil
	}
	return st.flush(!direct)
}

// flush writes st.out: all of it when wait (waiting for the socket to
// drain as needed), else what one writev that never waits takes, leaving
// the rest in st.out.
func (st *stream) flush(wait bool) error {
	out := st.out
	var err error
	for len(out) > 0 {
		var n int
		if st.direct {
			n, err = st.raw.writev(st.rc, out, wait)
		} else {
			st.wbufs = out
			var n64 int64
			n64, err = st.wbufs.WriteTo(st.conn)
			n = int(n64)
			st.wbufs = nil
		}
		for n > 0 && len(out) > 0 { // drop what was written
			if k := len(out[0]); n >= k {
				out[0] = nil
				out, n = out[1:], n-k
			} else {
				out[0] = out[0][n:]
				n = 0
			}
		}
		if err != nil || !wait {
			break
		}
	}
	k := copy(st.out, out)
	clear(st.out[k:])
	st.out = st.out[:k]
	return err
}

// sendZeroCopy sends one frame with sendmsg(MSG_ZEROCOPY) and ledgers its
// ids; on ENOBUFS (locked-memory or option-memory limit) the rest of the
// frame goes with writev, counted as a fallback. Sender goroutine only.
func (st *stream) sendZeroCopy(op *Op, p []byte) error {
	// Pending and ledgered before the first byte can reach the peer: its
	// ACK, and even its completion, may be processed before this goroutine
	// runs again.
	st.mu.Lock()
	op.zcPending = true
	entry := st.zc.open(op)
	st.mu.Unlock()

	m := st.p.m
	total := replproto.HeaderSize + len(p)
	ids, off, zcBytes := 0, 0, 0
	var err error
	for off < total {
		var n int
		if fp := st.p.cfg.zcFailpoint; fp != nil {
			err = fp(ids)
		}
		if err == nil {
			n, err = st.zsys.sendZeroCopy(st.rc, op.hdr[:], p, off)
		}
		if errNoBufs(err) {
			m.fallback("enobufs")
			rest := st.iov[:0]
			if off < replproto.HeaderSize {
				rest = append(rest, op.hdr[off:], p)
			} else {
				rest = append(rest, p[off-replproto.HeaderSize:])
			}
			m.kernelCopy.Add(float64(total - max(off, replproto.HeaderSize)))
			st.wbufs = rest
			_, err = st.wbufs.WriteTo(st.conn)
			st.wbufs = nil
			clear(rest)
			break
		}
		if err != nil {
			break
		}
		st.zc.next++
		ids++
		zcBytes += max(0, min(off+n, total)-max(off, replproto.HeaderSize))
		off += n
	}
	m.zcSends.Add(float64(ids))
	if err != nil {
		// The stream fails; failAll finishes the op once the socket is gone.
		st.mu.Lock()
		st.zc.close(entry, ids, zcBytes)
		st.mu.Unlock()
		return err
	}
	m.txFrames.Inc()
	m.txBytes.Add(float64(total))
	m.payload.Add(float64(len(p)))

	st.mu.Lock()
	if !st.zc.close(entry, ids, zcBytes) {
		op.zcPending = false // nothing went zero-copy
		if op.acked {
			st.zcWait--
			st.freeLocked(op)
			st.sdone = append(st.sdone, op)
		}
	}
	st.sdone = st.reapLocked(st.sdone) // completions that arrived while the entry was open
	st.mu.Unlock()
	st.finishAll(st.sdone)
	st.sdone = st.sdone[:0]
	return nil
}

// watchLoop runs the watchdog on a ticker. It never writes to the socket,
// so a write blocked on a peer that stopped reading cannot stop it.
func (st *stream) watchLoop() {
	defer st.wg.Done()
	every := min(st.pingEvery, st.timeout/4)
	tick := time.NewTicker(time.Duration(max(every, int64(time.Millisecond))))
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			if err := st.watchdog(); err != nil {
				st.fail(err)
				return
			}
		case <-st.dead:
			return
		}
	}
}

// watchdog fails the stream when the oldest frame or a PING has gone
// unanswered past the frame deadline (a cut link stalls TCP without an
// error, and a peer that stops reading stalls the writer), and asks for a
// PING when one is due: the writer sends it, or the sender goroutine when
// no one holds the role.
func (st *stream) watchdog() error {
	now := st.now()
	st.mu.Lock()
	var oldest int64 = -1
	if op := st.win.Oldest(); op != nil {
		oldest = op.queued
	}
	pingOut, pingAt := st.pingOut, st.pingAt
	st.mu.Unlock()
	if oldest >= 0 && now-oldest > st.timeout {
		return fmt.Errorf("%w: oldest frame unanswered for %v", ErrTimeout, time.Duration(now-oldest).Round(time.Millisecond))
	}
	if pingOut {
		if now-pingAt > st.timeout {
			return fmt.Errorf("%w: PING unanswered for %v", ErrTimeout, time.Duration(now-pingAt).Round(time.Millisecond))
		}
		return nil
	}
	if now-pingAt < st.pingEvery {
		return nil
	}
	st.mu.Lock()
	st.pingOut, st.pingAt = true, now
	// The previous PING has been answered, so no write still reads st.ping.
	h := replproto.Header{Type: replproto.TypePing, Aux: uint64(now)}
	h.Encode(&st.ping)
	st.pingDue = true
	take := !st.writing
	st.writing = true
	st.mu.Unlock()
	if take {
		st.handoff()
	}
	return nil
}

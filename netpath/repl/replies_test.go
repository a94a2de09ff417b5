package repl_test

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"keel/netpath/repl"
	"keel/netpath/replproto"
)

// TestRepliesTogether: of replies that arrive together (one write from the
// replica: an ACK, a NACK, then an ACK for no frame in flight), the ACKed
// op succeeds, the NACKed one fails with its reason and is reported, and
// the bogus reply fails the stream, and with it the op still unanswered.
func TestRepliesTogether(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	served := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		var b [replproto.HeaderSize]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			served <- err
			return
		}
		(&replproto.Header{Type: replproto.TypeHelloAck, Aux: 2}).Encode(&b)
		c.Write(b[:])
		var seqs []uint64
		for len(seqs) < 3 {
			if _, err := io.ReadFull(c, b[:]); err != nil {
				served <- err
				return
			}
			var h replproto.Header
			if err := h.Decode(&b); err != nil {
				served <- err
				return
			}
			if h.Type == replproto.TypePing {
				continue
			}
			if _, err := io.CopyN(io.Discard, c, int64(h.PayloadLen())); err != nil {
				served <- err
				return
			}
			seqs = append(seqs, h.Seq)
		}
		var out []byte
		for _, r := range []replproto.Header{
			{Type: replproto.TypeAck, Volume: 1, Epoch: 1, Seq: seqs[0]},
			{Type: replproto.TypeNack, Volume: 1, Epoch: 1, Seq: seqs[1], Code: replproto.ReasonIO, Aux: uint64(syscall.EIO)},
			{Type: replproto.TypeAck, Volume: 1, Epoch: 1, Seq: seqs[2] + 100},
		} {
			r.Encode(&b)
			out = append(out, b[:]...)
		}
		_, err = c.Write(out)
		served <- err
		io.Copy(io.Discard, c)
	}()

	lost := make(chan repl.Loss, 4)
	p := repl.NewPeer(repl.PeerConfig{Self: 1, Node: 2, Addr: l.Addr().String(), ZeroCopyMin: -1,
		BackoffMin: time.Hour, OnPeerLost: func(l repl.Loss) { lost <- l }})
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.WaitUp(ctx); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 3)
	ops := make([]repl.Op, 3)
	for i := range ops {
		ops[i] = repl.Op{Req: repl.Request{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Offset: uint64(i) * 4096,
			Payload: make([]byte, 4096)}, Done: func(*repl.Op) { done <- nil }}
		p.Submit(ctx, &ops[i])
	}
	if err := within(t, served, 10*time.Second, "the replies to be written"); err != nil {
		t.Fatalf("scripted replica: %v", err)
	}
	for range ops {
		within(t, done, 10*time.Second, "an op to finish")
	}
	if err := ops[0].Err(); err != nil {
		t.Errorf("ACKed op: %v", err)
	}
	var nack *repl.NackError
	if err := ops[1].Err(); !errors.As(err, &nack) || nack.Reason != replproto.ReasonIO || !errors.Is(err, syscall.EIO) {
		t.Errorf("NACKed op: %v, want a NackError for EIO", err)
	}
	if err := ops[2].Err(); !errors.Is(err, repl.ErrPeerLost) || !errors.Is(err, repl.ErrProtocol) {
		t.Errorf("unanswered op: %v, want the stream lost on a protocol error", err)
	}
	if l := within(t, lost, 10*time.Second, "the NACK's loss report"); l.Volume != 1 {
		t.Errorf("first loss report %+v, want volume 1's", l)
	}
}

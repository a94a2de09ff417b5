// Package repl owns keel's synchronous replication between nodes: the
// primary side (Peer, Fanout) that sends each replicated operation to every
// in-sync peer node and waits for all of them, and the replica side
// (Server) that applies the frames through a consumer-owned Applier. The
// frame format is netpath/replproto's; sockets come from netpath/sock
// (pinned to the replication network) through PeerConfig.Dial and the
// listener given to Server.Serve. It imports no volume and no coordinator:
// the node wires them in (it implements Applier and reacts to OnPeerLost and
// the Fence).
//
// # Streams
//
// A node keeps one long-lived stream to each peer node (not one per
// volume); it carries the frames of every volume replicated there. A Peer
// has an explicit in-flight window (frames and bytes; Full, Add on send,
// Free on answer) and numbers frames per stream. One goroutine at a time
// holds the writer role: a submitter that finds it free writes its frame
// itself (one non-blocking writev straight from the caller's buffer);
// frames submitted meanwhile are batched by the holder; the sender
// goroutine takes the role only for short writes, MSG_ZEROCOPY frames
// (large payloads) and PINGs. A watchdog goroutine fails the stream on a
// missed deadline: a blocked write is caught by its unanswered frame (no
// write deadline). The receiver reads ACK, NACK and PONG; with
// MSG_ZEROCOPY on, the completion reaper reads the socket's error queue.
// No goroutine is started per write: Fanout takes pooled op structs and
// waits on one channel. The detail is at the top of send.go.
//
// With MSG_ZEROCOPY on (the default for TCP), a stream is two connections:
// frames go on the first, which this side never reads after the handshake,
// and replies come back on the second (replproto: FlagSplit/FlagReplies).
// The reason is Go's netpoller: a zero-copy completion queued on a socket
// whose send buffer is full raises EPOLLERR alone, and the runtime then
// fails every pending and later Read on that socket ("not pollable") until
// another event arrives. Reads from a socket without zero-copy sends are
// unaffected; writes ignore the error flag. Without zero-copy the stream is
// one connection.
//
// A frame unanswered after FrameTimeout, a PING unanswered as long, a
// write to the socket blocked as long, a reset, or a protocol violation
// fails the whole stream: every frame still in its window fails with a
// *StreamError (ErrPeerLost), OnPeerLost reports the peer with Volume 0, and
// the Peer reconnects with jittered exponential backoff. A NACK fails only
// its frame: a stale epoch marks the volume in the Fence (ErrFenced); any
// other reason (disk error, unknown volume, corrupt payload) reports the
// peer lost for that volume. Frames submitted while the stream is down fail
// at once (ErrPeerDown). A Peer never reports success for a frame the peer
// did not acknowledge.
//
// # Buffer ownership
//
// Request.Payload is borrowed: the caller (the node, holding the iobuf
// buffer that came off the NBD socket and went to the local disk) must not
// modify or release it until Fanout/Send has returned or Op.Done has been
// called. For a frame sent with MSG_ZEROCOPY that moment is after both its
// ACK and the kernel's completion notification for every sendmsg that
// carried it; if the stream fails first, after the socket has been reset
// and closed (SO_LINGER 0 drops the send queue). On the replica, the
// reader takes an iobuf buffer per payload, reads into it straight from the
// socket, and releases it after the frame is answered; the Applier only
// borrows it for the call. The payload's last bytes and the next frame's
// header come in one readv (payload buffer, then a one-header scratch
// area), so back-to-back WRITE frames cost one read system call each and
// no payload byte lands anywhere but in its buffer (rx.go).
//
// # Copies per replicated byte
//
// In user space: none. The sender hands the caller's buffer to writev or
// sendmsg; the replica reads into the buffer it then hands to the Applier.
// The only bytes copied in user space are 64-byte headers (a replica
// encodes replies into a batch buffer; the primary reads replies through a
// bufio.Reader). keel_repl_user_copy_bytes_total exists so that a future
// path that copies (a TLS transport, say) shows up; it stays 0.
// In the kernel: writev copies each payload once into socket buffers
// (counted in keel_repl_kernel_copy_bytes_total); MSG_ZEROCOPY pins the
// pages instead, unless the kernel reports it copied anyway
// (SO_EE_CODE_ZEROCOPY_COPIED: always on loopback and veth), which is
// counted as a kernel copy too; keel_repl_zerocopy_bytes_total counts the
// bytes that truly went without one. ENOBUFS (locked-memory or option-memory
// limit) falls back to writev for the rest of the frame, counted in
// keel_repl_zerocopy_fallback_total. The replica's read is one kernel copy
// from the socket into the aligned buffer.
//
// # Replica ordering and fencing
//
// See volState: overlapping frames are applied in stream order, disjoint
// ones concurrently on a bounded worker pool (ServerConfig.Workers); FLUSH
// waits for every earlier frame of its volume; a higher epoch is persisted
// through Applier.ApplyEpoch after every earlier frame is answered and
// before anything at that epoch is; a lower epoch is refused with NACK
// stale epoch carrying the replica's epoch. A new stream from a primary node
// closes that node's previous stream and waits for its reader before reading
// anything, so frames still buffered on a dead connection cannot land after
// newer ones. A WRITE alone in flight on its stream (queue depth 1, and no
// byte of a next frame read yet) is applied through SyncApplier.WriteAtSync
// when the Applier has it, on the stream's reader goroutine itself: a
// blocking write with no hand-off to a worker and no completion wake-up
// (keel_repl_server_inline_writes_total counts them). A frame that arrives
// meanwhile waits in the socket for that one write.
// Replies are written by a per-stream writer in batches or, when
// the stream has no other frame in flight, directly by the worker with one
// non-blocking write.
//
// The Applier gets each write, trim and zeroing with its frame's flags:
// FUA, no-hole, and the recovery flags (replproto): FlagDegraded (record
// the range in the write-intent bitmap before applying it; a live frame
// without it means the volume is fully in sync again) and FlagSync (a
// catch-up or re-mirror copy). keel_repl_server_applied_bytes_total counts
// the applied range bytes by class (live, degraded, sync). Copy frames
// travel on the same stream as live writes and are ordered with them like
// any other frame, which is what lets a primary copy a range under its
// range lock while live writes to the member go on.
//
// # Locks
//
// Peer.mu guards upCh; stream.mu guards the window, the zero-copy ledger,
// the ping state and the failure cause; Fence.mu its map; Server.mu the
// volume map, streams, split-stream pairing and listeners; Server.qmu the
// ready queue; volState.mu one volume's ordering state and epochs; sconn.mu
// a stream's credit; sconn.wmu its pending replies and who writes them. No
// two are held at once, except that volState.mu is taken under Server.mu by
// Forget.
//
// # Wiring (for the node)
//
//	fence := repl.NewFence(onFenced)           // one per node
//	m := repl.NewMetrics(registry)
//	d, _ := sock.NewDialer(sock.Config{Class: sock.Replication, Iface: ..., Source: ...})
//	p := repl.NewPeer(repl.PeerConfig{Self: me, Node: peer, Addr: ..., Dial: d.DialContext,
//		Fence: fence, OnPeerLost: report, Metrics: m, Logger: log})
//	err := repl.Fanout(ctx, inSyncPeers, &req, results) // per write, after the local write
//	if fence.Fenced(vol, epoch) { /* stop acknowledging writes of vol */ }
//
//	l, st, _ := sock.Listen(ctx, sock.Config{Class: sock.Replication, ...}, addr)
//	srv := repl.NewServer(repl.ServerConfig{Node: me, Applier: replicas, Metrics: m})
//	go srv.Serve(l)
//	srv.RaiseEpoch(vol, e) // when the coordinator announces a new epoch to a replica
package repl

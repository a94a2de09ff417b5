// Package node is keel's wiring layer: it assembles volumes (datapath), the
// NBD front end and replication (netpath) and the coordinator agent (ctl)
// into running processes, and gives the keel binary its cobra commands for
// them: `keel serve` (one standalone volume), `keel node` (a storage node
// of a cluster) and `keel up` (a whole cluster on one machine).
//
// Nothing here implements a protocol or a disk format; it chooses which
// implementations run together, checks at compile time that they fit the
// interfaces their consumers own (nbd.Backend, repl.Applier), and owns
// process concerns: flags, signals, listeners, the metrics endpoint and
// orderly shutdown.
//
// # A storage node (keel node)
//
// A Node runs:
//
//   - a coordclient.Agent: registration, a heartbeat every lease interval
//     carrying capacity, free space (statfs of the data directory, or
//     --capacity) and one ReplicaReport per open replica (its persisted
//     epoch and health); the answer carries the node's assignments;
//   - a reconciler goroutine fed by the agent's OnChange (which only hands
//     the update over, so heartbeats never wait for disk work): it opens or
//     creates DataDir/<vol-N>.vol for each assignment, acts as primary or
//     secondary at the assigned epoch, and closes replicas taken away
//     (deleting the file when the coordinator no longer knows the volume);
//     a pass that failed somewhere is retried every 2 s;
//   - an NBD server on the primary network (netpath/sock pinned listener):
//     a volume this node leads is exported under its name and under its
//     id, with a Backend as the export's backend;
//   - a repl.Server on the replication network, applying other primaries'
//     streams to local replicas through applier; one repl.Peer per remote
//     node this node replicates to, shared by all its volumes;
//   - a watchdog that recomputes replica health twice per ImpairedAfter (at
//     least every second) and
//     asks for a heartbeat when it changed;
//   - as primary of a volume with out-of-sync members, the sync engine
//     (sync.go): one task per member being brought back (Recovery, below);
//   - the recovery throttle (netpath/sock.Throttle, Config.Throttle and the
//     --repl-bandwidth, --repl-floor, --recovery-rate flags), changeable at
//     run time through GET/PUT /v1/throttle on the metrics address (keel
//     node throttle).
//
// Identifiers: netpath/repl numbers nodes and volumes with uint64. A volume
// "vol-N" is N (coordapi.ParseVolumeID); a node is NodeNum(id), the FNV-64a
// hash of its NodeID (see NodeNum for collisions).
//
// # Roles and epochs
//
// Each open replica has a view: primary or not, the epoch it acts on, and
// (as primary) the in-sync secondaries. A view is immutable; changing it
// replaces it and wakes requests waiting for a change.
//
//   - Becoming primary (a new volume, a promotion after failover, an epoch
//     change after a replica loss): the epoch is persisted first, through
//     repl.Server.RaiseEpoch, which waits until every frame the replica had
//     accepted from an older primary is answered (so none of them is applied
//     after this node starts serving); then the view is published, the
//     streams to the in-sync secondaries are awaited (up to PeerWait) and the
//     exports are added.
//   - Not primary (secondary, out of sync, handed over): the view is
//     replaced at once (every request checks it before it is acknowledged),
//     the exports are removed (their sessions finish in-flight requests,
//     which are refused, and close), and a higher assigned epoch is
//     persisted with RaiseEpoch: from then on the replica refuses frames of
//     older epochs, which is what fences a deposed primary.
//
// # The write path (Backend, on the primary)
//
// WRITE, TRIM, WRITE_ZEROES and FLUSH go through replica.replicate:
//
//  1. Take the range lock (volume.RangeLock) over the request's byte range
//     (not for FLUSH). It is held until step 5, so overlapping requests are
//     sent to every secondary and applied locally in one order (invariant 3;
//     the secondaries' repl.Server keeps stream order for overlapping
//     frames); disjoint ones run concurrently.
//  2. Check authority on the current view: primary, not fenced
//     (repl.Fence: no replica answered a stale-epoch NACK above this
//     epoch), and Agent.Authority(vol, epoch, now): a valid lease and a
//     primary assignment at exactly this epoch. Otherwise ESHUTDOWN (if the
//     agent already knows a newer primary epoch for this node, wait for the
//     view to catch up instead).
//  3. Submit the frame to every in-sync secondary's Peer (asynchronously,
//     with the caller's buffer: the aligned iobuf buffer the NBD layer read
//     the payload into, zero-copy), then do the local operation on the
//     calling goroutine, then wait for every frame's outcome. The buffer is
//     borrowed until then; nothing is allocated (ops are pooled in a round).
//     A FAST_ZERO zeroing is done locally first (ENOTSUP must change
//     nothing anywhere), then replicated.
//  4. A local error is returned as its errno. Each secondary's outcome:
//     acknowledged; stale-epoch NACK (ErrFenced): if this node is about to
//     act on a newer epoch (its agent has it, or its own loss report is
//     being answered) wait for it and send again, else ESHUTDOWN at once;
//     stream down or volume not open there yet (ErrPeerDown,
//     ErrUnknownVolume, within PeerWait of the request's start): wait for
//     the stream or the replica and send again; anything else (reset,
//     timeout, disk error on the secondary...): the secondary is lost.
//  5. Settle: for each lost secondary, report it (Agent.ReportReplicaLoss;
//     one report at a time per volume, shared by every request that failed
//     on it) and wait, up to LossWait, until the coordinator's answer moves
//     the volume to a newer epoch whose in-sync set lacks it; meanwhile the
//     replica reports health impaired ("writes wait for the coordinator").
//     Then, under the current view, send the request again to every in-sync
//     secondary that has not acknowledged it, check authority again, and
//     return nil (the acknowledgement) only when every member of the current
//     epoch's in-sync set has acknowledged it (invariant 5). A loss not
//     settled within LossWait fails the request with EIO.
//
// In a degraded view (a member is out of sync at this epoch), step 3 is
// preceded by recording the request's range in the volume's write-intent
// bitmap (volume.MarkDirty, durable before it returns; free when the
// region is marked already), and the frames carry FlagDegraded. A request
// that finds an in-sync secondary lost records its range too, before the
// loss is reported (with every region written since the last FLUSH all
// in-sync secondaries acknowledged: the lost one may not hold those writes
// durably), and once the loss is settled sends the request again
// (degraded) to the secondaries that had acknowledged it, so that their
// bitmaps hold it as well.
//
// FUA travels as the frame's FUA flag (the secondary's write is durable
// before its ACK); FLUSH is fdatasync here and a FLUSH frame to each
// in-sync secondary, which the secondary runs after every earlier frame of
// the volume, so a FLUSH reply means durable on every in-sync replica
// (invariant 1). Reads, CACHE and BLOCK_STATUS are local, after the
// authority check: the local replica holds every acknowledged write.
//
// Resending is safe because the range lock is still held (no overlapping
// write can be between the two sends) and the operations are idempotent.
//
// # Recovery (invariant 6)
//
// The write-intent bitmap. While a member is out of sync, the primary
// marks every write's regions before issuing it (above), and every in-sync
// secondary marks the ranges of the FlagDegraded frames it applies
// (applier.applyFlags): so whichever in-sync replica leads later, its
// bitmap covers every write the out-of-sync member may lack, a crash at any
// point included. A secondary clears its bitmap at the first live frame
// without FlagDegraded; the primary clears its own when it acts on a view
// with every member in sync.
//
// The sync engine (sync.go), primary side. For each member whose
// assignment Peer is out of sync and live (its node holds a lease), a task:
//
//	RequestSync ──refused──▶ wait retry_after + backoff with jitter (capped) ──▶ again
//	     │granted (catch_up or remirror)
//	     ▼
//	attach: the member becomes a catching peer of a new view at the same
//	epoch, behind the whole-volume range lock (every write in flight done
//	and marked; every later one sent to it, FlagDegraded, its answer not
//	counted and its failure only restarting the task)
//	     ▼
//	plan: catch_up = the bitmap's dirty regions, taken after the attach;
//	remirror (or no bitmap) = the whole volume
//	     ▼
//	copy each range in chunks of up to 4 MiB: throttle.Wait, range lock,
//	O_DIRECT read into an iobuf buffer (a range that is all holes or zeroes
//	goes as a ZEROES frame), WRITE|SYNC frame to the member from that same
//	buffer, wait for its ACK, unlock; up to 4 chunks in flight at once,
//	each with its own buffer and lock; progress in every heartbeat
//	(ReplicaReport.Syncs: done, total, rate), which keeps the slot
//	     ▼
//	FLUSH the member; whole-volume range lock again (no write in flight can
//	fail on the member now); no live write failed → Rejoin → act on the
//	answer: the member is in sync at the next epoch
//
// A failure (a live write or a copy frame refused, the stream down, the
// rejoin refused) detaches the member and starts over after a backoff; the
// coordinator's stale-epoch and similar answers make the task wait for the
// next assignment, which stops it (another epoch, the member in sync or
// gone, its node not live) or lets it go on. Stepping down and stopping the
// node stop every task. While a rejoin's outcome is unknown (a transport
// error), writes stay behind the range lock and the rejoin is asked again
// while this node may still act at the epoch: otherwise a write could be
// acknowledged without a member the coordinator already counts in sync.
//
// The secondary side of a returning member is the ordinary one: its node
// reopens the replica file (the data stays) and applies frames at the
// current epoch. A replica no longer assigned here is deleted once nothing
// can need it: the volume is gone, or this node is no longer a member and
// every member is in sync (re-mirrored elsewhere: the coordinator then
// releases the space it kept quarantined here); until then the file is
// kept and checked again every orphanCheck. Files of volumes that are not
// assigned here at start are treated the same way.
//
// # Timing
//
// Defaults (Timing, flags of keel node): LossWait 30 s, PeerWait 5 s,
// FrameTimeout 5 s (repl's frame deadline and the replication sockets'
// TCP_USER_TIMEOUT: a cut link is noticed within it), ImpairedAfter 5 s.
// A cut replication link therefore stalls writes for about FrameTimeout
// plus one coordinator round trip; the volume shows impaired after
// ImpairedAfter and one heartbeat. The lease itself is the coordinator's
// (coordapi.Lease; keel up uses 5 s): a failover after a node dies takes
// about one lease.
//
// # Locks
//
// Node.mu guards the replica map and the latest assignments; the
// reconciler goroutine alone owns Node.exported, Node.dirty and the
// orphan files. replica.setMu serialises view changes; replica.lossMu
// guards the loss queue; replica.syncMu the sync tasks; replica.markMu
// orders bitmap marks (shared) against clearing (exclusive);
// replicator.mu the Peer map; applier.mu its volume map. Order, where
// more than one is held: the range lock (a request's, or the sync
// engine's whole-volume barrier) → setMu → syncMu or replicator.mu. A
// view change (setMu) takes replicator.mu to look up Peers and syncMu to
// start and stop tasks; nothing waits for a range lock while holding
// another lock.
//
// # keel up
//
// The coordinator and the nodes are child processes of the same binary
// (keel coord, keel node), in their own process group, so that killing one
// node (kill -9) is a real failover and Ctrl-C reaches only keel up, which
// stops the nodes, then the coordinator. Ports: coordinator 7400 (raft
// 7401), node i (from 0) NBD 10809+i, replication 10909+i, metrics 9401+i.
//
// # Not here yet
//
// Replicas report durable sequence 0: the coordinator promotes among
// in-sync members by its other criteria, which is safe because every
// in-sync member holds every acknowledged write.
//
// A secondary that loses power loses the writes it acknowledged but had
// not made durable (no FUA, no FLUSH since). The primary tracks the regions
// written since the last FLUSH every in-sync secondary acknowledged
// (unflushed.go) and marks them when it loses a secondary, so that
// secondary's catch-up copies them. The other secondaries' bitmaps do not
// get those regions: if the primary is lost too before the catch-up, the
// member promoted next does not know them (two failures in a row).
package node

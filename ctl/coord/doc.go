// Package coord owns the coordinator's state machine: which nodes exist and
// whether their leases are valid, which volumes exist, where their replicas
// are, which replica is the writable primary at which epoch, and the rules
// that change any of it (placement, the capacity reserve, lease expiry and
// promotion, replica loss, draining).
//
// It is pure and deterministic: no network, no disk, no clock reads, no
// randomness, no map iteration order leaking into results. Time enters only
// as Command.At, stamped by whoever proposes the command (in keel, the raft
// leader's clock; in the storm simulator, the simulated clock). The same
// sequence of commands gives the same state and the same results on every
// member, which is what lets ctl/coordsvc replicate it with raft.
//
// # Rules
//
//   - Placement: a volume's replicas go to distinct live, non-draining
//     nodes, spread over as many zones as the cluster offers, most available
//     space first; a node qualifies only if the replica leaves its reserve
//     (Config.ReserveFraction of its capacity) untouched. Available space is
//     min(capacity - allocated, reported free) - reserve.
//   - One primary per volume per epoch. Every change of primary or in-sync
//     set takes epoch + 1. The in-sync set changes only when the primary
//     reports a lost replica, and on promotion (members whose lease lapsed
//     leave it).
//   - Lease expiry (Tick): a node whose lease expired loses its authority.
//     For each volume it led, the live in-sync member ranked best is
//     promoted with epoch + 1; best means not draining, then highest
//     reported durable sequence, then lowest ID. With no candidate the
//     volume has no primary (impaired) until an in-sync member heartbeats.
//   - Drain: the node gets no new replicas; for each volume it leads that
//     has another live in-sync member, the primary role is handed over in
//     two steps so that two primaries never hold valid leases at once:
//     epoch + 1 with no primary (fenced), and once the old primary reports
//     that epoch (it has stepped down) or its lease lapses, the promotion
//     above.
//   - Reports older than a volume's current epoch are ignored.
//   - Recovery (recovery.go has the full rules): a member out of sync is
//     caught up or re-mirrored by its primary under a slot the machine
//     grants within cluster-wide and per-node limits; it rejoins the
//     in-sync set at epoch + 1. One absent past the grace is given up, its
//     space quarantined, and a replacement placed (the reserve may be
//     used). Many losses at once put the cell in mass-failure mode, which
//     places nothing and admits no re-mirror until the losses subside.
//   - A rejected command changes nothing.
//
// # Log entry format (version 2; version 1 is still read)
//
// Each raft log entry is one Command as JSON:
//
//	{"v":2, "op":"heartbeat", "at":"2026-11-27T10:00:00.5Z",
//	 "heartbeat":{"node":"n1","capacity":..., "free":..., "replicas":[
//	    {"volume":"vol-1","epoch":3,"durable_seq":9,
//	     "syncs":[{"target":"n2","kind":"catch_up","done":..,"total":..,"rate":..}]}]}}
//	{"v":2, "op":"sync", "at":..., "sync":{"volume":"vol-1","node":"n1","epoch":3,"target":"n2"}}
//	{"v":2, "op":"rejoin", "at":..., "rejoin":{"volume":"vol-1","node":"n1","epoch":3,
//	 "target":"n2","kind":"catch_up","copied":41943040}}
//
// "v" is the format version (entries of a version outside 1..2 are refused
// by DecodeCommand); "op" names the operation and exactly the payload field
// of the same name is set: configure, register, heartbeat, replica_loss,
// create_volume, delete_volume, drain, tick (no payload), rebase (no
// payload), set_member, remove_member, and from version 2 sync and rejoin
// (a version 1 entry carrying them is refused). "at" is the proposer's
// clock (UTC). A version 1 entry applies with today's rules (a tick also
// runs recovery), the same way on every member.
//
// # Snapshot format (version 2; version 1 is still read)
//
// A snapshot is one JSON object, every list sorted by ID so that equal
// states encode to equal bytes:
//
//	{"version": 1,
//	 "now": time of the last command applied,
//	 "config": Config, "configured": bool,
//	 "next_volume": N (the next volume is vol-N),
//	 "cell":    [CellMember...],
//	 "nodes":   [{"id","zone","primary_addr","repl_addr","capacity","free",
//	              "up","since","lease_expiry","draining","registered"}...],
//	 "volumes": [{"id","name","size","replicas","epoch","primary",
//	              "releasing","members":[{"node","in_sync","reported_epoch",
//	              "durable_seq","health","health_reason",
//	              "out_of_sync_since","full_copy","replaces",
//	              "slot":{"kind","source","granted","renewed","done","total","rate"}}...],
//	              "state","reason","since","created","request_id",
//	              "prev_primary","prev_lost","quarantine":[node...]}...],
//	 "recovery": {"mode","mode_since","mode_reason","losses":[time...],
//	              "place_retry","slots_granted","slots_refused","rejoins",
//	              "placed","gone","copied_catch_up","copied_remirror"}}
//
// Derived indexes (a node's volumes, its allocated and quarantined bytes,
// its slot counts, names) are rebuilt on restore. Restore refuses an
// unknown version. A version 1 snapshot has no recovery fields: the cell
// restores in normal mode and each out-of-sync member counts as out of
// sync since the snapshot's time.
package coord

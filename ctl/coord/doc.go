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
//   - A rejected command changes nothing.
//
// # Log entry format (version 1)
//
// Each raft log entry is one Command as JSON:
//
//	{"v":1, "op":"heartbeat", "at":"2026-11-27T10:00:00.5Z",
//	 "heartbeat":{"node":"n1","capacity":..., "free":..., "replicas":[...]}}
//
// "v" is the format version (entries of an unknown version are refused by
// DecodeCommand); "op" names the operation and exactly the payload field of
// the same name is set: configure, register, heartbeat, replica_loss,
// create_volume, delete_volume, drain, tick (no payload), rebase (no
// payload), set_member, remove_member. "at" is the proposer's clock (UTC).
//
// # Snapshot format (version 1)
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
//	              "durable_seq","health","health_reason"}...],
//	              "state","reason","since","created","request_id"}...]}
//
// Derived indexes (a node's volumes, its allocated bytes, names) are rebuilt
// on restore. Restore refuses an unknown version.
package coord

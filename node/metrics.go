package node

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the node's own series: the replicated data path's decisions.
// Bytes, frames and latencies are counted where the frames are
// (netpath/nbd per export, netpath/repl per peer, netpath/sock per path).
type metrics struct {
	lossReports *prometheus.CounterVec // by outcome: resolved, timeout, deposed
	refused     *prometheus.CounterVec // requests answered ESHUTDOWN, by reason
	resent      prometheus.Counter     // frames sent again to a peer (new epoch, reconnect)
	waiting     prometheus.Gauge       // requests waiting on the coordinator
	replicas    *prometheus.GaugeVec   // replicas open here, by role
	impaired    prometheus.Gauge       // replicas whose health is impaired

	// The sync engine (catch-up and re-mirror, as primary).
	slotRequests *prometheus.CounterVec // by result: granted, refused, error
	syncs        *prometheus.CounterVec // finished attempts, by outcome
	syncsRunning prometheus.Gauge       // copies holding a slot now
	syncBytes    *prometheus.CounterVec // bytes copied, by kind and how (data, zeroes)
	dirtyBytes   prometheus.Gauge       // bytes the write-intent bitmaps of the replicas here mark
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		lossReports: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_node_replica_loss_reports_total",
			Help: "Replica losses this node reported as primary, by outcome (resolved: the coordinator answered with a new epoch; gone: the peer left the in-sync set otherwise; timeout; deposed: this node stopped being primary).",
		}, []string{"outcome"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_node_refused_requests_total",
			Help: "Requests answered ESHUTDOWN, by reason (not_primary, fenced, no_authority, loss_timeout).",
		}, []string{"reason"}),
		resent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "keel_node_resent_frames_total",
			Help: "Replicated operations sent again to a peer: after a reconnect, or at a newer epoch.",
		}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keel_node_requests_waiting_coordinator",
			Help: "Write requests waiting for the coordinator to settle a replica loss or an epoch.",
		}),
		replicas: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keel_node_replicas",
			Help: "Replicas open on this node, by role.",
		}, []string{"role"}),
		impaired: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keel_node_replicas_impaired",
			Help: "Replicas whose health this node reports as impaired.",
		}),
		slotRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_node_sync_slot_requests_total",
			Help: "Catch-up and re-mirror slot requests this node made as primary, by result (granted, refused: wait and ask again, error).",
		}, []string{"result"}),
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_node_syncs_total",
			Help: "Copies to out-of-sync members that ended, by outcome (rejoined: the member is in sync again; failed: starts over after a backoff; stopped: no longer asked for).",
		}, []string{"outcome"}),
		syncsRunning: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keel_node_syncs_running",
			Help: "Copies to out-of-sync members running now (holding a slot).",
		}),
		syncBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_node_sync_bytes_total",
			Help: "Bytes copied to out-of-sync members and acknowledged, by kind (catch_up, remirror) and how (data: read from the replica and sent; zeroes: a range all zeroes here, sent as a ZEROES frame).",
		}, []string{"kind", "how"}),
		dirtyBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keel_node_dirty_bytes",
			Help: "Bytes the write-intent bitmaps of the replicas on this node mark as possibly differing from an out-of-sync member.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.lossReports, m.refused, m.resent, m.waiting, m.replicas, m.impaired,
			m.slotRequests, m.syncs, m.syncsRunning, m.syncBytes, m.dirtyBytes)
	}
	return m
}

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
	}
	if reg != nil {
		reg.MustRegister(m.lossReports, m.refused, m.resent, m.waiting, m.replicas, m.impaired)
	}
	return m
}

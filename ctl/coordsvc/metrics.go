package coordsvc

import (
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"

	"keel/ctl/coord"
	"keel/ctl/coordapi"
)

// metrics are one member's Prometheus metrics.
type metrics struct {
	calls       *prometheus.CounterVec   // class, outcome
	shed        *prometheus.CounterVec   // class
	inflight    *prometheus.GaugeVec     // class
	duration    *prometheus.HistogramVec // class
	forwarded   *prometheus.CounterVec   // class
	expiries    prometheus.Counter
	promotions  prometheus.Counter
	leaderTerms prometheus.Counter
	applied     *prometheus.CounterVec // op, result
}

func newMetrics(reg prometheus.Registerer, s *Server) *metrics {
	m := &metrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_coord_calls_total", Help: "API calls by operation class and outcome (ok, client_error, shed, server_error).",
		}, []string{"class", "outcome"}),
		shed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_coord_shed_total", Help: "API calls shed with 503 because the class had no free slot.",
		}, []string{"class"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keel_coord_inflight", Help: "API calls being handled, by class.",
		}, []string{"class"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "keel_coord_call_seconds", Help: "API call latency by class (admitted calls).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"class"}),
		forwarded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_coord_forwarded_total", Help: "Writes this member forwarded to the raft leader.",
		}, []string{"class"}),
		expiries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "keel_coord_lease_expiries_total", Help: "Node leases expired (as applied on this member).",
		}),
		promotions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "keel_coord_primary_elections_total", Help: "Primaries promoted at a new epoch (as applied on this member).",
		}),
		leaderTerms: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "keel_coord_raft_leadership_acquired_total", Help: "Times this member became the raft leader.",
		}),
		applied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_coord_applied_total", Help: "Raft log entries applied by operation and result (ok, refused).",
		}, []string{"op", "result"}),
	}
	reg.MustRegister(m.calls, m.shed, m.inflight, m.duration, m.forwarded, m.expiries, m.promotions, m.leaderTerms, m.applied, &stateCollector{s: s})
	for _, c := range coordapi.Classes {
		m.shed.WithLabelValues(string(c))
		m.inflight.WithLabelValues(string(c))
	}
	return m
}

func (m *metrics) observeApply(op coord.Op, r coord.Result) {
	res := "ok"
	if r.Err != nil {
		res = "refused"
	}
	m.applied.WithLabelValues(string(op), res).Inc()
	for _, e := range r.Events {
		switch e.Kind {
		case coord.EventLeaseExpired:
			m.expiries.Inc()
		case coord.EventPromoted:
			m.promotions.Inc()
		}
	}
}

// stateCollector reports raft state and the cluster's volume and node
// states at scrape time.
type stateCollector struct{ s *Server }

var (
	raftStateDesc = prometheus.NewDesc("keel_coord_raft_state", "1 for this member's current raft state.", []string{"state"}, nil)
	raftTermDesc  = prometheus.NewDesc("keel_coord_raft_applied_index", "Last raft index applied on this member.", nil, nil)
	volumesDesc   = prometheus.NewDesc("keel_coord_volumes", "Volumes by state.", []string{"state"}, nil)
	nodesDesc     = prometheus.NewDesc("keel_coord_nodes", "Nodes by lease state.", []string{"state"}, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- raftStateDesc
	ch <- raftTermDesc
	ch <- volumesDesc
	ch <- nodesDesc
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	if r := c.s.raft; r != nil {
		cur := r.State()
		for _, st := range []raft.RaftState{raft.Follower, raft.Candidate, raft.Leader, raft.Shutdown} {
			v := 0.0
			if st == cur {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(raftStateDesc, prometheus.GaugeValue, v, st.String())
		}
		ch <- prometheus.MustNewConstMetric(raftTermDesc, prometheus.GaugeValue, float64(r.AppliedIndex()))
	}
	vols := map[coordapi.VolumeState]int{coordapi.StateOK: 0, coordapi.StateDegraded: 0, coordapi.StateImpaired: 0, coordapi.StateFenced: 0}
	nodes := map[coordapi.NodeState]int{coordapi.NodeUp: 0, coordapi.NodeExpired: 0}
	c.s.fsm.read(func(m *coord.Machine) {
		for _, v := range m.Volumes(false) {
			vols[v.State]++
		}
		for _, n := range m.Nodes() {
			nodes[n.State]++
		}
	})
	for st, n := range vols {
		ch <- prometheus.MustNewConstMetric(volumesDesc, prometheus.GaugeValue, float64(n), string(st))
	}
	for st, n := range nodes {
		ch <- prometheus.MustNewConstMetric(nodesDesc, prometheus.GaugeValue, float64(n), string(st))
	}
}

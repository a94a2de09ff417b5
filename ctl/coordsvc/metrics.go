package coordsvc

import (
	"log/slog"
	"strings"

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
	// Recovery, as applied on this member.
	slotGrants   *prometheus.CounterVec // kind
	slotRefusals *prometheus.CounterVec // kind
	rejoins      *prometheus.CounterVec // kind
	placements   prometheus.Counter
	gone         prometheus.Counter
	modeChanges  prometheus.Counter
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
	m.slotGrants = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keel_coord_slot_grants_total", Help: "Catch-up and re-mirror slots granted, by kind (as applied on this member).",
	}, []string{"kind"})
	m.slotRefusals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keel_coord_slot_refusals_total", Help: "Slot requests answered wait (limit reached, mass-failure mode, target down), by kind.",
	}, []string{"kind"})
	m.rejoins = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keel_coord_rejoins_total", Help: "Members back in the in-sync set after a copy, by kind.",
	}, []string{"kind"})
	m.placements = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keel_coord_replacements_placed_total", Help: "New members placed to replace members given up.",
	})
	m.gone = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keel_coord_members_gone_total", Help: "Out-of-sync members given up (grace over, or drained).",
	})
	m.modeChanges = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keel_coord_mode_changes_total", Help: "Entries into and exits from mass-failure mode.",
	})
	reg.MustRegister(m.calls, m.shed, m.inflight, m.duration, m.forwarded, m.expiries, m.promotions, m.leaderTerms, m.applied,
		m.slotGrants, m.slotRefusals, m.rejoins, m.placements, m.gone, m.modeChanges, &stateCollector{s: s})
	for _, k := range []coordapi.SyncKind{coordapi.SyncCatchUp, coordapi.SyncRemirror} {
		m.slotGrants.WithLabelValues(string(k))
		m.slotRefusals.WithLabelValues(string(k))
		m.rejoins.WithLabelValues(string(k))
	}
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
	if g := r.Grant; g != nil && g.Kind != "" {
		if g.Granted {
			// A repeated request for a held slot is answered granted
			// again without an event: count only new grants.
			if hasEvent(r, coord.EventSlotGranted) {
				m.slotGrants.WithLabelValues(string(g.Kind)).Inc()
			}
		} else {
			m.slotRefusals.WithLabelValues(string(g.Kind)).Inc()
		}
	}
	for _, e := range r.Events {
		switch e.Kind {
		case coord.EventLeaseExpired:
			m.expiries.Inc()
		case coord.EventPromoted:
			m.promotions.Inc()
		case coord.EventRejoined:
			kind := coordapi.SyncCatchUp
			if strings.HasPrefix(e.Reason, string(coordapi.SyncRemirror)) {
				kind = coordapi.SyncRemirror
			}
			m.rejoins.WithLabelValues(string(kind)).Inc()
		case coord.EventPlaced:
			m.placements.Inc()
		case coord.EventMemberGone:
			m.gone.Inc()
		case coord.EventModeChanged:
			m.modeChanges.Inc()
		}
	}
}

func hasEvent(r coord.Result, k coord.EventKind) bool {
	for _, e := range r.Events {
		if e.Kind == k {
			return true
		}
	}
	return false
}

// logRecovery logs the storm control's decisions as a member applies
// them: mode changes loudly, the rest at info.
func logRecovery(log *slog.Logger, r coord.Result) {
	for _, e := range r.Events {
		switch e.Kind {
		case coord.EventModeChanged:
			log.Warn("cluster mode changed", "mode", strings.SplitN(e.Reason, ":", 2)[0], "reason", e.Reason)
		case coord.EventMemberGone:
			log.Info("member given up", "volume", e.Volume, "node", e.Node, "reason", e.Reason)
		case coord.EventPlaced:
			log.Info("replacement member placed", "volume", e.Volume, "node", e.Node, "reason", e.Reason)
		case coord.EventQuarantineReleased:
			log.Info("quarantine released", "volume", e.Volume, "node", e.Node, "bytes", e.Reason)
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
	modeDesc      = prometheus.NewDesc("keel_coord_mass_failure_mode", "1 while the cell is in mass-failure mode (no placement, no re-mirrors), else 0.", nil, nil)
	slotsDesc     = prometheus.NewDesc("keel_coord_slots_in_use", "Catch-up and re-mirror slots held now, by kind.", []string{"kind"}, nil)
	membersDesc   = prometheus.NewDesc("keel_coord_members", "Volume members by recovery state.", []string{"state"}, nil)
	reserveDesc   = prometheus.NewDesc("keel_coord_node_reserve_bytes", "Bytes of the node's capacity kept for re-mirroring.", []string{"node"}, nil)
	resUsedDesc   = prometheus.NewDesc("keel_coord_node_reserve_used_bytes", "Bytes of the node's reserve taken by re-mirrors (above 0 is an alarm).", []string{"node"}, nil)
	quarDesc      = prometheus.NewDesc("keel_coord_node_quarantined_bytes", "Bytes held on the node by replicas given up and not yet re-mirrored elsewhere.", []string{"node"}, nil)
	alarmDesc     = prometheus.NewDesc("keel_coord_node_reserve_alarm", "1 when the node's reserve is in use or its free space is below the reserve.", []string{"node"}, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- raftStateDesc
	ch <- raftTermDesc
	ch <- volumesDesc
	ch <- nodesDesc
	for _, d := range []*prometheus.Desc{modeDesc, slotsDesc, membersDesc, reserveDesc, resUsedDesc, quarDesc, alarmDesc} {
		ch <- d
	}
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
	var cl coordapi.Cluster
	var nodeList []coordapi.Node
	c.s.fsm.read(func(m *coord.Machine) {
		cl = m.Cluster()
		nodeList = m.Nodes()
	})
	for st, n := range cl.ByState {
		vols[st] = n
	}
	for _, n := range nodeList {
		nodes[n.State]++
		ch <- prometheus.MustNewConstMetric(reserveDesc, prometheus.GaugeValue, float64(n.Reserve), string(n.ID))
		ch <- prometheus.MustNewConstMetric(resUsedDesc, prometheus.GaugeValue, float64(n.ReserveUsed), string(n.ID))
		ch <- prometheus.MustNewConstMetric(quarDesc, prometheus.GaugeValue, float64(n.Quarantined), string(n.ID))
		alarm := 0.0
		if n.ReserveAlarm != "" {
			alarm = 1
		}
		ch <- prometheus.MustNewConstMetric(alarmDesc, prometheus.GaugeValue, alarm, string(n.ID))
	}
	mode := 0.0
	if cl.Mode == coordapi.ModeMassFailure {
		mode = 1
	}
	ch <- prometheus.MustNewConstMetric(modeDesc, prometheus.GaugeValue, mode)
	ch <- prometheus.MustNewConstMetric(slotsDesc, prometheus.GaugeValue, float64(cl.CatchUps), string(coordapi.SyncCatchUp))
	ch <- prometheus.MustNewConstMetric(slotsDesc, prometheus.GaugeValue, float64(cl.Remirrors), string(coordapi.SyncRemirror))
	for _, st := range []coordapi.MemberState{coordapi.MemberInSync, coordapi.MemberOutOfSync, coordapi.MemberCatchingUp, coordapi.MemberRemirror, coordapi.MemberNeedsCopy} {
		ch <- prometheus.MustNewConstMetric(membersDesc, prometheus.GaugeValue, float64(cl.MembersByState[st]), string(st))
	}
	for st, n := range vols {
		ch <- prometheus.MustNewConstMetric(volumesDesc, prometheus.GaugeValue, float64(n), string(st))
	}
	for st, n := range nodes {
		ch <- prometheus.MustNewConstMetric(nodesDesc, prometheus.GaugeValue, float64(n), string(st))
	}
}

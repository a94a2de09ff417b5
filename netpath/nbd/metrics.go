package nbd

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"keel/netpath/nbdproto"
)

// Metrics are the server's Prometheus series, labelled by export. Recording
// does not allocate: the labelled children of an export are resolved once,
// when its first connection enters transmission, and kept.
type Metrics struct {
	ops      *prometheus.CounterVec
	errs     *prometheus.CounterVec
	read     *prometheus.CounterVec
	written  *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	inflight *prometheus.GaugeVec
	conns    *prometheus.GaugeVec

	mu      sync.Mutex                // guards exports
	exports map[string]*exportMetrics // by export name
}

// numCmdSlots indexes per-command children: the commands up to
// CmdBlockStatus, then one slot for unknown commands.
const numCmdSlots = int(nbdproto.CmdBlockStatus) + 2

func cmdSlot(c nbdproto.Cmd) int {
	if c <= nbdproto.CmdBlockStatus {
		return int(c)
	}
	return numCmdSlots - 1
}

// exportMetrics holds the resolved children of one export.
type exportMetrics struct {
	ops      [numCmdSlots]prometheus.Counter
	latency  [numCmdSlots]prometheus.Observer
	errs     [len(nbdproto.Errnos) + 1]prometheus.Counter // last: undefined errno
	read     prometheus.Counter
	written  prometheus.Counter
	inflight prometheus.Gauge
	conns    prometheus.Gauge
}

// NewMetrics creates the series and registers them with reg (nil: not
// registered, useful in tests).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_nbd_operations_total",
			Help: "NBD requests completed, by export and command.",
		}, []string{"export", "command"}),
		errs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_nbd_errors_total",
			Help: "NBD requests answered with an error, by export and NBD errno.",
		}, []string{"export", "errno"}),
		read: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_nbd_read_bytes_total",
			Help: "Bytes sent to clients by successful NBD reads.",
		}, []string{"export"}),
		written: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_nbd_written_bytes_total",
			Help: "Bytes received from clients by successful NBD writes.",
		}, []string{"export"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "keel_nbd_request_duration_seconds",
			Help:    "Time from a request's header being read to its reply being written, by export and command.",
			Buckets: prometheus.ExponentialBuckets(10e-6, 2, 17), // 10 µs .. 0.66 s
		}, []string{"export", "command"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keel_nbd_requests_in_flight",
			Help: "NBD requests read and not yet answered (the queue depth), by export.",
		}, []string{"export"}),
		conns: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keel_nbd_connections",
			Help: "NBD connections in the transmission phase, by export.",
		}, []string{"export"}),
		exports: make(map[string]*exportMetrics),
	}
	if reg != nil {
		reg.MustRegister(m.ops, m.errs, m.read, m.written, m.latency, m.inflight, m.conns)
	}
	return m
}

// forExport returns the resolved children of an export, creating them on
// first use. A nil Metrics returns nil (no recording).
func (m *Metrics) forExport(name string) *exportMetrics {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if em, ok := m.exports[name]; ok {
		return em
	}
	em := &exportMetrics{
		read:     m.read.WithLabelValues(name),
		written:  m.written.WithLabelValues(name),
		inflight: m.inflight.WithLabelValues(name),
		conns:    m.conns.WithLabelValues(name),
	}
	for i := range em.ops {
		cmd := nbdproto.Cmd(i).String()
		if i == numCmdSlots-1 {
			cmd = "unknown"
		}
		em.ops[i] = m.ops.WithLabelValues(name, cmd)
		em.latency[i] = m.latency.WithLabelValues(name, cmd)
	}
	for i, e := range nbdproto.Errnos {
		em.errs[i] = m.errs.WithLabelValues(name, e.String())
	}
	em.errs[len(nbdproto.Errnos)] = m.errs.WithLabelValues(name, "other")
	m.exports[name] = em
	return em
}

func (em *exportMetrics) errCounter(e nbdproto.Errno) prometheus.Counter {
	for i, x := range nbdproto.Errnos {
		if x == e {
			return em.errs[i]
		}
	}
	return em.errs[len(nbdproto.Errnos)]
}

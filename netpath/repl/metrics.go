package repl

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the replication counters of one process: the primary side by
// peer node (one replication path per peer), the replica side in total.
// Create one per process with NewMetrics and pass it to every Peer and
// Server.
type Metrics struct {
	txBytes, txFrames, payloadBytes *prometheus.CounterVec
	errors                          *prometheus.CounterVec
	inflightFrames, inflightBytes   *prometheus.GaugeVec
	up                              *prometheus.GaugeVec
	reconnects                      *prometheus.CounterVec
	rtt, frameSeconds               *prometheus.HistogramVec
	zcSends, zcCopied, zcBytes      *prometheus.CounterVec
	zcFallback                      *prometheus.CounterVec
	kernelCopyBytes                 *prometheus.CounterVec
	userCopyBytes                   *prometheus.CounterVec

	srvRxBytes, srvFrames *prometheus.CounterVec
	srvNacks, srvBad      *prometheus.CounterVec
	srvStreams            prometheus.Gauge
	srvApply              *prometheus.HistogramVec
	srvClass              *prometheus.CounterVec
	srvInline             prometheus.Counter
}

// NewMetrics creates the metrics and registers them with reg (nil: not
// registered, e.g. in tests).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	cv := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
	}
	gv := func(name, help string, labels ...string) *prometheus.GaugeVec {
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, labels)
	}
	lat := prometheus.ExponentialBuckets(10e-6, 2, 18) // 10 µs .. 1.3 s
	m := &Metrics{
		txBytes:        cv("keel_repl_tx_bytes_total", "Bytes (headers and payload) written to the replication stream, by peer node.", "peer"),
		txFrames:       cv("keel_repl_tx_frames_total", "Frames written to the replication stream, by peer node.", "peer"),
		payloadBytes:   cv("keel_repl_payload_bytes_total", "Payload bytes replicated (sent), by peer node: the denominator of copies per byte.", "peer"),
		errors:         cv("keel_repl_errors_total", "Replication failures by peer node and reason (stream, timeout, protocol, dial, handshake, and NACK reasons).", "peer", "reason"),
		inflightFrames: gv("keel_repl_inflight_frames", "Frames in the in-flight window (queued or sent, not finished), by peer node.", "peer"),
		inflightBytes:  gv("keel_repl_inflight_bytes", "Payload bytes in the in-flight window, by peer node.", "peer"),
		up:             gv("keel_repl_stream_up", "1 while the replication stream to the peer node is up.", "peer"),
		reconnects:     cv("keel_repl_connects_total", "Replication streams established, by peer node.", "peer"),
		rtt: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "keel_repl_rtt_seconds",
			Help: "Round-trip time of PING/PONG on the replication stream, by peer node.", Buckets: lat}, []string{"peer"}),
		frameSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "keel_repl_frame_seconds",
			Help: "Time from queueing a frame to its ACK (and zero-copy completion), by peer node.", Buckets: lat}, []string{"peer"}),
		zcSends:         cv("keel_repl_zerocopy_sends_total", "sendmsg calls made with MSG_ZEROCOPY, by peer node.", "peer"),
		zcCopied:        cv("keel_repl_zerocopy_copied_total", "MSG_ZEROCOPY sends the kernel completed by copying (SO_EE_CODE_ZEROCOPY_COPIED: always so on loopback and veth).", "peer"),
		zcBytes:         cv("keel_repl_zerocopy_bytes_total", "Payload bytes sent with MSG_ZEROCOPY and completed without a kernel copy, by peer node.", "peer"),
		zcFallback:      cv("keel_repl_zerocopy_fallback_total", "Large frames (or their rest) sent with plain writev instead of MSG_ZEROCOPY, by reason (enobufs, unsupported).", "peer", "reason"),
		kernelCopyBytes: cv("keel_repl_kernel_copy_bytes_total", "Payload bytes the kernel copied on send (writev, or MSG_ZEROCOPY reported copied), by peer node.", "peer"),
		userCopyBytes:   cv("keel_repl_user_copy_bytes_total", "Payload bytes copied in user space by replication (send: primary, receive: replica). No code path copies payload: it stays 0 (see the package doc).", "side"),

		srvRxBytes: cv("keel_repl_server_rx_bytes_total", "Bytes read from replication streams by this replica, by primary node.", "primary"),
		srvFrames:  cv("keel_repl_server_frames_total", "Frames answered by this replica, by result (ack, nack).", "result"),
		srvNacks:   cv("keel_repl_server_nacks_total", "NACKs sent by this replica, by reason.", "reason"),
		srvBad:     cv("keel_repl_server_malformed_total", "Replication streams closed for malformed input, by what was wrong.", "what"),
		srvStreams: prometheus.NewGauge(prometheus.GaugeOpts{Name: "keel_repl_server_streams", Help: "Replication streams open on this replica."}),
		srvApply: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "keel_repl_server_apply_seconds",
			Help: "Time to apply a frame on this replica, from receipt to reply, by type.", Buckets: lat}, []string{"type"}),
		srvInline: prometheus.NewCounter(prometheus.CounterOpts{Name: "keel_repl_server_inline_writes_total",
			Help: "WRITE frames this replica applied on the stream's reader goroutine because they were alone on the stream (queue depth 1), without a hand-off to a worker."}),
		srvClass: cv("keel_repl_server_applied_bytes_total", "Range bytes of the write, trim and zeroing frames this replica applied, by class: live (in sync), degraded (live, marked in the write-intent bitmap first), sync (catch-up and re-mirror copies).", "class"),
	}
	if reg != nil {
		reg.MustRegister(m.txBytes, m.txFrames, m.payloadBytes, m.errors, m.inflightFrames, m.inflightBytes,
			m.up, m.reconnects, m.rtt, m.frameSeconds, m.zcSends, m.zcCopied, m.zcBytes, m.zcFallback,
			m.kernelCopyBytes, m.userCopyBytes, m.srvRxBytes, m.srvFrames, m.srvNacks, m.srvBad, m.srvStreams, m.srvApply, m.srvClass, m.srvInline)
	}
	// Make the copy counters visible at zero.
	m.userCopyBytes.WithLabelValues("send")
	m.userCopyBytes.WithLabelValues("receive")
	return m
}

// peerMetrics are one peer's children, resolved once so that the hot path
// does no label lookups.
type peerMetrics struct {
	m                             *Metrics
	label                         string
	txBytes, txFrames, payload    prometheus.Counter
	inflightFrames, inflightBytes prometheus.Gauge
	up                            prometheus.Gauge
	connects                      prometheus.Counter
	rtt, frame                    prometheus.Observer
	zcSends, zcCopied, zcBytes    prometheus.Counter
	kernelCopy                    prometheus.Counter
}

func (m *Metrics) peer(node uint64) *peerMetrics {
	l := strconv.FormatUint(node, 10)
	return &peerMetrics{
		m: m, label: l,
		txBytes: m.txBytes.WithLabelValues(l), txFrames: m.txFrames.WithLabelValues(l),
		payload:        m.payloadBytes.WithLabelValues(l),
		inflightFrames: m.inflightFrames.WithLabelValues(l), inflightBytes: m.inflightBytes.WithLabelValues(l),
		up: m.up.WithLabelValues(l), connects: m.reconnects.WithLabelValues(l),
		rtt: m.rtt.WithLabelValues(l), frame: m.frameSeconds.WithLabelValues(l),
		zcSends: m.zcSends.WithLabelValues(l), zcCopied: m.zcCopied.WithLabelValues(l),
		zcBytes: m.zcBytes.WithLabelValues(l), kernelCopy: m.kernelCopyBytes.WithLabelValues(l),
	}
}

func (pm *peerMetrics) error(reason string) { pm.m.errors.WithLabelValues(pm.label, reason).Inc() }

func (pm *peerMetrics) fallback(reason string) {
	pm.m.zcFallback.WithLabelValues(pm.label, reason).Inc()
}

// Package repl is `keel bench repl`: the cost of two-way replication,
// measured against unreplicated keel in the same run.
//
// Setups, alternated rep by rep (A B A B ...) so that drift on a shared
// machine falls on all alike:
//
//   - unreplicated: `keel serve` on a fresh file, NBD on loopback TCP;
//   - replicated: `keel up --nodes 2 --replicas 2` on a fresh data
//     directory (a coordinator and two `keel node` child processes on
//     loopback, each with a metrics endpoint); fio talks to the primary's
//     NBD URI that keel up prints;
//   - two-unreplicated (the ceiling; Config.NoCeiling skips it): two
//     `keel serve` on fresh files, written at once by one fio run with a
//     job per volume. It does the two disk writes of a replicated write and
//     their serving with no network between them, so on a machine whose
//     CPUs and disk the replicas share it is the reference for what
//     replication can reach. Its figures are per volume (IOPS halved,
//     latency over every I/O of both jobs).
//
// Workloads: fio's nbd engine, 4 KiB random writes at QD32 and at QD1, one
// connection, no ramp (so that fio's byte count covers the whole CPU
// window). Each start is followed by an unmeasured warm-up (QD1 writes,
// Config.Warmup): keel up reports its volume served before the primary's
// replication stream to the secondary is open, which the first write does.
//
// Figures, per rep and as the median over reps:
//
//   - IOPS and p50/p99 completion latency (fio clat);
//   - CPU: utime+stime from /proc/PID/stat of the serving processes over
//     the fio run: `keel serve` (unreplicated) or both `keel node`
//     processes (replicated; the coordinator is not counted);
//   - CPU seconds per GiB replicated: Σ node CPU / payload GiB the primary
//     sent to its secondaries (keel_repl_payload_bytes_total; with two
//     replicas that is every written byte once). It includes the primary's
//     own NBD and local-write work; the unreplicated CPU per GiB written is
//     reported beside it for the difference;
//   - copies per byte: (keel_repl_user_copy_bytes_total +
//     keel_repl_kernel_copy_bytes_total, summed over both nodes) / payload
//     bytes. These count the copies the sender can avoid: user-space
//     copies on either side and the kernel's copy on send (writev, or
//     MSG_ZEROCOPY that the kernel completed by copying, which loopback
//     always does). The receiver's recv into its buffer is one copy on
//     every TCP path and is not counted. The zero-copy share
//     (keel_repl_zerocopy_bytes_total / payload) is reported too.
//
// Targets (issue 4): replicated QD32 IOPS ≥ 0.7 × unreplicated, and
// replicated QD1 p50 latency ≤ unreplicated + 60 µs. The summary also
// gives the ceiling's QD32 IOPS over unreplicated's, replicated's over the
// ceiling's, and the ceiling's QD1 p50 added.
//
// Output: a table and PASS/MISS lines on Stdout; repl-latest.json and
// repl-latest.md in Config.Out.
package repl

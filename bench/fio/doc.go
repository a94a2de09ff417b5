// Package fio is `keel bench fio` as a library: one fio suite run the same
// way against keel, its peers (nbdkit, qemu-nbd, nbd-server, go-nbd's
// example server) and the volume file itself with O_DIRECT (raw, the
// limit), on the same disk, in the same run.
//
// It owns the suite (Workloads), the targets and how each is started
// (Targets), the schedule, the measurement of the servers (CPU and RSS from
// /proc), the parsing of fio's JSON, the medians and ratios, issue 7's
// target checks, and the outputs: a text table, latest.json, latest.svg
// (drawn by keel/bench/chart) and latest.md for the README.
//
// # One run
//
// For each rep, for each target in order (A B C A B C: drift on a shared
// machine falls on every target alike):
//
//	create DIR/<target>-repN.img, size bytes, fallocate   (keel creates its own:
//	                                                       1 MiB header + size)
//	start the server on a free 127.0.0.1 port or a Unix socket in a scratch dir
//	poll connect until it accepts (StartTimeout)
//	prefill: fio sequential write of the whole volume through the target,
//	         then fdatasync + fadvise(DONTNEED) of the file (not timed)
//	for each workload:
//	    CPU ticks of the server's process tree (/proc/PID/stat utime+stime
//	    +cutime+cstime over the tree)
//	    fio --ioengine=nbd --uri=... (raw: --filename=FILE --direct=1
//	        --ioengine=libaio), --output-format=json
//	    CPU ticks again → server CPU % over fio's wall time
//	peak RSS: max(VmHWM of the server, sampled sum of VmRSS over its tree)
//	SIGTERM, wait StopTimeout, SIGKILL; delete the file
//
// A target whose program is missing is skipped with a line that says how to
// install it (`make bench-deps`); a target that fails is recorded in
// Report.Errors and the suite goes on.
//
// # Keel variants
//
// Config.KeelVariants (`--keel-variant NAME=/path/to/keel[:ENV=VAL,...]`,
// repeatable) adds keel builds as targets of their own, right after keel,
// each started like keel from its binary with the environment items added,
// and labelled NAME everywhere. They alternate rep by rep like every target,
// so that an A/B of two builds meets the same machine state. A variant is
// nobody's "best peer", and the target checks judge "keel" only.
//
// # Durability modes
//
// Every target is labelled with when it acknowledges a write: "direct"
// (O_DIRECT: keel, qemu-nbd --cache=none --aio=native, raw) or "page-cache"
// (nbdkit, nbd-server, go-nbd, qemu-nbd's default). nbdkit's cache=none is
// page-cache too: its file plugin still writes through the page cache and
// only starts writeback early and drops pages (Target.Note says exactly).
// The table's "best peer" ratio compares within a mode.
//
// # Figures
//
// IOPS and bandwidth are reads plus writes. Latency is fio's completion
// latency (clat) percentiles p50, p99, p99.9 in µs, reads and writes apart;
// the table shows reads (writes for write-only workloads), the JSON both.
// Medians over reps are taken figure by figure.
//
// Nothing here asserts speed: Check reports PASS or MISS against issue 7's
// bounds and Run succeeds either way.
package fio

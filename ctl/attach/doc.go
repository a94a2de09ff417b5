// Package attach owns `keel attach` and `keel detach`: attaching a keel
// volume to a Linux host as /dev/nbdX through the kernel NBD client, and
// keeping it attached across server restarts and primary failovers.
//
// # How a device stays connected
//
// Attach finds the server (a fixed --addr, or the volume's primary as the
// coordinator names it), opens --connections connections, runs the NBD
// handshake on each (netpath/nbdkernel) and has the kernel start the device
// with all of them (NBD_CMD_CONNECT over netlink) with two timeouts, both
// --timeout: the per-request timeout and the dead-connection timeout.
//
// The Supervisor then keeps its own reference to every socket it gave the
// kernel and watches them (poll for hang-up, plus the kernel's
// NBD_CMD_LINK_DEAD notifications). When a connection breaks, it asks the
// locator again, dials the target, and hands the kernel the new socket
// with NBD_CMD_RECONFIGURE, checking that the kernel adopted it; the
// kernel resubmits the I/O that waited. When the coordinator names a new
// primary while the old one still answers (checked every
// --check-interval), the supervisor shuts the old connections down itself
// so that they move too. An epoch change without a change of primary moves
// nothing.
//
// What I/O sees, from the kernel's behaviour (see netpath/nbdkernel):
//
//	server gone ──► connection dead ──► new I/O waits for a reconnect (≤ timeout)
//	                                └─► in-flight I/O is retried when its request
//	                                    timeout fires (≤ timeout after it was sent)
//	reconnect within the timeouts  ──► all of it completes, no error reaches the
//	                                   filesystem
//	no server within the timeouts  ──► EIO (never a hang), state "failed" with why;
//	                                   the supervisor keeps trying and the device
//	                                   works again once a server is back
//
// So I/O that cannot be served fails at most twice --timeout after it was
// issued.
//
// # State
//
// Each attached device has a JSON record in the state directory
// (/run/keel/attach/nbdN.json, see State): server, export, volume, node,
// epoch, connections live, phase (connected, reconnecting, failed,
// unsupervised) with the reason and since when, and the supervisor's pid.
// The supervisor rewrites it on every change; `keel attach --list` merges
// the records with the kernel's NBD_CMD_STATUS and the process table, so a
// dead supervisor or a device detached behind keel's back shows as such.
// The supervisor is the only writer of its record (detach removes it after
// stopping the supervisor). For a device attached with --coord, --list
// also asks the coordinator (all devices within CoordTimeout together) for
// the volume's state (ok, degraded, impaired, fenced) and reason, so an
// impaired volume shows on the host; a coordinator that does not answer
// in time is reported as such, and a device attached with --addr shows
// that it has no coordinator to ask.
//
// # Processes
//
// `keel attach` supervises in the foreground; SIGINT/SIGTERM end the
// supervision and leave the device attached (a mounted filesystem keeps
// working as long as its server does). With --daemon the command starts
// itself again in a new session, waits on a pipe until the child reports
// the device attached (or why not), and returns; the child logs to
// <state-dir>/attach.log. `keel detach` refuses a mounted device unless
// --force, stops the supervisor (SIGTERM), then sends
// NBD_CMD_DISCONNECT.
//
// A Supervisor is driven by one goroutine (Attach, then Run) and owns its
// fields; there is no shared mutable state and no lock.
package attach

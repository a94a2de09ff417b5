// Package nbdkernel owns keel's side of the Linux kernel NBD client: it
// dials an NBD server, runs the client handshake, and hands the connected
// sockets to the kernel so that /dev/nbdX serves the export; it
// reconfigures a running device with new sockets, disconnects it, asks
// the kernel for device status and listens for dead-connection
// notifications. It holds no policy: which server to connect to, when to
// reconnect and what to record is ctl/attach's business.
//
// # Which path does what
//
//   - Handshake (this package, on go-nbd's wire definitions): the fixed
//     newstyle handshake with NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE,
//     falling back to NBD_OPT_EXPORT_NAME. It returns the export size, the
//     transmission flags and the block size constraints, which the kernel
//     needs before it takes the socket. The magics, option, reply and info
//     numbers come from github.com/pojntfx/go-nbd/pkg/protocol; go-nbd's
//     server (pkg/server) is the third-party peer the tests check the
//     handshake against.
//   - The kernel's generic netlink family "nbd" (this package, raw
//     AF_NETLINK sockets through golang.org/x/sys/unix), for everything
//     that configures a device:
//     NBD_CMD_CONNECT (several sockets: one kernel queue per connection,
//     request and dead-connection timeouts, server flags, a backend
//     identifier), NBD_CMD_RECONFIGURE (new sockets for dead
//     connections: reconnection and failover), NBD_CMD_DISCONNECT,
//     NBD_CMD_STATUS, and the multicast NBD_CMD_LINK_DEAD (Monitor).
//   - go-nbd's ioctl client (pkg/client) is not used, because it does not
//     serve keel: it never issues NBD_SET_FLAGS, so the kernel believes
//     the server cannot flush and never sends FLUSH or FUA (fsync on the
//     device would not reach keel's disk); it drives one connection; a
//     device configured by ioctl cannot be given new sockets (the kernel
//     accepts NBD_CMD_RECONFIGURE only for netlink-configured devices);
//     and the package imports github.com/pilebones/go-udev, which is not
//     in keel's module graph. The netlink interface exists since Linux
//     4.12.
//
// # Kernel behaviour relied upon (checked on Debian's 6.1 kernel by
// scripts/kernel-test)
//
//   - A connection is marked dead when its socket reads end of stream or
//     fails, or when one of its requests gets no reply within the request
//     timeout; the kernel then shuts the socket down and multicasts
//     NBD_CMD_LINK_DEAD. Requests that were in flight on it are requeued
//     when their timeout fires; new requests go to a live connection, or,
//     when none is left, wait up to the dead-connection timeout for
//     NBD_CMD_RECONFIGURE and then fail with EIO. Hence a device must
//     have both timeouts: without a request timeout, I/O on a hung server
//     waits forever.
//   - NBD_CMD_RECONFIGURE gives each socket to the first dead connection
//     slot and ignores sockets for which no slot is dead, without an
//     error. The kernel sets an adopted socket's send timeout to the
//     request timeout; Socket.Adopted reads it back to know which sockets
//     were taken.
//   - Shutting down, from user space, a socket the kernel holds makes the
//     kernel mark that connection dead: Socket.Shutdown is how a caller
//     leaves a server that is no longer the primary.
//   - With NBD_ATTR_BACKEND_IDENTIFIER set at connect, the kernel refuses
//     a reconfigure that does not present the same identifier.
//
// # Wire formats
//
// Netlink messages, attributes and the attribute trees of each command
// are drawn where they are encoded: msg.go (nlmsghdr, genlmsghdr,
// NLMSG_ERROR), attr.go (nlattr), netlink.go (CONNECT, RECONFIGURE,
// STATUS), handshake.go (the NBD handshake). Netlink integers are in host
// byte order; NBD integers are big-endian.
//
// # Ownership and concurrency
//
// A Socket's descriptor belongs to the Socket until Close; handing it to
// the kernel does not transfer it (the kernel takes its own reference).
// Netlink is safe for concurrent use (requests are serialised by a mutex);
// Monitor and Socket are used by one goroutine at a time.
package nbdkernel

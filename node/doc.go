// Package node is keel's wiring layer: it assembles volumes (datapath), the
// NBD front end (netpath) and, for a storage node in a cluster, the
// coordinator agent (ctl) into running processes, and gives the keel binary
// its cobra commands for them (`keel serve`, `keel node`, `keel up`).
//
// Nothing here implements a protocol or a disk format; it chooses which
// implementations run together, checks at compile time that they fit the
// interfaces their consumers own, and owns process concerns: flags, signals,
// listeners, the metrics endpoint and orderly shutdown.
package node

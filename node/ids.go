package node

import (
	"fmt"
	"hash/fnv"

	"keel/ctl/coordapi"
)

// NodeNum is the number netpath/repl knows a node by: the FNV-64a hash of
// its coordinator NodeID (the operator's --id), never 0. Both ends compute
// it from the same string: a primary names the peer it expects in HELLO and
// the peer refuses a HELLO that names another number, so a stream cannot
// reach the wrong node through a stale address. Two IDs that hash alike
// (probability about n²/2⁶⁵ for n nodes) would be told apart by their
// addresses only; the coordinator's IDs are short operator-chosen names, so
// this is accepted rather than carried as a registry.
func NodeNum(id coordapi.NodeID) uint64 {
	h := fnv.New64a()
	h.Write([]byte(id))
	if n := h.Sum64(); n != 0 {
		return n
	}
	return 1
}

// volumeNum is the number netpath/repl knows a volume by: N of "vol-N".
func volumeNum(id coordapi.VolumeID) (uint64, error) {
	n, ok := coordapi.ParseVolumeID(string(id))
	if !ok {
		return 0, fmt.Errorf("volume id %q is not of the form vol-N", id)
	}
	return n, nil
}

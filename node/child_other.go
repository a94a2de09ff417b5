//go:build !linux

package node

import "syscall"

// childAttr puts a `keel up` child in its own process group, so that the
// terminal's Ctrl-C reaches only `keel up`, which stops the children in
// order.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// isTerminal is false here: the status is printed a line per change.
func isTerminal(uintptr) bool { return false }

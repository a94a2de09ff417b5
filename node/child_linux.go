package node

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// childAttr puts a `keel up` child in its own process group, so that the
// terminal's Ctrl-C reaches only `keel up`, which stops the children in
// order, and has the kernel send it SIGTERM should `keel up` die.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
}

// isTerminal reports whether fd is a terminal (the status line is then
// rewritten in place).
func isTerminal(fd uintptr) bool {
	_, err := unix.IoctlGetTermios(int(fd), unix.TCGETS)
	return err == nil
}

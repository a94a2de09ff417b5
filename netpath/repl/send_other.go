//go:build !linux

package repl

import (
	"errors"
	"syscall"
)

// Elsewhere the sender goroutine writes every frame with net.Buffers.
const rawWriteSupported = false

type rawWriter struct{}

func (w *rawWriter) init() {}

func (w *rawWriter) writev(syscall.RawConn, [][]byte, bool) (int, error) {
	return 0, errors.ErrUnsupported
}

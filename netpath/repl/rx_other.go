//go:build !linux

package repl

import (
	"errors"
	"syscall"
)

// Elsewhere the replica reads with conn.Read.
const rawReadSupported = false

type rawReader struct{}

func (r *rawReader) init(syscall.RawConn) {}

func (r *rawReader) readv(a, b []byte) (int, error) { return 0, errors.ErrUnsupported }

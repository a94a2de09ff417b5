//go:build !linux

package repl

import (
	"errors"
	"syscall"
)

// MSG_ZEROCOPY is Linux only: elsewhere every frame goes through writev.

type zcSys struct {
	notes []zcNote
}

type zcNote struct {
	lo, hi uint32
	copied bool
}

const zcSupported = false

func enableZeroCopy(syscall.RawConn) error { return errors.ErrUnsupported }

func (z *zcSys) init() {}

func (z *zcSys) sendZeroCopy(syscall.RawConn, []byte, []byte, int) (int, error) {
	return 0, errors.ErrUnsupported
}

func errNoBufs(error) bool { return false }

func (z *zcSys) poll(syscall.RawConn) error { return errors.ErrUnsupported }

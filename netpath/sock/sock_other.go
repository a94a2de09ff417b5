//go:build !linux

package sock

import (
	"errors"
	"time"
)

// Pinning and TCP_USER_TIMEOUT are Linux features; elsewhere a path's
// sockets are unpinned (Status.Err says why) and keep the kernel's timeout.

var errUnsupported = errors.ErrUnsupported

func bindToDevice(fd int, iface string) error { return errUnsupported }

func setUserTimeout(fd int, d time.Duration) error { return nil }

func isPermission(err error) bool { return errors.Is(err, errUnsupported) }

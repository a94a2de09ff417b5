package node

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// dirSpace reports the capacity and the free bytes (for unprivileged
// users: f_bavail) of the file system holding dir.
func dirSpace(dir string) (capacity, free int64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(st.Blocks) * int64(st.Bsize), int64(st.Bavail) * int64(st.Bsize), nil
}

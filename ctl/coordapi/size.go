package coordapi

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseSize reads a byte count as operators write it on command lines: a
// positive number with an optional binary unit (K, M, G, T, P; "G", "GB"
// and "GiB" all mean 2^30). Its error names the problem and the fix.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(strings.ToUpper(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	mult := int64(1)
	if t != "" {
		if i := strings.IndexByte("KMGTP", t[len(t)-1]); i >= 0 {
			mult = 1 << (10 * (i + 1))
			t = t[:len(t)-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("size %q: give a positive number with an optional unit, e.g. 4G or 512M", s)
	}
	if n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return n * mult, nil
}

// FormatBytes renders a byte count with binary units, e.g. "4GiB",
// "1.5MiB", "512B".
func FormatBytes(n int64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return fmt.Sprintf("%dB", n)
	}
	f := float64(n)
	i := -1
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	if f == float64(int64(f)) {
		return fmt.Sprintf("%d%ciB", int64(f), units[i])
	}
	return fmt.Sprintf("%.1f%ciB", f, units[i])
}

package coordapi_test

import (
	"testing"

	"keel/ctl/coordapi"
)

func TestParseSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"4G", 4 << 30, true}, {"4GiB", 4 << 30, true}, {"4gb", 4 << 30, true},
		{"512M", 512 << 20, true}, {"65536", 65536, true}, {"1T", 1 << 40, true},
		{"64k", 64 << 10, true}, {" 2P ", 2 << 50, true}, {"", 0, false}, {"x", 0, false},
		{"-1", 0, false}, {"0", 0, false}, {"1.5G", 0, false}, {"99999999999999T", 0, false},
	} {
		got, err := coordapi.ParseSize(c.in)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d, ok=%v", c.in, got, err, c.want, c.ok)
		}
	}
}

func TestFormatBytes(t *testing.T) {
	for in, want := range map[int64]string{
		4 << 30: "4GiB", 3 << 10: "3KiB", 1000: "1000B", 1536 << 20: "1.5GiB", 0: "0B",
	} {
		if got := coordapi.FormatBytes(in); got != want {
			t.Errorf("FormatBytes(%d) = %q, want %q", in, got, want)
		}
	}
}

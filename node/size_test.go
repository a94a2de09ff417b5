package node

import "testing"

func TestParseSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"4G", 4 << 30, true}, {"4GiB", 4 << 30, true}, {"4gb", 4 << 30, true},
		{"512M", 512 << 20, true}, {"65536", 65536, true}, {"1T", 1 << 40, true},
		{"64k", 64 << 10, true}, {"", 0, false}, {"x", 0, false}, {"-1", 0, false},
		{"1.5G", 0, false}, {"99999999999999T", 0, false},
	} {
		got, err := ParseSize(c.in)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d, ok=%v", c.in, got, err, c.want, c.ok)
		}
	}
}

func TestFormatSize(t *testing.T) {
	cases := map[int64]string{4 << 30: "4 GiB", 3 << 10: "3 KiB", 1000: "1000 bytes", 1536 << 20: "1536 MiB"}
	for in, want := range cases {
		if got := FormatSize(in); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", in, got, want)
		}
	}
}

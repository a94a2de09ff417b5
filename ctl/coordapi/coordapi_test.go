package coordapi_test

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"keel/ctl/coordapi"
)

// TestLeaseTimingArgument checks the arithmetic of the package doc at the
// extremes of the drift bound: the real time at which the node stops is
// strictly before the real time at which the coordinator may expire it,
// even when the coordinator stamps the heartbeat the instant it is sent.
func TestLeaseTimingArgument(t *testing.T) {
	cfg := coordapi.DefaultConfig()
	l := cfg.Lease
	rho := l.MaxDrift
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, nodeRate := range []float64{1 - rho, 1, 1 + rho} {
		for _, coordRate := range []float64{1 - rho, 1, 1 + rho} {
			// Local spans converted to real time: local = rate * real.
			nodeReal := float64(l.NodeDeadline(t0).Sub(t0)) / nodeRate
			coordReal := float64(l.CoordinatorExpiry(t0).Sub(t0)) / coordRate
			if !(nodeReal < coordReal) {
				t.Errorf("node rate %v, coordinator rate %v: node stops after %v real, coordinator may expire after %v",
					nodeRate, coordRate, time.Duration(nodeReal), time.Duration(coordReal))
			}
			if gap := time.Duration(coordReal - nodeReal); gap < time.Duration(l.Margin) {
				t.Errorf("gap %v below the margin %v", gap, l.Margin)
			}
		}
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("default config invalid: %v", err)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		mut  func(*coordapi.Config)
		want string
	}{
		{"short lease", func(c *coordapi.Config) { c.Lease.Duration = coordapi.Duration(time.Millisecond) }, "lease duration"},
		{"drift", func(c *coordapi.Config) { c.Lease.MaxDrift = 0.5 }, "max_drift"},
		{"nan drift", func(c *coordapi.Config) { c.Lease.MaxDrift = nan() }, "max_drift"},
		{"margin", func(c *coordapi.Config) { c.Lease.Margin = c.Lease.Duration }, "margin"},
		{"interval", func(c *coordapi.Config) { c.Lease.Interval = c.Lease.Duration / 2 }, "interval"},
		{"reserve", func(c *coordapi.Config) { c.ReserveFraction = 1 }, "reserve_fraction"},
	} {
		c := coordapi.DefaultConfig()
		tc.mut(&c)
		err := c.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error about %s", tc.name, err, tc.want)
		}
	}
}

func nan() float64 { var z float64; return z / z }

func TestDurationJSON(t *testing.T) {
	var d coordapi.Duration
	for in, want := range map[string]time.Duration{`"1.5s"`: 1500 * time.Millisecond, `2000`: 2000} {
		if err := json.Unmarshal([]byte(in), &d); err != nil || d.D() != want {
			t.Errorf("%s: got %v, %v", in, d, err)
		}
	}
	if err := json.Unmarshal([]byte(`"soon"`), &d); err == nil {
		t.Error(`"soon" accepted`)
	}
	b, _ := json.Marshal(coordapi.Duration(10 * time.Second))
	if string(b) != `"10s"` {
		t.Errorf("marshal: %s", b)
	}
}

func TestDecode(t *testing.T) {
	var r coordapi.CreateVolumeRequest
	for in, want := range map[string]string{
		``:                            "empty body",
		`{"name":`:                    "malformed JSON",
		`{"name":"a"} {}`:             "trailing data",
		`{"size":"big"}`:              `field "size"`,
		`[1,2]`:                       "want coordapi.CreateVolumeRequest",
		`{"name":"a","extra":true}  `: "",
	} {
		err := coordapi.Decode([]byte(in), &r)
		switch {
		case want == "" && err != nil:
			t.Errorf("%q: %v", in, err)
		case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
			t.Errorf("%q: got %v, want %q", in, err, want)
		}
	}
}

func TestValidation(t *testing.T) {
	good := coordapi.RegisterRequest{Node: "n1", Zone: "z", PrimaryAddr: "10.0.0.1:7000", ReplAddr: "[::1]:7001", Capacity: 10, Free: 5}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	bad := []coordapi.RegisterRequest{
		{Node: "", PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1},
		{Node: "n/1", PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1},
		{Node: "n1", PrimaryAddr: "h", ReplAddr: "h:2", Capacity: 1},
		{Node: "n1", PrimaryAddr: "h:0", ReplAddr: "h:2", Capacity: 1},
		{Node: "n1", PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1, Free: 2},
		{Node: "n1", Zone: "a b", PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1},
		{Node: coordapi.NodeID(strings.Repeat("x", 65)), PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1},
	}
	for i, r := range bad {
		if r.Validate() == nil {
			t.Errorf("bad request %d accepted: %+v", i, r)
		}
	}
	hb := coordapi.HeartbeatRequest{Node: "n1", Capacity: 1, Replicas: []coordapi.ReplicaReport{{Volume: "vol-1", Epoch: 1}, {Volume: "vol-1", Epoch: 1}}}
	if err := hb.Validate(); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("duplicate report: %v", err)
	}
	for _, s := range []string{"vol-0", "vol-01", "vol-", "vol-x", "v-1"} {
		if _, ok := coordapi.ParseVolumeID(s); ok {
			t.Errorf("%q parsed as a volume ID", s)
		}
	}
	if n, ok := coordapi.ParseVolumeID("vol-42"); !ok || n != 42 {
		t.Errorf("vol-42: %d %v", n, ok)
	}
}

func TestErrorStatus(t *testing.T) {
	for code, want := range map[coordapi.Code]int{
		coordapi.CodeBadRequest: 400, coordapi.CodeNotFound: 404, coordapi.CodeStaleEpoch: 409,
		coordapi.CodeTooLarge: 413, coordapi.CodeOverloaded: 503, coordapi.CodeNoCapacity: 507,
		coordapi.CodeTimeout: 504, coordapi.CodeInternal: 500,
	} {
		if got := (&coordapi.Error{Code: code}).Status(); got != want {
			t.Errorf("%s: %d, want %d", code, got, want)
		}
	}
}

// FuzzDecode: request bodies come off the network.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{`{"node":"n1","capacity":1,"free":1,"replicas":[{"volume":"vol-1","epoch":2}]}`, `{`, `[]`, `{"a":1}x`, `"\u0000"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var r coordapi.HeartbeatRequest
		if coordapi.Decode(data, &r) != nil {
			return
		}
		_ = r.Validate()
		b, err := json.Marshal(&r)
		if err != nil {
			t.Fatal(err)
		}
		var r2 coordapi.HeartbeatRequest
		if err := coordapi.Decode(b, &r2); err != nil {
			t.Fatalf("re-decoding %s: %v", b, err)
		}
	})
}

// A recovery value out of range is a *FieldError naming the field, the
// value and the range (flags map the field to their own name).
func TestRecoveryFieldError(t *testing.T) {
	r := coordapi.DefaultRecovery()
	if err := r.Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	r.SlotTTL = 0
	err := r.Validate()
	var fe *coordapi.FieldError
	if !errors.As(err, &fe) || fe.Field != "slot_ttl" || fe.Value != "0s" || err.Error() != "slot_ttl 0s: must be between 1s and 1h0m0s" {
		t.Fatalf("got %#v (%v)", err, err)
	}
	cfg := coordapi.DefaultConfig()
	cfg.Recovery = r
	if err := cfg.Validate(); !errors.As(err, &fe) || !strings.HasPrefix(err.Error(), "recovery: slot_ttl") {
		t.Fatalf("config: %v", err)
	}
}

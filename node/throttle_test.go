package node

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"keel/ctl/coordapi"
	"keel/netpath/sock"
)

const mib = 1 << 20

func throttleServer(t *testing.T, c sock.ThrottleConfig) (*sock.Throttle, *httptest.Server) {
	t.Helper()
	th, err := sock.NewThrottle(c)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/v1/throttle", ThrottleHandler(th, nil))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return th, srv
}

func do(t *testing.T, method, url, body string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, data
}

func TestThrottleHandler(t *testing.T) {
	start := sock.ThrottleConfig{Bandwidth: 1 << 30, Floor: 100 * mib, Rate: 200 * mib}
	th, srv := throttleServer(t, start)
	url := srv.URL + "/v1/throttle"

	code, body := do(t, http.MethodGet, url, "")
	var st ThrottleStatus
	if err := json.Unmarshal(body, &st); code != 200 || err != nil {
		t.Fatalf("GET: %d %s %v", code, body, err)
	}
	if st.Bandwidth != start.Bandwidth || st.Floor != start.Floor || st.Rate != start.Rate || st.Effective != 200*mib {
		t.Fatalf("GET: %+v", st)
	}

	// A PUT changes the fields it names, in either notation, and keeps the
	// others; the answer is the new setting and its effective rate.
	code, body = do(t, http.MethodPut, url, `{"rate": "50MiB/s", "floor": 209715200}`)
	st = ThrottleStatus{}
	if err := json.Unmarshal(body, &st); code != 200 || err != nil {
		t.Fatalf("PUT: %d %s %v", code, body, err)
	}
	want := sock.ThrottleConfig{Bandwidth: 1 << 30, Floor: 200 * mib, Rate: 50 * mib}
	if got := th.Config(); got != want {
		t.Fatalf("config after PUT %+v, want %+v", got, want)
	}
	if st.Rate != 50*mib || st.Floor != 200*mib || st.Bandwidth != 1<<30 || st.Effective != 50*mib {
		t.Fatalf("PUT answered %+v", st)
	}
	code, _ = do(t, http.MethodPut, url, `{"rate": 0}`)
	if code != 200 || th.Effective() != (1<<30)-200*mib {
		t.Fatalf("rate 0: %d, effective %d, want bandwidth minus floor", code, th.Effective())
	}

	for _, tc := range []struct{ body, want string }{
		{`{"rate": -1}`, "throttle rate -1B/s: must be between 1MiB/s and 100GiB/s (or 0 for no cap)"},
		{`{"rate": "10K"}`, "throttle rate 10KiB/s: must be between"},
		{`{"bandwidth": "1TiB"}`, "throttle bandwidth 1TiB/s: must be between"},
		{`{"floor": "1GiB"}`, "throttle floor 1GiB/s: must be below the bandwidth 1GiB/s; lower the floor or raise the bandwidth"},
		{`{"bandwidth": 0}`, "throttle floor 200MiB/s without a bandwidth"},
		{`{"floor": -5}`, "throttle floor -5B/s: must not be negative"},
		{`{"rate": "fast"}`, `rate: rate "fast": give bytes per second with an optional unit`},
		{`{"rate": 1.5}`, `rate: want bytes per second as an integer or a string like "200MiB", got 1.5`},
		{`{"rate": true}`, "rate: want bytes per second"},
		{`{"floro": "1G"}`, `unknown field "floro": the throttle has bandwidth, floor and rate`},
		{`{}`, "give at least one of bandwidth, floor and rate"},
		{``, "empty body"},
		{`{"rate": `, "malformed JSON"},
		{`{"rate": 0} {}`, "trailing data"},
		{`[1]`, "field"},
	} {
		before := th.Config()
		code, body := do(t, http.MethodPut, url, tc.body)
		var ae coordapi.Error
		if json.Unmarshal(body, &ae) != nil || code != http.StatusBadRequest || ae.Code != coordapi.CodeBadRequest || !strings.Contains(ae.Message, tc.want) {
			t.Errorf("PUT %s: %d %s, want 400 with %q", tc.body, code, body, tc.want)
		}
		if th.Config() != before {
			t.Errorf("PUT %s changed the throttle to %+v", tc.body, th.Config())
		}
	}

	if code, body := do(t, http.MethodPut, url, `{"rate": "`+strings.Repeat("1", 5000)+`"}`); code != http.StatusRequestEntityTooLarge {
		t.Errorf("large body: %d %s", code, body)
	}
	if code, body := do(t, http.MethodPost, url, `{}`); code != http.StatusMethodNotAllowed || !strings.Contains(string(body), "use GET to read the throttle, PUT to change it") {
		t.Errorf("POST: %d %s", code, body)
	}
}

func runThrottle(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := &cobra.Command{Use: "node"}
	root.AddCommand(ThrottleCommand())
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"throttle"}, args...))
	root.SilenceUsage, root.SilenceErrors = true, true
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestThrottleCommand(t *testing.T) {
	t.Setenv("KEEL_NODE", "")
	th, srv := throttleServer(t, sock.ThrottleConfig{Rate: 200 * mib})

	out, err := runThrottle(t, "--node", srv.URL)
	if err != nil || !regexp.MustCompile(`(?m)^BANDWIDTH\s+FLOOR\s+RATE CAP\s+EFFECTIVE\s+FOREGROUND\s+RECOVERY SENT\s+WAITING\s+WAITED\n`+
		`unknown\s+0B/s\s+200MiB/s\s+200MiB/s\s+0B/s\s+0B\s+0\s+0s\s*$`).MatchString(out) {
		t.Fatalf("show: %q %v", out, err)
	}

	out, err = runThrottle(t, "--node", srv.URL+"/", "--bandwidth", "1GiB", "--floor", "300MiB")
	if err != nil || !regexp.MustCompile(`(?m)^1GiB/s\s+300MiB/s\s+200MiB/s\s+200MiB/s\s`).MatchString(out) {
		t.Fatalf("set bandwidth and floor: %q %v", out, err)
	}
	out, err = runThrottle(t, "--node", srv.URL, "--rate", "0", "-o", "json")
	var st ThrottleStatus
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || st.Rate != 0 || st.Floor != 300*mib || st.Effective != (1<<30)-300*mib {
		t.Fatalf("rate 0 as json: %q %v", out, err)
	}
	if got := th.Config(); got != (sock.ThrottleConfig{Bandwidth: 1 << 30, Floor: 300 * mib}) {
		t.Fatalf("config %+v", got)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "--node is required: the node's metrics URL, e.g. --node http://127.0.0.1:9401"},
		{[]string{"--node", "127.0.0.1:9401"}, `--node "127.0.0.1:9401": give the node's metrics URL`},
		{[]string{"--node", "http://127.0.0.1:9401/metrics"}, `--node "http://127.0.0.1:9401/metrics": give the node's metrics URL`},
		{[]string{"--node", srv.URL, "--rate", "fast"}, `--rate: rate "fast": give bytes per second with an optional unit, e.g. 200MiB, or 0`},
		{[]string{"--node", srv.URL, "--rate", "10K"}, "--rate: throttle rate 10KiB/s: must be between 1MiB/s and 100GiB/s (or 0 for no cap)"},
		{[]string{"--node", srv.URL, "--bandwidth", "200G"}, "--bandwidth: throttle bandwidth 200GiB/s: must be between"},
		{[]string{"--node", srv.URL, "--floor", "-1M"}, `--floor: rate "-1M"`},
		{[]string{"--node", srv.URL, "--floor", "1G"}, "node throttle: the node refused: throttle floor 1GiB/s: must be below the bandwidth 1GiB/s; lower the floor or raise the bandwidth"},
		{[]string{"--node", srv.URL, "-o", "yaml"}, `--output "yaml": use --output table or --output json`},
		{[]string{"--node", srv.URL, "--timeout", "0s"}, "--timeout 0s: give a positive duration"},
		{[]string{"--node", srv.URL + "/"}, ""}, // a trailing slash is fine
	} {
		before := th.Config()
		out, err := runThrottle(t, tc.args...)
		if tc.want == "" {
			if err != nil {
				t.Errorf("%v: %v", tc.args, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %q %v, want %q", tc.args, out, err, tc.want)
		}
		if th.Config() != before {
			t.Errorf("%v changed the throttle to %+v", tc.args, th.Config())
		}
	}

	// A URL that is not a node's metrics address, and one nobody listens at.
	other := httptest.NewServer(http.NotFoundHandler())
	defer other.Close()
	if _, err := runThrottle(t, "--node", other.URL); err == nil || !strings.Contains(err.Error(), "has no /v1/throttle: is --node the metrics address of a keel node?") {
		t.Errorf("not a node: %v", err)
	}
	other.Close()
	if _, err := runThrottle(t, "--node", other.URL); err == nil || !strings.Contains(err.Error(), "cannot reach "+other.URL) {
		t.Errorf("nobody listening: %v", err)
	}
}

func TestThrottleFlags(t *testing.T) {
	parse := func(args ...string) (sock.ThrottleConfig, error) {
		var get func() (sock.ThrottleConfig, error)
		var c sock.ThrottleConfig
		var err error
		cmd := &cobra.Command{Use: "node", RunE: func(*cobra.Command, []string) error { c, err = get(); return nil }}
		get = ThrottleFlags(cmd)
		cmd.SetArgs(args)
		cmd.SetOut(io.Discard)
		cmd.SetErr(io.Discard)
		if e := cmd.Execute(); e != nil {
			t.Fatal(e)
		}
		return c, err
	}
	if c, err := parse(); err != nil || c != DefaultThrottle {
		t.Fatalf("defaults: %+v %v", c, err)
	}
	if c, err := parse("--repl-bandwidth", "10GiB", "--repl-floor", "2G", "--recovery-rate", "1G/s"); err != nil || c != (sock.ThrottleConfig{Bandwidth: 10 << 30, Floor: 2 << 30, Rate: 1 << 30}) {
		t.Fatalf("set: %+v %v", c, err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--recovery-rate", "lots"}, `--recovery-rate: rate "lots"`},
		{[]string{"--repl-floor", "100M"}, "--repl-bandwidth, --repl-floor, --recovery-rate: throttle floor 100MiB/s without a bandwidth"},
		{[]string{"--repl-bandwidth", "1G", "--repl-floor", "1G"}, "must be below the bandwidth"},
	} {
		if _, err := parse(tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want %q", tc.args, err, tc.want)
		}
	}
}

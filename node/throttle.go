package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"keel/ctl/coordapi"
	"keel/netpath/sock"
)

// The recovery throttle's operator surface: the node serves
// GET/PUT /v1/throttle on its metrics address (ThrottleHandler), and
// `keel node throttle` (ThrottleCommand) reads or changes it at run time.
// The throttle itself is netpath/sock's Throttle; a run-time change lasts
// until the node restarts, which starts again from its flags
// (ThrottleFlags).
//
//	GET /v1/throttle          → 200 ThrottleStatus
//	PUT /v1/throttle          {"rate": "200MiB", "floor": 104857600}
//	                          → 200 ThrottleStatus (the new setting)
//	                          → 400 coordapi.Error {"code":"bad_request","message":...}
//
// A PUT changes only the fields it names (bandwidth, floor, rate; bytes
// per second, as a JSON number or a string like "200MiB" or "1GiB/s"; 0
// means unknown bandwidth, no floor, no rate cap) and keeps the others.

// DefaultThrottle is the recovery throttle a node starts with when its
// flags say nothing: the path's bandwidth unknown, recovery capped at
// 200 MiB/s.
var DefaultThrottle = sock.ThrottleConfig{Rate: 200 << 20}

// ThrottleStatus is the body of GET /v1/throttle and of a PUT's answer.
// Rates are bytes per second.
type ThrottleStatus struct {
	Bandwidth int64 `json:"bandwidth"` // 0: unknown
	Floor     int64 `json:"floor"`
	Rate      int64 `json:"rate"` // 0: no cap
	// Effective is the recovery rate allowed now (0: unlimited);
	// ForegroundRate the replication traffic last measured.
	Effective      int64 `json:"effective"`
	ForegroundRate int64 `json:"foreground_rate"`
	// RecoveryBytes went through the throttle since the node started;
	// Waits of them had to wait, WaitTime in total; Waiting wait now.
	RecoveryBytes   int64             `json:"recovery_bytes"`
	ForegroundBytes int64             `json:"foreground_bytes"`
	Waits           int64             `json:"waits"`
	WaitTime        coordapi.Duration `json:"wait_time"`
	Waiting         int               `json:"waiting"`
}

// ThrottleUpdate is the body of PUT /v1/throttle: nil fields are kept.
type ThrottleUpdate struct {
	Bandwidth *int64 `json:"bandwidth,omitempty"`
	Floor     *int64 `json:"floor,omitempty"`
	Rate      *int64 `json:"rate,omitempty"`
}

func (u ThrottleUpdate) apply(c sock.ThrottleConfig) sock.ThrottleConfig {
	if u.Bandwidth != nil {
		c.Bandwidth = *u.Bandwidth
	}
	if u.Floor != nil {
		c.Floor = *u.Floor
	}
	if u.Rate != nil {
		c.Rate = *u.Rate
	}
	return c
}

// ParseRate reads a rate in bytes per second as operators write it: "0",
// or a positive size with an optional binary unit and an optional "/s"
// ("200MiB", "1G/s", "1048576").
func ParseRate(s string) (int64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(strings.TrimSuffix(t, "/s"), "/S")
	if t == "0" {
		return 0, nil
	}
	n, err := coordapi.ParseSize(t)
	if err != nil {
		return 0, fmt.Errorf("rate %q: give bytes per second with an optional unit, e.g. 200MiB, or 0", s)
	}
	return n, nil
}

// decodeThrottleUpdate reads a PUT body: a JSON object with at least one
// of bandwidth, floor and rate, each a number or a rate string. Unknown
// fields are refused: a misspelt field must not look like a success.
func decodeThrottleUpdate(body []byte) (ThrottleUpdate, error) {
	var u ThrottleUpdate
	var raw map[string]json.RawMessage
	if err := coordapi.Decode(body, &raw); err != nil {
		return u, err
	}
	if len(raw) == 0 {
		return u, errors.New("give at least one of bandwidth, floor and rate (bytes per second)")
	}
	keys := make([]string, 0, len(raw))
	for k := range raw {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		var dst **int64
		switch k {
		case "bandwidth":
			dst = &u.Bandwidth
		case "floor":
			dst = &u.Floor
		case "rate":
			dst = &u.Rate
		default:
			return u, fmt.Errorf("unknown field %q: the throttle has bandwidth, floor and rate", k)
		}
		n, err := rateJSON(raw[k])
		if err != nil {
			return u, fmt.Errorf("%s: %w", k, err)
		}
		*dst = &n
	}
	return u, nil
}

// rateJSON reads one rate: an integer number of bytes/s or a rate string.
func rateJSON(b json.RawMessage) (int64, error) {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		return ParseRate(s)
	}
	n, err := strconv.ParseInt(string(bytes.TrimSpace(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("want bytes per second as an integer or a string like \"200MiB\", got %s", b)
	}
	return n, nil
}

func throttleStatus(t *sock.Throttle) ThrottleStatus {
	s := t.Stats()
	return ThrottleStatus{
		Bandwidth: s.Config.Bandwidth, Floor: s.Config.Floor, Rate: s.Config.Rate,
		Effective: s.Effective, ForegroundRate: s.ForegroundRate,
		RecoveryBytes: s.RecoveryBytes, ForegroundBytes: s.ForegroundBytes,
		Waits: s.Waits, WaitTime: coordapi.Duration(s.WaitTime), Waiting: s.Waiting,
	}
}

type throttleHandler struct {
	t   *sock.Throttle
	log *slog.Logger
	mu  sync.Mutex // serialises PUTs: read, merge, Set
}

// ThrottleHandler serves GET and PUT /v1/throttle for t (which must not be
// nil); mount it on the node's metrics server. Changes are logged at info
// level on log (nil: discarded).
func ThrottleHandler(t *sock.Throttle, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &throttleHandler{t: t, log: log}
}

const maxThrottleBody = 4 << 10

func (h *throttleHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		writeThrottleJSON(w, http.StatusOK, throttleStatus(h.t))
	case http.MethodPut:
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxThrottleBody))
		if err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				writeThrottleJSON(w, http.StatusRequestEntityTooLarge, coordapi.Errorf(coordapi.CodeTooLarge, "body over %d bytes", maxThrottleBody))
				return
			}
			writeThrottleJSON(w, http.StatusBadRequest, coordapi.Errorf(coordapi.CodeBadRequest, "reading the body: %v", err))
			return
		}
		u, err := decodeThrottleUpdate(body)
		if err != nil {
			writeThrottleJSON(w, http.StatusBadRequest, coordapi.Errorf(coordapi.CodeBadRequest, "%v", err))
			return
		}
		h.mu.Lock()
		old := h.t.Config()
		next := u.apply(old)
		err = h.t.Set(next)
		h.mu.Unlock()
		if err != nil {
			writeThrottleJSON(w, http.StatusBadRequest, coordapi.Errorf(coordapi.CodeBadRequest, "%v", err))
			return
		}
		if old != next {
			h.log.Info("recovery throttle changed",
				"bandwidth", next.Bandwidth, "floor", next.Floor, "rate", next.Rate,
				"old_bandwidth", old.Bandwidth, "old_floor", old.Floor, "old_rate", old.Rate,
				"effective", h.t.Effective(), "from", r.RemoteAddr)
		}
		writeThrottleJSON(w, http.StatusOK, throttleStatus(h.t))
	default:
		w.Header().Set("Allow", "GET, HEAD, PUT")
		writeThrottleJSON(w, http.StatusMethodNotAllowed, coordapi.Errorf(coordapi.CodeBadRequest, "method %s: use GET to read the throttle, PUT to change it", r.Method))
	}
}

func writeThrottleJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// ThrottleFlags adds the recovery throttle's start-up flags to the node
// daemon's command (--repl-bandwidth, --repl-floor, --recovery-rate) and
// returns the function that reads them once the flags are parsed; its
// errors name the flag and the fix.
func ThrottleFlags(cmd *cobra.Command) func() (sock.ThrottleConfig, error) {
	var bw, floor, rate string
	f := cmd.Flags()
	f.StringVar(&bw, "repl-bandwidth", rateFlag(DefaultThrottle.Bandwidth), "the replication network's capacity per second, e.g. 1GiB (0: unknown; then --repl-floor must be 0)")
	f.StringVar(&floor, "repl-floor", rateFlag(DefaultThrottle.Floor), "share of --repl-bandwidth per second reserved for foreground replication, e.g. 200MiB")
	f.StringVar(&rate, "recovery-rate", rateFlag(DefaultThrottle.Rate), "cap on re-mirror and catch-up traffic per second, e.g. 200MiB (0: no cap but bandwidth minus floor); change it at run time with keel node throttle")
	return func() (sock.ThrottleConfig, error) {
		var c sock.ThrottleConfig
		for _, x := range []struct {
			flag, val string
			dst       *int64
		}{{"--repl-bandwidth", bw, &c.Bandwidth}, {"--repl-floor", floor, &c.Floor}, {"--recovery-rate", rate, &c.Rate}} {
			n, err := ParseRate(x.val)
			if err != nil {
				return c, fmt.Errorf("%s: %w", x.flag, err)
			}
			*x.dst = n
		}
		if err := c.Validate(); err != nil {
			return c, fmt.Errorf("--repl-bandwidth, --repl-floor, --recovery-rate: %w", err)
		}
		return c, nil
	}
}

func rateFlag(n int64) string {
	if n == 0 {
		return "0"
	}
	return coordapi.FormatBytes(n)
}

// ThrottleCommand is `keel node throttle`: show or change a running
// node's recovery throttle through its /v1/throttle endpoint.
func ThrottleCommand() *cobra.Command {
	var node, output, bw, floor, rate string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "throttle --node URL [--rate R] [--floor F] [--bandwidth B]",
		Short: "show or set a node's recovery throttle (re-mirror and catch-up on the replication network)",
		Long: `throttle reads or changes, at run time, how fast a node may send recovery
traffic (catch-up and re-mirror) on its replication network, so that
recovery never starves foreground replication (client writes):

  recovery rate = min(--rate, --bandwidth - max(--floor, foreground rate))

never less than 1MiB/s while throttled. Values are bytes per second, with an
optional unit (200MiB, 1GiB); 0 means: --bandwidth unknown (then only --rate
applies and --floor must be 0), --rate no cap. Flags not given keep their
current value; with none, the current setting is shown. A change lasts until
the node restarts (its --repl-bandwidth, --repl-floor and --recovery-rate
flags set the start).

--node is the node's metrics URL (the address of its --metrics flag).`,
		Example: `  keel node throttle --node http://127.0.0.1:9401
  keel node throttle --node http://127.0.0.1:9401 --rate 200MiB
  keel node throttle --node http://127.0.0.1:9401 --bandwidth 1GiB --floor 300MiB --rate 0`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch output {
			case "table", "json":
			default:
				return fmt.Errorf("--output %q: use --output table or --output json", output)
			}
			if timeout <= 0 {
				return fmt.Errorf("--timeout %v: give a positive duration, e.g. --timeout 10s", timeout)
			}
			endpoint, err := throttleURL(node)
			if err != nil {
				return err
			}
			var u ThrottleUpdate
			for _, x := range []struct {
				name, val string
				dst       **int64
				check     func(int64) sock.ThrottleConfig
			}{
				{"bandwidth", bw, &u.Bandwidth, func(n int64) sock.ThrottleConfig { return sock.ThrottleConfig{Bandwidth: n} }},
				{"floor", floor, &u.Floor, nil},
				{"rate", rate, &u.Rate, func(n int64) sock.ThrottleConfig { return sock.ThrottleConfig{Rate: n} }},
			} {
				if !cmd.Flags().Changed(x.name) {
					continue
				}
				n, err := ParseRate(x.val)
				if err != nil {
					return fmt.Errorf("--%s: %w", x.name, err)
				}
				if x.check != nil {
					if err := x.check(n).Validate(); err != nil {
						return fmt.Errorf("--%s: %w", x.name, err)
					}
				}
				*x.dst = &n
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			var st ThrottleStatus
			if u == (ThrottleUpdate{}) {
				err = throttleCall(ctx, http.MethodGet, endpoint, nil, &st)
			} else {
				err = throttleCall(ctx, http.MethodPut, endpoint, u, &st)
			}
			if err != nil {
				return explainThrottle(node, timeout, err)
			}
			if output == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "BANDWIDTH\tFLOOR\tRATE CAP\tEFFECTIVE\tFOREGROUND\tRECOVERY SENT\tWAITING\tWAITED")
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n",
				orWord(st.Bandwidth, "unknown"), perSecond(st.Floor), orWord(st.Rate, "none"), orWord(st.Effective, "unlimited"),
				perSecond(st.ForegroundRate), coordapi.FormatBytes(st.RecoveryBytes), st.Waiting, st.WaitTime.D().Round(time.Millisecond))
			return w.Flush()
		},
	}
	def := os.Getenv("KEEL_NODE")
	f := cmd.Flags()
	f.StringVar(&node, "node", def, "the node's metrics URL, e.g. http://127.0.0.1:9401 (default $KEEL_NODE)")
	f.StringVar(&bw, "bandwidth", "", "the replication network's capacity per second, e.g. 1GiB (0: unknown)")
	f.StringVar(&floor, "floor", "", "share of the bandwidth per second reserved for foreground replication, e.g. 300MiB")
	f.StringVar(&rate, "rate", "", "cap on recovery traffic per second, e.g. 200MiB (0: no cap)")
	f.StringVarP(&output, "output", "o", "table", "output format: table or json")
	f.DurationVar(&timeout, "timeout", 10*time.Second, "give up on the node after this long")
	return cmd
}

// throttleURL checks --node and returns the endpoint's URL.
func throttleURL(node string) (string, error) {
	if node == "" {
		return "", errors.New("--node is required: the node's metrics URL, e.g. --node http://127.0.0.1:9401 (or set KEEL_NODE)")
	}
	u, err := url.Parse(node)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		return "", fmt.Errorf("--node %q: give the node's metrics URL (the address of its --metrics flag), e.g. --node http://127.0.0.1:9401", node)
	}
	return u.Scheme + "://" + u.Host + "/v1/throttle", nil
}

// throttleCall sends one request; a non-2xx answer is a *coordapi.Error.
func throttleCall(ctx context.Context, method, endpoint string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, endpoint, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		ae := &coordapi.Error{HTTPStatus: resp.StatusCode}
		if json.Unmarshal(data, ae) != nil || ae.Message == "" {
			ae.Code = coordapi.CodeInternal
			ae.Message = fmt.Sprintf("HTTP %s: %s", resp.Status, strings.TrimSpace(string(data)))
		}
		return ae
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("malformed answer from %s: %w", endpoint, err)
	}
	return nil
}

// explainThrottle turns a call's error into one an operator can act on.
func explainThrottle(node string, timeout time.Duration, err error) error {
	var ae *coordapi.Error
	switch {
	case errors.As(err, &ae) && ae.HTTPStatus == http.StatusNotFound:
		return fmt.Errorf("node throttle: %s has no /v1/throttle: is --node the metrics address of a keel node?", node)
	case errors.As(err, &ae):
		return fmt.Errorf("node throttle: the node refused: %s", ae.Message)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("node throttle: no answer from %s within --timeout %v: %w", node, timeout, err)
	}
	return fmt.Errorf("node throttle: cannot reach %s: is `keel node --metrics` running there? (--node is its metrics URL): %w", node, err)
}

func perSecond(n int64) string { return coordapi.FormatBytes(n) + "/s" }

func orWord(n int64, zero string) string {
	if n == 0 {
		return zero
	}
	return perSecond(n)
}

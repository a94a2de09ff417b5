// Package coordclient owns the client side of the coordinator API: an HTTP
// client that every keel process uses to talk to a coordinator cell
// (deadlines on every attempt, retries with capped exponential backoff and
// jitter, Retry-After honoured, several member URLs), and the node-side
// Agent that registers a storage node, keeps its lease alive with
// heartbeats and tells the data path what the node must serve.
//
// It imports only ctl/coordapi and the standard library.
//
// # Retries
//
// Sync and Rejoin are safe to retry: a repeated slot request for a held
// slot is granted again, a repeated rejoin answers the current assignment.
// A refused slot (Granted false) is an answer, not an error: the caller
// waits Agent.SyncRetryWait (the grant's retry time raised by SlotBackoff)
// before asking again.
//
// A call is retried when the outcome says trying again may help: a
// transport error, 502/503/504, or an API error whose code is retryable
// (overloaded, not_leader, timeout, internal). The wait before attempt n+1
// is drawn from [d/2, d] with d = min(Max, Base·2^n) ("equal jitter": never
// zero, so never a tight loop, and spread so that many clients do not retry
// in step); a Retry-After from the server raises it to at least that, plus
// up to a quarter more. Each retry moves to the next coordinator URL. The
// caller's context bounds the whole call.
//
// # Lease
//
// The Agent records the monotonic time s at which it sends each heartbeat
// and, when the answer arrives, trusts its lease until
//
//	node deadline = s + L·(1-ρ) - m          (its own monotonic clock)
//
// while the coordinator's leader, which stamped the heartbeat with its
// clock at T after receiving it (so after s), may expire the node only at
//
//	coordinator expiry = T + L·(1+ρ)         (the leader's clock)
//
// with L the lease duration, ρ the bound on any clock's rate error and m a
// margin. A clock running at most ρ off makes the first span at most
// L - m/(1-ρ) of real time and the second at least L, so the node stops
// acknowledging writes strictly before the coordinator can promote another
// primary. (coordapi.Lease gives the full argument, including coordinator
// leader changes.) The Agent keeps at most one heartbeat in flight and
// discards an answer that arrives after the attempt's deadline, so an old
// answer never pairs old assignments with a newer deadline; per volume it
// never goes back to an older epoch. LeaseValid and Authority are what the
// data path consults before acknowledging a write.
package coordclient

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"keel/ctl/coordapi"
)

// Backoff shapes the waits between retries.
type Backoff struct {
	Base time.Duration // first wait's upper bound; default 100ms
	Max  time.Duration // cap; default 5s
}

// Wait is the jittered wait before retry number attempt (0 for the first
// retry): uniform in [d/2, d], d = min(Max, Base·2^attempt).
func (b Backoff) Wait(attempt int, rnd func() float64) time.Duration {
	base, maxd := b.Base, b.Max
	if base <= 0 {
		base = 100 * time.Millisecond
	}
	if maxd < base {
		maxd = max(base, 5*time.Second)
	}
	d := maxd
	if attempt < 30 {
		d = min(maxd, base<<attempt)
	}
	return d/2 + time.Duration(rnd()*float64(d/2))
}

// After is the wait before retry number attempt when the server asked for
// at least floor: the jittered Wait, but never below floor plus up to a
// quarter of it in jitter.
func (b Backoff) After(attempt int, floor time.Duration, rnd func() float64) time.Duration {
	w := b.Wait(max(attempt, 0), rnd)
	if floor > 0 {
		w = max(w, floor+time.Duration(rnd()*float64(floor/4)))
	}
	return w
}

// SlotBackoff shapes the waits between refused slot requests
// (Agent.SyncRetryWait): from 1 s, doubling, capped at 2 min.
var SlotBackoff = Backoff{Base: time.Second, Max: 2 * time.Minute}

// Config configures a Client.
type Config struct {
	// URLs of the coordinator cell's members, e.g. http://10.0.0.1:7400.
	URLs []string
	// HTTP is the client used for every attempt; default one with
	// connection and header timeouts.
	HTTP *http.Client
	// AttemptTimeout bounds one attempt; default 5s.
	AttemptTimeout time.Duration
	// Attempts bounds the attempts of one call; default 6.
	Attempts int
	Backoff  Backoff
	// MaxRetryAfter caps how long a server's Retry-After can make us wait;
	// default 30s.
	MaxRetryAfter time.Duration
	Logger        *slog.Logger
	// Rand returns a uniform number in [0,1) for jitter; default
	// math/rand/v2.
	Rand func() float64
}

// Client calls a coordinator cell. It is safe for concurrent use.
type Client struct {
	cfg  Config
	urls []*url.URL
	log  *slog.Logger

	mu   sync.Mutex // guards next
	next int        // index of the URL to try first
}

// New checks cfg and returns a client.
func New(cfg Config) (*Client, error) {
	if len(cfg.URLs) == 0 {
		return nil, errors.New("coordclient: no coordinator URL: give at least one, e.g. http://127.0.0.1:7400")
	}
	c := &Client{cfg: cfg, log: cfg.Logger}
	for _, s := range cfg.URLs {
		u, err := url.Parse(strings.TrimRight(s, "/"))
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("coordclient: coordinator URL %q: want http://host:port", s)
		}
		c.urls = append(c.urls, u)
	}
	if c.cfg.HTTP == nil {
		c.cfg.HTTP = &http.Client{Transport: &http.Transport{
			Proxy:                 nil,
			MaxIdleConnsPerHost:   16,
			IdleConnTimeout:       60 * time.Second,
			ResponseHeaderTimeout: 30 * time.Second,
		}}
	}
	if c.cfg.AttemptTimeout <= 0 {
		c.cfg.AttemptTimeout = 5 * time.Second
	}
	if c.cfg.Attempts <= 0 {
		c.cfg.Attempts = 6
	}
	if c.cfg.MaxRetryAfter <= 0 {
		c.cfg.MaxRetryAfter = 30 * time.Second
	}
	if c.cfg.Rand == nil {
		c.cfg.Rand = mrand.Float64
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// URLs returns the coordinator URLs the client was given.
func (c *Client) URLs() []string {
	out := make([]string, len(c.urls))
	for i, u := range c.urls {
		out[i] = u.String()
	}
	return out
}

// callOpts tunes one call.
type callOpts struct {
	attempts int           // 0: the client's default
	timeout  time.Duration // per attempt; 0: the client's default
	// sent, when set, is called with the time each attempt is sent.
	sent func(time.Time)
}

// maxResponse bounds a response body the client reads.
const maxResponse = 256 << 20

// do runs one API call with retries. in is encoded as the JSON body (nil:
// no body); a 2xx answer is decoded into out (nil: discarded). A failure
// the server explained is returned as *coordapi.Error.
func (c *Client) do(ctx context.Context, method, path string, in, out any, o callOpts) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return fmt.Errorf("coordclient: encoding %s %s: %w", method, path, err)
		}
	}
	attempts := o.attempts
	if attempts <= 0 {
		attempts = c.cfg.Attempts
	}
	c.mu.Lock()
	start := c.next
	c.mu.Unlock()
	var last error
	for a := 0; a < attempts; a++ {
		i := (start + a) % len(c.urls)
		retryAfter, err := c.attempt(ctx, i, method, path, body, out, o)
		if err == nil {
			c.mu.Lock()
			c.next = i
			c.mu.Unlock()
			return nil
		}
		last = err
		if ctx.Err() != nil || !retryable(err) || a == attempts-1 {
			break
		}
		wait := c.cfg.Backoff.After(a, min(retryAfter, c.cfg.MaxRetryAfter), c.cfg.Rand)
		c.log.Debug("coordinator call failed; retrying", "method", method, "path", path, "url", c.urls[i].String(), "attempt", a+1, "wait", wait, "err", err)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (then %v)", last, ctx.Err())
		case <-t.C:
		}
	}
	return last
}

func retryable(err error) bool {
	var ae *coordapi.Error
	if errors.As(err, &ae) {
		return ae.Retryable() || ae.HTTPStatus == http.StatusBadGateway
	}
	return true // transport errors, attempt timeouts
}

// attempt sends one request to URL i. It returns the server's Retry-After,
// if any.
func (c *Client) attempt(ctx context.Context, i int, method, path string, body []byte, out any, o callOpts) (time.Duration, error) {
	timeout := o.timeout
	if timeout <= 0 {
		timeout = c.cfg.AttemptTimeout
	}
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	u := c.urls[i].String() + path
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(actx, method, u, rd)
	if err != nil {
		return 0, fmt.Errorf("coordclient: %s %s: %w", method, u, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	if o.sent != nil {
		o.sent(time.Now())
	}
	resp, err := c.cfg.HTTP.Do(req)
	if err != nil {
		return 0, fmt.Errorf("coordclient: %s %s: %w", method, u, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1))
	if err != nil {
		return 0, fmt.Errorf("coordclient: %s %s: reading the answer: %w", method, u, err)
	}
	if len(data) > maxResponse {
		return 0, fmt.Errorf("coordclient: %s %s: answer larger than %d bytes", method, u, maxResponse)
	}
	if resp.StatusCode/100 == 2 {
		if out == nil {
			return 0, nil
		}
		if err := coordapi.Decode(data, out); err != nil {
			return 0, &coordapi.Error{Code: coordapi.CodeInternal, Message: fmt.Sprintf("%s %s: undecodable answer: %v", method, u, err), HTTPStatus: resp.StatusCode}
		}
		return 0, nil
	}
	ra := parseRetryAfter(resp.Header.Get("Retry-After"))
	ae := &coordapi.Error{}
	if coordapi.Decode(data, ae) != nil || ae.Code == "" {
		ae = &coordapi.Error{Code: codeForStatus(resp.StatusCode), Message: fmt.Sprintf("%s %s: %s: %s", method, u, resp.Status, snippet(data))}
	}
	ae.HTTPStatus = resp.StatusCode
	if ra == 0 {
		ra = ae.RetryAfter.D()
	}
	ae.RetryAfter = coordapi.Duration(ra)
	return ra, ae
}

func codeForStatus(s int) coordapi.Code {
	switch {
	case s == http.StatusBadRequest:
		return coordapi.CodeBadRequest
	case s == http.StatusNotFound:
		return coordapi.CodeNotFound
	case s == http.StatusConflict:
		return coordapi.CodeConflict
	case s == http.StatusRequestEntityTooLarge:
		return coordapi.CodeTooLarge
	case s == http.StatusServiceUnavailable:
		return coordapi.CodeOverloaded
	case s == http.StatusGatewayTimeout:
		return coordapi.CodeTimeout
	case s == http.StatusInsufficientStorage:
		return coordapi.CodeNoCapacity
	case s >= 500:
		return coordapi.CodeInternal
	}
	return coordapi.CodeBadRequest
}

func snippet(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	if s == "" {
		s = "(empty body)"
	}
	return s
}

// parseRetryAfter reads delta-seconds or an HTTP date.
func parseRetryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(v); err == nil && n >= 0 {
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(time.Until(t), 0)
	}
	return 0
}

func esc(s string) string { return url.PathEscape(s) }

// Register announces the node and renews its lease.
func (c *Client) Register(ctx context.Context, req coordapi.RegisterRequest) (*coordapi.HeartbeatResponse, error) {
	var out coordapi.HeartbeatResponse
	return &out, c.do(ctx, http.MethodPost, "/v1/nodes/register", &req, &out, callOpts{})
}

// Heartbeat renews the node's lease and reports its replicas.
func (c *Client) Heartbeat(ctx context.Context, req coordapi.HeartbeatRequest) (*coordapi.HeartbeatResponse, error) {
	var out coordapi.HeartbeatResponse
	return &out, c.do(ctx, http.MethodPost, "/v1/nodes/heartbeat", &req, &out, callOpts{})
}

// ReplicaLoss reports, as the volume's primary, that a secondary no longer
// takes writes; the answer is the primary's assignment at the new epoch.
func (c *Client) ReplicaLoss(ctx context.Context, vol string, req coordapi.ReplicaLossRequest) (*coordapi.Assignment, error) {
	var out coordapi.Assignment
	return &out, c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(vol)+"/replica-loss", &req, &out, callOpts{})
}

// CreateVolume creates a volume. Unless req.RequestID is set, a random one
// is, so that the retries of this call are idempotent.
func (c *Client) CreateVolume(ctx context.Context, req coordapi.CreateVolumeRequest) (*coordapi.Volume, error) {
	if req.RequestID == "" {
		var b [12]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, err
		}
		req.RequestID = hex.EncodeToString(b[:])
	}
	var out coordapi.Volume
	return &out, c.do(ctx, http.MethodPost, "/v1/volumes", &req, &out, callOpts{})
}

// DeleteVolume deletes a volume by ID or name.
func (c *Client) DeleteVolume(ctx context.Context, ref string) (*coordapi.Volume, error) {
	var out coordapi.Volume
	return &out, c.do(ctx, http.MethodDelete, "/v1/volumes/"+esc(ref), nil, &out, callOpts{})
}

// Volumes lists volumes; impairedOnly lists those in state impaired.
func (c *Client) Volumes(ctx context.Context, impairedOnly bool) ([]coordapi.Volume, error) {
	var out coordapi.VolumeList
	p := "/v1/volumes"
	if impairedOnly {
		p += "?impaired=1"
	}
	return out.Volumes, c.do(ctx, http.MethodGet, p, nil, &out, callOpts{})
}

// Volume reads one volume by ID or name.
func (c *Client) Volume(ctx context.Context, ref string) (*coordapi.Volume, error) {
	var out coordapi.Volume
	return &out, c.do(ctx, http.MethodGet, "/v1/volumes/"+esc(ref), nil, &out, callOpts{})
}

// Nodes lists the nodes.
func (c *Client) Nodes(ctx context.Context) ([]coordapi.Node, error) {
	var out coordapi.NodeList
	return out.Nodes, c.do(ctx, http.MethodGet, "/v1/nodes", nil, &out, callOpts{})
}

// Drain marks a node draining, or with undo no longer draining.
func (c *Client) Drain(ctx context.Context, node coordapi.NodeID, undo bool) (*coordapi.Node, error) {
	var out coordapi.Node
	return &out, c.do(ctx, http.MethodPost, "/v1/nodes/"+esc(string(node))+"/drain", &coordapi.DrainRequest{Undo: undo}, &out, callOpts{})
}

// Config reads the cell configuration.
func (c *Client) Config(ctx context.Context) (*coordapi.Config, error) {
	var out coordapi.Config
	return &out, c.do(ctx, http.MethodGet, "/v1/config", nil, &out, callOpts{})
}

// SetConfig replaces the cell configuration.
func (c *Client) SetConfig(ctx context.Context, cfg coordapi.Config) (*coordapi.Config, error) {
	var out coordapi.Config
	return &out, c.do(ctx, http.MethodPut, "/v1/config", &cfg, &out, callOpts{})
}

// Cell describes the coordinator cell as the answering member sees it.
func (c *Client) Cell(ctx context.Context) (*coordapi.CellStatus, error) {
	var out coordapi.CellStatus
	return &out, c.do(ctx, http.MethodGet, "/v1/cell", nil, &out, callOpts{})
}

// Join adds a member to the cell.
func (c *Client) Join(ctx context.Context, req coordapi.JoinRequest) (*coordapi.CellStatus, error) {
	var out coordapi.CellStatus
	return &out, c.do(ctx, http.MethodPost, "/v1/cell/join", &req, &out, callOpts{})
}

// RemoveMember removes a member from the cell.
func (c *Client) RemoveMember(ctx context.Context, id string) (*coordapi.CellStatus, error) {
	var out coordapi.CellStatus
	return &out, c.do(ctx, http.MethodPost, "/v1/cell/remove", &coordapi.RemoveRequest{ID: id}, &out, callOpts{})
}

// Sync asks, as the volume's primary, for a slot to copy the volume to an
// out-of-sync member. A refusal is not an error: the grant says
// Granted=false and how long to wait (RetryAfter, to which the caller adds
// its own backoff and jitter; see Backoff.After).
func (c *Client) Sync(ctx context.Context, vol string, req coordapi.SyncRequest) (*coordapi.SyncGrant, error) {
	var out coordapi.SyncGrant
	return &out, c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(vol)+"/sync", &req, &out, callOpts{})
}

// Rejoin reports, as the volume's primary, that an out-of-sync member now
// holds every write; the answer is the primary's assignment at the new
// epoch (or its current one when the member was in sync already).
func (c *Client) Rejoin(ctx context.Context, vol string, req coordapi.RejoinRequest) (*coordapi.Assignment, error) {
	var out coordapi.Assignment
	return &out, c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(vol)+"/rejoin", &req, &out, callOpts{})
}

// Cluster reads the storm control's view: mode, slots, alarms.
func (c *Client) Cluster(ctx context.Context) (*coordapi.Cluster, error) {
	var out coordapi.Cluster
	return &out, c.do(ctx, http.MethodGet, "/v1/cluster", nil, &out, callOpts{})
}

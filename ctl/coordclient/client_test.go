package coordclient_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
)

// inProcess is a RoundTripper that serves each request with the handler of
// its host, in the calling goroutine: no sockets, so testing/synctest's fake
// clock drives every timeout.
type inProcess map[string]http.Handler

func (p inProcess) RoundTrip(r *http.Request) (*http.Response, error) {
	h, ok := p[r.URL.Host]
	if !ok {
		return nil, errors.New("connection refused")
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r)
	if err := r.Context().Err(); err != nil {
		return nil, err // the client gave up while the server was busy
	}
	return rec.Result(), nil
}

// script answers every call with the next step; the last repeats.
type script struct {
	mu    sync.Mutex
	steps []step
	calls []time.Time
}

type step struct {
	status     int
	retryAfter string
	body       any
	delay      time.Duration
}

func (s *script) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	st := s.steps[min(len(s.calls), len(s.steps)-1)]
	s.calls = append(s.calls, time.Now())
	s.mu.Unlock()
	if st.delay > 0 {
		select {
		case <-time.After(st.delay):
		case <-r.Context().Done():
			return
		}
	}
	if st.retryAfter != "" {
		w.Header().Set("Retry-After", st.retryAfter)
	}
	w.WriteHeader(st.status)
	if st.body != nil {
		json.NewEncoder(w).Encode(st.body)
	}
}

func (s *script) n() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.calls)
}

func newClient(t *testing.T, hosts inProcess, urls ...string) *coordclient.Client {
	t.Helper()
	c, err := coordclient.New(coordclient.Config{
		URLs:           urls,
		HTTP:           &http.Client{Transport: hosts},
		AttemptTimeout: time.Second,
		Rand:           func() float64 { return 0.5 },
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestBackoffWait(t *testing.T) {
	b := coordclient.Backoff{Base: 100 * time.Millisecond, Max: time.Second}
	for a, want := range []time.Duration{100, 200, 400, 800, 1000, 1000} {
		want *= time.Millisecond
		if lo := b.Wait(a, func() float64 { return 0 }); lo != want/2 {
			t.Errorf("attempt %d: lowest wait %v, want %v", a, lo, want/2)
		}
		if hi := b.Wait(a, func() float64 { return 0.999999 }); hi > want || hi < want*9/10 {
			t.Errorf("attempt %d: highest wait %v, want about %v", a, hi, want)
		}
	}
	if w := b.Wait(1000, func() float64 { return 0 }); w != 500*time.Millisecond {
		t.Errorf("huge attempt: %v", w)
	}
}

func TestNewRejectsBadURLs(t *testing.T) {
	for _, u := range [][]string{nil, {"127.0.0.1:7400"}, {"ftp://x"}} {
		if _, err := coordclient.New(coordclient.Config{URLs: u}); err == nil {
			t.Errorf("%v accepted", u)
		}
	}
}

// A shed call is retried on the next member after at least Retry-After.
func TestClientHonoursRetryAfterAndRotates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		shed := &script{steps: []step{{status: 503, retryAfter: "2", body: coordapi.Error{Code: coordapi.CodeOverloaded, Message: "busy"}}}}
		ok := &script{steps: []step{{status: 200, body: coordapi.VolumeList{Volumes: []coordapi.Volume{{ID: "vol-1"}}}}}}
		c := newClient(t, inProcess{"a:1": shed, "b:1": ok}, "http://a:1", "http://b:1")
		start := time.Now()
		vols, err := c.Volumes(t.Context(), false)
		if err != nil || len(vols) != 1 {
			t.Fatalf("got %v, %v", vols, err)
		}
		if d := time.Since(start); d < 2*time.Second {
			t.Errorf("retried after %v, before the 2s Retry-After", d)
		}
		if shed.n() != 1 || ok.n() != 1 {
			t.Errorf("calls: shed member %d, other %d", shed.n(), ok.n())
		}
	})
}

// A refusal the server explains (4xx) is not retried and comes back as
// *coordapi.Error with its status.
func TestClientDoesNotRetryRefusals(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := &script{steps: []step{{status: 409, body: coordapi.Error{Code: coordapi.CodeStaleEpoch, Message: "old", CurrentEpoch: 7}}}}
		c := newClient(t, inProcess{"a:1": s}, "http://a:1")
		_, err := c.ReplicaLoss(t.Context(), "vol-1", coordapi.ReplicaLossRequest{Node: "n1", Epoch: 6, Lost: "n2"})
		var ae *coordapi.Error
		if !errors.As(err, &ae) || ae.Code != coordapi.CodeStaleEpoch || ae.CurrentEpoch != 7 || ae.HTTPStatus != 409 {
			t.Fatalf("got %#v", err)
		}
		if s.n() != 1 {
			t.Errorf("%d calls for a refusal", s.n())
		}
	})
}

// A member that keeps failing is tried a bounded number of times, with
// growing waits between.
func TestClientBacksOffAndGivesUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := &script{steps: []step{{status: 502}}}
		c := newClient(t, inProcess{"a:1": s}, "http://a:1")
		_, err := c.Nodes(t.Context())
		var ae *coordapi.Error
		if !errors.As(err, &ae) || ae.HTTPStatus != 502 || !strings.Contains(ae.Message, "502") {
			t.Fatalf("got %v", err)
		}
		if s.n() != 6 {
			t.Fatalf("%d attempts, want 6", s.n())
		}
		for i := 2; i < len(s.calls); i++ {
			if gap, prev := s.calls[i].Sub(s.calls[i-1]), s.calls[i-1].Sub(s.calls[i-2]); gap <= prev {
				t.Errorf("wait %d (%v) not longer than wait %d (%v)", i, gap, i-1, prev)
			}
		}
	})
}

// An attempt that takes too long is abandoned and retried; the caller's
// context bounds the whole call.
func TestClientAttemptTimeoutAndContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := &script{steps: []step{{status: 200, delay: time.Hour, body: coordapi.NodeList{}}}}
		c := newClient(t, inProcess{"a:1": s}, "http://a:1")
		ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
		defer cancel()
		start := time.Now()
		_, err := c.Nodes(ctx)
		if err == nil {
			t.Fatal("no error")
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("call took %v past its 3s context", d)
		}
		if s.n() < 2 {
			t.Errorf("%d attempts: the 1s attempt timeout did not retry", s.n())
		}
	})
}

func TestCreateVolumeSetsRequestID(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var got coordapi.CreateVolumeRequest
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			json.NewDecoder(r.Body).Decode(&got)
			json.NewEncoder(w).Encode(coordapi.Volume{ID: "vol-1", Name: got.Name})
		})
		c := newClient(t, inProcess{"a:1": h}, "http://a:1")
		v, err := c.CreateVolume(t.Context(), coordapi.CreateVolumeRequest{Name: "x", Size: 4096, Replicas: 1})
		if err != nil || v.ID != "vol-1" {
			t.Fatal(v, err)
		}
		if len(got.RequestID) != 24 {
			t.Errorf("request id %q", got.RequestID)
		}
	})
}

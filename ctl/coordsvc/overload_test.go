package coordsvc

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"keel/ctl/coordapi"
)

// slowAdmin makes every volume-admin call block inside the handler, after
// admission, until release is closed: the slow class of the 2011 event.
type slowAdmin struct {
	release chan struct{}
	blocked atomic.Int64
}

func (s *slowAdmin) inject(ctx context.Context, class coordapi.Class, op string) {
	if class != coordapi.ClassVolumeAdmin {
		return
	}
	s.blocked.Add(1)
	select {
	case <-s.release:
	case <-ctx.Done():
	}
}

// oneMember starts a one-member cell and waits until it takes writes.
func oneMember(t testing.TB, mod func(*Config)) *Server {
	t.Helper()
	s := member(t, "c1", t.TempDir(), "127.0.0.1:0", "127.0.0.1:0", nil, mod)
	t.Cleanup(func() { s.Close() })
	eventually(t, "the member leads", 10*time.Second, func() error {
		if !s.IsLeader() {
			return fmt.Errorf("not leader yet")
		}
		return nil
	})
	return s
}

func post(t testing.TB, hc *http.Client, url string, body []byte) (int, http.Header, []byte) {
	t.Helper()
	resp, err := hc.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b
}

// TestOverloadHeartbeatsStillAnswered: a flood of slow volume-admin calls
// fills that class; the excess is shed at once with 503 and Retry-After,
// and heartbeats go on being answered throughout.
func TestOverloadHeartbeatsStillAnswered(t *testing.T) {
	slow := &slowAdmin{release: make(chan struct{})}
	s := oneMember(t, func(c *Config) {
		c.Inject = slow.inject
		c.Limits = map[coordapi.Class]Limit{
			coordapi.ClassVolumeAdmin: {InFlight: 4, Wait: 20 * time.Millisecond, Deadline: time.Minute, MaxBody: 64 << 10, RetryAfter: 3 * time.Second},
		}
	})
	hc := &http.Client{Timeout: time.Minute}
	hbBody, _ := json.Marshal(reg("n1", "a"))
	if code, _, b := post(t, hc, s.APIURL()+"/v1/nodes/register", hbBody); code != 200 {
		t.Fatalf("register: %d %s", code, b)
	}

	// The flood: 32 clients creating volumes as fast as they are answered.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var shed, other atomic.Int64
	var badShed atomic.Value
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				body, _ := json.Marshal(coordapi.CreateVolumeRequest{Name: fmt.Sprintf("f%d-%d", i, j), Size: 1 << 20, Replicas: 1})
				resp, err := hc.Post(s.APIURL()+"/v1/volumes", "application/json", bytes.NewReader(body))
				if err != nil {
					other.Add(1)
					continue
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusServiceUnavailable {
					shed.Add(1)
					var e coordapi.Error
					ra, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
					if json.Unmarshal(b, &e) != nil || e.Code != coordapi.CodeOverloaded || ra != 3 {
						badShed.Store(fmt.Sprintf("shed answer: Retry-After %q, body %s", resp.Header.Get("Retry-After"), b))
					}
					continue
				}
				other.Add(1)
			}
		}(i)
	}
	eventually(t, "the volume-admin class full of slow calls", 10*time.Second, func() error {
		if n := slow.blocked.Load(); n < 4 {
			return fmt.Errorf("%d blocked", n)
		}
		if shed.Load() < 100 {
			return fmt.Errorf("%d shed so far", shed.Load())
		}
		return nil
	})

	// Heartbeats, meanwhile, are all answered.
	hb, _ := json.Marshal(coordapi.HeartbeatRequest{Node: "n1", Capacity: 1 << 40, Free: 1 << 40})
	for i := 0; i < 50; i++ {
		code, _, b := post(t, hc, s.APIURL()+"/v1/nodes/heartbeat", hb)
		if code != 200 {
			t.Fatalf("heartbeat %d during the flood: %d %s", i, code, b)
		}
	}
	// So are reads, in their own class.
	resp, err := hc.Get(s.APIURL() + "/v1/nodes")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("read during the flood: %v %v", resp, err)
	}
	resp.Body.Close()
	if blocked := slow.blocked.Load(); blocked > 4 {
		t.Errorf("%d volume-admin calls got past admission, limit 4", blocked)
	}
	close(stop)
	close(slow.release)
	wg.Wait()
	if v := badShed.Load(); v != nil {
		t.Error(v)
	}
	t.Logf("flood: %d calls shed with 503, %d others", shed.Load(), other.Load())
	mf, err := s.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var shedMetric float64
	for _, f := range mf {
		if f.GetName() == "keel_coord_shed_total" {
			for _, m := range f.GetMetric() {
				if m.GetLabel()[0].GetValue() == string(coordapi.ClassVolumeAdmin) {
					shedMetric = m.GetCounter().GetValue()
				}
			}
		}
	}
	if shedMetric < float64(shed.Load()) {
		t.Errorf("keel_coord_shed_total{class=volume-admin} = %v, clients saw %d", shedMetric, shed.Load())
	}
}

// BenchmarkHeartbeatUnderFlood measures the heartbeats one member answers
// (each committed through raft to its bolt log) while 32 clients flood the
// volume-admin class with calls that block inside the handler: the flood
// is shed and heartbeats go on. Compare with BenchmarkHeartbeat.
func BenchmarkHeartbeatUnderFlood(b *testing.B) { benchHeartbeat(b, true) }

// BenchmarkHeartbeat is the same without the flood.
func BenchmarkHeartbeat(b *testing.B) { benchHeartbeat(b, false) }

func benchHeartbeat(b *testing.B, flood bool) {
	slow := &slowAdmin{release: make(chan struct{})}
	s := oneMember(b, func(c *Config) { c.Inject = slow.inject })
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}, Timeout: time.Minute}
	const nodes = 64
	for i := 0; i < nodes; i++ {
		body, _ := json.Marshal(reg(fmt.Sprintf("n%d", i), "a"))
		if code, _, out := post(b, hc, s.APIURL()+"/v1/nodes/register", body); code != 200 {
			b.Fatalf("register: %d %s", code, out)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var shed atomic.Int64
	if flood {
		for i := 0; i < 32; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				for j := 0; ; j++ {
					select {
					case <-stop:
						return
					default:
					}
					body, _ := json.Marshal(coordapi.CreateVolumeRequest{Name: fmt.Sprintf("f%d-%d", i, j), Size: 1 << 20, Replicas: 1})
					resp, err := hc.Post(s.APIURL()+"/v1/volumes", "application/json", bytes.NewReader(body))
					if err == nil {
						io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						if resp.StatusCode == 503 {
							shed.Add(1)
						}
					}
				}
			}(i)
		}
	}
	var next atomic.Int64
	var failed atomic.Int64
	b.SetParallelism(16)
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		hcl := &http.Client{Transport: hc.Transport, Timeout: time.Minute}
		for pb.Next() {
			n := next.Add(1) % nodes
			body, _ := json.Marshal(coordapi.HeartbeatRequest{Node: coordapi.NodeID(fmt.Sprintf("n%d", n)), Capacity: 1 << 40, Free: 1 << 40})
			resp, err := hcl.Post(s.APIURL()+"/v1/nodes/heartbeat", "application/json", bytes.NewReader(body))
			if err != nil {
				failed.Add(1)
				continue
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				failed.Add(1)
			}
		}
	})
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "heartbeats/s")
	if flood {
		b.ReportMetric(float64(shed.Load())/elapsed.Seconds(), "shed/s")
	}
	if failed.Load() > 0 {
		b.Errorf("%d heartbeats failed", failed.Load())
	}
	close(stop)
	close(slow.release)
	wg.Wait()
}

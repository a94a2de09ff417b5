package coordsvc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net/http"
	"strconv"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"keel/ctl/coord"
	"keel/ctl/coordapi"
)

// fwdHeader marks a call a follower forwarded to the leader; a member that
// gets one and is not the leader answers 503 rather than forwarding again.
const fwdHeader = "X-Keel-Forwarded-By"

// call is one admitted API call.
type call struct {
	s     *Server
	w     http.ResponseWriter
	r     *http.Request
	ctx   context.Context
	class coordapi.Class
	body  []byte
}

// errForward is the handlers' signal that the call must go to the leader.
var errForward = &coordapi.Error{Code: "forward"}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	hb, na, va, rd := coordapi.ClassHeartbeat, coordapi.ClassNodeAdmin, coordapi.ClassVolumeAdmin, coordapi.ClassRead
	mux.Handle("POST /v1/nodes/register", s.handle(hb, "register", s.register))
	mux.Handle("POST /v1/nodes/heartbeat", s.handle(hb, "heartbeat", s.heartbeat))
	mux.Handle("POST /v1/volumes/{vol}/replica-loss", s.handle(hb, "replica_loss", s.replicaLoss))
	// Recovery is heartbeat class: reads and administration never starve it.
	mux.Handle("POST /v1/volumes/{vol}/sync", s.handle(hb, "sync", s.sync))
	mux.Handle("POST /v1/volumes/{vol}/rejoin", s.handle(hb, "rejoin", s.rejoin))
	mux.Handle("GET /v1/cluster", s.handle(rd, "cluster", s.cluster))
	mux.Handle("GET /v1/nodes", s.handle(rd, "list_nodes", s.listNodes))
	mux.Handle("POST /v1/nodes/{node}/drain", s.handle(na, "drain", s.drain))
	mux.Handle("GET /v1/volumes", s.handle(rd, "list_volumes", s.listVolumes))
	mux.Handle("GET /v1/volumes/{vol}", s.handle(rd, "volume", s.volume))
	mux.Handle("POST /v1/volumes", s.handle(va, "create_volume", s.createVolume))
	mux.Handle("DELETE /v1/volumes/{vol}", s.handle(va, "delete_volume", s.deleteVolume))
	mux.Handle("GET /v1/config", s.handle(rd, "config", s.getConfig))
	mux.Handle("PUT /v1/config", s.handle(na, "set_config", s.setConfig))
	mux.Handle("GET /v1/cell", s.handle(rd, "cell", s.cell))
	mux.Handle("POST /v1/cell/join", s.handle(na, "join", s.join))
	mux.Handle("POST /v1/cell/remove", s.handle(na, "remove", s.remove))
	mux.Handle("GET /healthz", s.handle(rd, "healthz", func(*call) (int, any, *coordapi.Error) {
		return http.StatusOK, map[string]string{"status": "ok", "raft": s.raft.State().String()}, nil
	}))
	prom := promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{})
	mux.Handle("GET /metrics", s.admitOnly(rd, prom))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, coordapi.Errorf(coordapi.CodeNotFound, "no such endpoint: %s %s (see the endpoint table in ctl/coordapi)", r.Method, r.URL.Path))
	})
	return mux
}

// handle wraps an endpoint with admission control, the body limit, the
// deadline, forwarding to the leader and metrics.
func (s *Server) handle(class coordapi.Class, op string, fn func(*call) (int, any, *coordapi.Error)) http.Handler {
	lim := s.limits[class]
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		body, aerr := readBody(w, r, lim.MaxBody)
		if aerr != nil {
			s.metrics.calls.WithLabelValues(string(class), "client_error").Inc()
			writeError(w, aerr)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), lim.Deadline)
		defer cancel()
		if !lim.acquire(ctx) {
			s.shed(w, class, lim)
			return
		}
		defer lim.release()
		g := s.metrics.inflight.WithLabelValues(string(class))
		g.Inc()
		defer g.Dec()
		if s.cfg.Inject != nil {
			s.cfg.Inject(ctx, class, op)
		}
		c := &call{s: s, w: w, r: r, ctx: ctx, class: class, body: body}
		status, out, aerr := fn(c)
		defer func() { s.metrics.duration.WithLabelValues(string(class)).Observe(time.Since(start).Seconds()) }()
		if aerr == errForward {
			s.forward(c)
			return
		}
		if aerr == nil && ctx.Err() != nil {
			aerr = deadlineError(ctx)
		}
		if aerr != nil {
			s.metrics.calls.WithLabelValues(string(class), outcome(aerr.Status())).Inc()
			writeError(w, aerr)
			return
		}
		s.metrics.calls.WithLabelValues(string(class), "ok").Inc()
		writeJSON(w, status, out)
	})
}

// admitOnly applies a class's admission to a plain handler.
func (s *Server) admitOnly(class coordapi.Class, h http.Handler) http.Handler {
	lim := s.limits[class]
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), lim.Deadline)
		defer cancel()
		if !lim.acquire(ctx) {
			s.shed(w, class, lim)
			return
		}
		defer lim.release()
		s.metrics.calls.WithLabelValues(string(class), "ok").Inc()
		h.ServeHTTP(w, r.WithContext(ctx))
	})
}

func (s *Server) shed(w http.ResponseWriter, class coordapi.Class, lim *limiter) {
	s.metrics.shed.WithLabelValues(string(class)).Inc()
	s.metrics.calls.WithLabelValues(string(class), "shed").Inc()
	e := coordapi.Errorf(coordapi.CodeOverloaded, "%s calls are at their limit of %d in flight on member %s: retry after %v", class, lim.InFlight, s.cfg.ID, lim.RetryAfter)
	e.RetryAfter = coordapi.Duration(lim.RetryAfter)
	writeError(w, e)
}

func outcome(status int) string {
	switch {
	case status < 400:
		return "ok"
	case status < 500:
		return "client_error"
	}
	return "server_error"
}

func deadlineError(ctx context.Context) *coordapi.Error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return coordapi.Errorf(coordapi.CodeTimeout, "the call's deadline passed before the cell answered; a write may still take effect")
	}
	return coordapi.Errorf(coordapi.CodeTimeout, "the call was cancelled: %v", ctx.Err())
}

// readBody reads at most limit bytes of the request body.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, *coordapi.Error) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		return nil, coordapi.Errorf(coordapi.CodeTooLarge, "request body over the %d-byte limit of this endpoint", limit)
	case err != nil:
		return nil, coordapi.Errorf(coordapi.CodeBadRequest, "reading the request body: %v", err)
	}
	return b, nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, coordapi.Errorf(coordapi.CodeInternal, "encoding the answer: %v", err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

func writeError(w http.ResponseWriter, e *coordapi.Error) {
	if e.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(e.RetryAfter.D().Seconds()))))
	}
	b, _ := json.Marshal(e)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.Status())
	w.Write(append(b, '\n'))
}

func badRequest(err error) *coordapi.Error {
	return &coordapi.Error{Code: coordapi.CodeBadRequest, Message: err.Error()}
}

func notLeader(format string, args ...any) *coordapi.Error {
	e := coordapi.Errorf(coordapi.CodeNotLeader, format, args...)
	e.RetryAfter = coordapi.Duration(time.Second)
	return e
}

// decode reads the body into v; an empty body is an empty object when
// emptyOK.
func (c *call) decode(v any, emptyOK bool) *coordapi.Error {
	if emptyOK && len(bytes.TrimSpace(c.body)) == 0 {
		return nil
	}
	if err := coordapi.Decode(c.body, v); err != nil {
		return badRequest(err)
	}
	return nil
}

// propose commits cmd through raft when this member leads, or asks for
// the call to be forwarded to the leader.
// decodeValid decodes a required body into v and validates it: 400 with the
// reason when either fails.
func (c *call) decodeValid(v interface{ Validate() error }) *coordapi.Error {
	if e := c.decode(v, false); e != nil {
		return e
	}
	if err := v.Validate(); err != nil {
		return badRequest(err)
	}
	return nil
}

func (c *call) propose(cmd coord.Command) (coord.Result, *coordapi.Error) {
	s := c.s
	if e := c.leaderOrForward(); e != nil {
		return coord.Result{}, e
	}
	res, err := s.apply(c.ctx, cmd)
	switch {
	case err == nil:
		return res, res.Err
	case c.ctx.Err() != nil:
		return coord.Result{}, deadlineError(c.ctx)
	case errors.Is(err, errNotLeader):
		return coord.Result{}, notLeader("member %s lost the leadership during the call; a write may still take effect: retry", s.cfg.ID)
	default:
		return coord.Result{}, notLeader("raft: %v", err)
	}
}

// leaderOrForward is nil when this member leads and takes writes;
// otherwise errForward, or 503 when forwarding is not possible.
func (c *call) leaderOrForward() *coordapi.Error {
	s := c.s
	if s.IsLeader() {
		return nil
	}
	if by := c.r.Header.Get(fwdHeader); by != "" {
		return notLeader("member %s is not the leader (forwarded by %s): retry", s.cfg.ID, by)
	}
	if s.raft.State() == raft.Leader {
		return notLeader("member %s was just elected leader and is rebasing leases: retry", s.cfg.ID)
	}
	return errForward
}

// forward sends the call to the leader and relays the answer.
func (s *Server) forward(c *call) {
	s.metrics.forwarded.WithLabelValues(string(c.class)).Inc()
	fail := func(e *coordapi.Error) {
		s.metrics.calls.WithLabelValues(string(c.class), outcome(e.Status())).Inc()
		writeError(c.w, e)
	}
	_, leaderID := s.raft.LeaderWithID()
	if leaderID == "" {
		fail(notLeader("no leader elected in the cell right now: retry"))
		return
	}
	var leaderURL string
	s.fsm.read(func(m *coord.Machine) {
		if cm, ok := m.CellMember(string(leaderID)); ok {
			leaderURL = cm.APIURL
		}
	})
	if leaderURL == "" {
		fail(notLeader("the leader %s has not published its API address yet: retry", leaderID))
		return
	}
	req, err := http.NewRequestWithContext(c.ctx, c.r.Method, leaderURL+c.r.URL.RequestURI(), bytes.NewReader(c.body))
	if err != nil {
		fail(coordapi.Errorf(coordapi.CodeInternal, "forwarding: %v", err))
		return
	}
	req.Header.Set(fwdHeader, s.cfg.ID)
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.fwd.Do(req)
	if err != nil {
		if c.ctx.Err() != nil {
			fail(deadlineError(c.ctx))
		} else {
			fail(notLeader("forwarding to the leader %s at %s: %v", leaderID, leaderURL, err))
		}
		return
	}
	defer resp.Body.Close()
	for _, h := range []string{"Content-Type", "Retry-After"} {
		if v := resp.Header.Get(h); v != "" {
			c.w.Header().Set(h, v)
		}
	}
	s.metrics.calls.WithLabelValues(string(c.class), outcome(resp.StatusCode)).Inc()
	c.w.WriteHeader(resp.StatusCode)
	io.Copy(c.w, io.LimitReader(resp.Body, 256<<20))
}

// --- endpoints ---

func (s *Server) register(c *call) (int, any, *coordapi.Error) {
	var req coordapi.RegisterRequest
	if e := c.decodeValid(&req); e != nil {
		return 0, nil, e
	}
	res, e := c.propose(coord.Command{Op: coord.OpRegister, Register: &req})
	if e != nil {
		return 0, nil, e
	}
	return http.StatusOK, res.Heartbeat, nil
}

func (s *Server) heartbeat(c *call) (int, any, *coordapi.Error) {
	var req coordapi.HeartbeatRequest
	if e := c.decodeValid(&req); e != nil {
		return 0, nil, e
	}
	res, e := c.propose(coord.Command{Op: coord.OpHeartbeat, Heartbeat: &req})
	if e != nil {
		return 0, nil, e
	}
	return http.StatusOK, res.Heartbeat, nil
}

func (s *Server) replicaLoss(c *call) (int, any, *coordapi.Error) {
	var req coordapi.ReplicaLossRequest
	if e := c.decodeValid(&req); e != nil {
		return 0, nil, e
	}
	res, e := c.propose(coord.Command{Op: coord.OpReplicaLoss, ReplicaLoss: &coord.ReplicaLoss{Volume: c.r.PathValue("vol"), ReplicaLossRequest: req}})
	if e != nil {
		return 0, nil, e
	}
	return http.StatusOK, res.Assignment, nil
}

func (s *Server) sync(c *call) (int, any, *coordapi.Error) {
	var req coordapi.SyncRequest
	if e := c.decodeValid(&req); e != nil {
		return 0, nil, e
	}
	res, e := c.propose(coord.Command{Op: coord.OpSync, Sync: &coord.Sync{Volume: c.r.PathValue("vol"), SyncRequest: req}})
	if e != nil {
		return 0, nil, e
	}
	return http.StatusOK, res.Grant, nil
}

func (s *Server) rejoin(c *call) (int, any, *coordapi.Error) {
	var req coordapi.RejoinRequest
	if e := c.decodeValid(&req); e != nil {
		return 0, nil, e
	}
	res, e := c.propose(coord.Command{Op: coord.OpRejoin, Rejoin: &coord.Rejoin{Volume: c.r.PathValue("vol"), RejoinRequest: req}})
	if e != nil {
		return 0, nil, e
	}
	return http.StatusOK, res.Assignment, nil
}

func (s *Server) cluster(c *call) (int, any, *coordapi.Error) {
	var out coordapi.Cluster
	s.fsm.read(func(m *coord.Machine) { out = m.Cluster() })
	return http.StatusOK, out, nil
}

func (s *Server) listNodes(c *call) (int, any, *coordapi.Error) {
	var out coordapi.NodeList
	s.fsm.read(func(m *coord.Machine) { out.Nodes = m.Nodes() })
	return http.StatusOK, out, nil
}

func (s *Server) drain(c *call) (int, any, *coordapi.Error) {
	var req coordapi.DrainRequest
	if e := c.decode(&req, true); e != nil {
		return 0, nil, e
	}
	node := coordapi.NodeID(c.r.PathValue("node"))
	if err := node.Validate(); err != nil {
		return 0, nil, badRequest(err)
	}
	res, e := c.propose(coord.Command{Op: coord.OpDrain, Drain: &coord.Drain{Node: node, Undo: req.Undo}})
	if e != nil {
		return 0, nil, e
	}
	return http.StatusOK, res.Node, nil
}

func (s *Server) listVolumes(c *call) (int, any, *coordapi.Error) {
	var impaired bool
	switch v := c.r.URL.Query().Get("impaired"); v {
	case "", "0", "false":
	case "1", "true":
		impaired = true
	default:
		return 0, nil, coordapi.Errorf(coordapi.CodeBadRequest, "impaired=%q: use impaired=1", v)
	}
	var out coordapi.VolumeList
	s.fsm.read(func(m *coord.Machine) { out.Volumes = m.Volumes(impaired) })
	return http.StatusOK, out, nil
}

func (s *Server) volume(c *call) (int, any, *coordapi.Error) {
	ref := c.r.PathValue("vol")
	var v coordapi.Volume
	var ok bool
	s.fsm.read(func(m *coord.Machine) { v, ok = m.Volume(ref) })
	if !ok {
		return 0, nil, coordapi.Errorf(coordapi.CodeNotFound, "volume %q does not exist (on member %s, which may lag the leader by a moment)", ref, s.cfg.ID)
	}
	return http.StatusOK, v, nil
}

func (s *Server) createVolume(c *call) (int, any, *coordapi.Error) {
	var req coordapi.CreateVolumeRequest
	if e := c.decodeValid(&req); e != nil {
		return 0, nil, e
	}
	res, e := c.propose(coord.Command{Op: coord.OpCreateVolume, CreateVolume: &req})
	if e != nil {
		return 0, nil, e
	}
	return http.StatusCreated, res.Volume, nil
}

func (s *Server) deleteVolume(c *call) (int, any, *coordapi.Error) {
	res, e := c.propose(coord.Command{Op: coord.OpDeleteVolume, DeleteVolume: &coord.VolumeRef{Volume: c.r.PathValue("vol")}})
	if e != nil {
		return 0, nil, e
	}
	return http.StatusOK, res.Volume, nil
}

func (s *Server) getConfig(c *call) (int, any, *coordapi.Error) {
	var cfg coordapi.Config
	s.fsm.read(func(m *coord.Machine) { cfg, _ = m.Config() })
	return http.StatusOK, cfg, nil
}

func (s *Server) setConfig(c *call) (int, any, *coordapi.Error) {
	var cfg coordapi.Config
	if e := c.decode(&cfg, false); e != nil {
		return 0, nil, e
	}
	if err := cfg.Validate(); err != nil {
		return 0, nil, badRequest(err)
	}
	res, e := c.propose(coord.Command{Op: coord.OpConfigure, Configure: &cfg})
	if e != nil {
		return 0, nil, e
	}
	return http.StatusOK, res.Config, nil
}

// CellStatus describes the cell as this member sees it.
func (s *Server) CellStatus() (*coordapi.CellStatus, error) {
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	_, leader := s.raft.LeaderWithID()
	out := &coordapi.CellStatus{ID: s.cfg.ID, State: s.raft.State().String(), Leader: string(leader), Applied: s.raft.AppliedIndex()}
	s.fsm.read(func(m *coord.Machine) {
		for _, srv := range f.Configuration().Servers {
			cm := coordapi.CellMember{ID: string(srv.ID), RaftAddr: string(srv.Address), Voter: srv.Suffrage == raft.Voter}
			if rec, ok := m.CellMember(cm.ID); ok {
				cm.APIURL = rec.APIURL
			}
			out.Members = append(out.Members, cm)
			if srv.ID == leader {
				out.LeaderURL = cm.APIURL
			}
		}
	})
	return out, nil
}

func (s *Server) cell(c *call) (int, any, *coordapi.Error) {
	st, err := s.CellStatus()
	if err != nil {
		return 0, nil, notLeader("reading the raft configuration: %v", err)
	}
	return http.StatusOK, st, nil
}

func (s *Server) join(c *call) (int, any, *coordapi.Error) {
	var req coordapi.JoinRequest
	if e := c.decodeValid(&req); e != nil {
		return 0, nil, e
	}
	if e := c.leaderOrForward(); e != nil {
		return 0, nil, e
	}
	timeout := time.Until(deadlineOf(c.ctx))
	if err := s.raft.AddVoter(raft.ServerID(req.ID), raft.ServerAddress(req.RaftAddr), 0, timeout).Error(); err != nil {
		return 0, nil, notLeader("adding %s at %s: %v", req.ID, req.RaftAddr, err)
	}
	me := coordapi.CellMember{ID: req.ID, RaftAddr: req.RaftAddr, APIURL: req.APIURL, Voter: true}
	if _, e := c.propose(coord.Command{Op: coord.OpSetMember, SetMember: &me}); e != nil {
		return 0, nil, e
	}
	s.log.Info("member joined", "id", req.ID, "raft", req.RaftAddr, "api", req.APIURL)
	return c.statusAfter()
}

func (s *Server) remove(c *call) (int, any, *coordapi.Error) {
	var req coordapi.RemoveRequest
	if e := c.decode(&req, false); e != nil {
		return 0, nil, e
	}
	if err := coordapi.ValidateMemberID(req.ID); err != nil {
		return 0, nil, badRequest(err)
	}
	if e := c.leaderOrForward(); e != nil {
		return 0, nil, e
	}
	if err := s.raft.RemoveServer(raft.ServerID(req.ID), 0, time.Until(deadlineOf(c.ctx))).Error(); err != nil {
		return 0, nil, notLeader("removing %s: %v", req.ID, err)
	}
	if req.ID != s.cfg.ID {
		if _, e := c.propose(coord.Command{Op: coord.OpRemoveMember, RemoveMember: &req}); e != nil {
			return 0, nil, e
		}
	}
	s.log.Info("member removed", "id", req.ID)
	return c.statusAfter()
}

func (c *call) statusAfter() (int, any, *coordapi.Error) {
	st, err := c.s.CellStatus()
	if err != nil {
		return 0, nil, notLeader("reading the raft configuration: %v", err)
	}
	return http.StatusOK, st, nil
}

func deadlineOf(ctx context.Context) time.Time {
	if dl, ok := ctx.Deadline(); ok {
		return dl
	}
	return time.Now().Add(10 * time.Second)
}

package coord_test

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"keel/ctl/coord"
	"keel/ctl/coordapi"
)

// Transcripts: each file in testdata/*.txt is a sequence of cases
//
//	# comment
//	command key=value key=value ...
//	----
//	expected output, one or more lines
//	(a blank line ends the case)
//
// Run with -rewrite to regenerate the expected outputs from the current
// behaviour (then read the diff before committing it).

var rewrite = flag.Bool("rewrite", false, "rewrite transcript expectations with the actual output")

type tcase struct {
	line     int
	cmd      string
	args     []kv
	expected string
}

type kv struct{ k, v string }

func parseTranscript(t *testing.T, path string) (cases []tcase, raw []string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		raw = append(raw, sc.Text())
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < len(raw); i++ {
		l := strings.TrimSpace(raw[i])
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		tc := tcase{line: i + 1}
		fields := strings.Fields(l)
		tc.cmd = fields[0]
		for _, f := range fields[1:] {
			k, v, _ := strings.Cut(f, "=")
			tc.args = append(tc.args, kv{k, v})
		}
		i++
		if i >= len(raw) || strings.TrimSpace(raw[i]) != "----" {
			t.Fatalf("%s:%d: want ---- after the command", path, tc.line)
		}
		var exp []string
		for i+1 < len(raw) && strings.TrimSpace(raw[i+1]) != "" {
			i++
			exp = append(exp, raw[i])
		}
		tc.expected = strings.Join(exp, "\n")
		cases = append(cases, tc)
	}
	return cases, raw
}

// writeTranscript rewrites path with the actual outputs.
func writeTranscript(t *testing.T, path string, raw []string, cases []tcase, actual []string) {
	var b strings.Builder
	ci := 0
	for i := 0; i < len(raw); i++ {
		if ci < len(cases) && i+1 == cases[ci].line {
			b.WriteString(raw[i] + "\n----\n" + actual[ci] + "\n")
			i++ // the ----
			for i+1 < len(raw) && strings.TrimSpace(raw[i+1]) != "" {
				i++
			}
			ci++
			continue
		}
		b.WriteString(raw[i] + "\n")
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestTranscripts(t *testing.T) {
	files, err := filepath.Glob("testdata/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no transcripts: %v", err)
	}
	for _, path := range files {
		t.Run(filepath.Base(path), func(t *testing.T) {
			cases, raw := parseTranscript(t, path)
			d := &driver{t: t, m: coord.New(coordapi.Config{})}
			var actual []string
			for _, tc := range cases {
				d.tc = tc
				out := strings.TrimRight(d.run(tc), "\n")
				if err := d.m.CheckInvariants(); err != nil {
					t.Fatalf("%s:%d: invariants broken after %s: %v", path, tc.line, tc.cmd, err)
				}
				actual = append(actual, out)
				if !*rewrite && out != tc.expected {
					t.Errorf("%s:%d: %s\nwant:\n%s\ngot:\n%s", path, tc.line, tc.cmd, tc.expected, out)
				}
			}
			if *rewrite {
				writeTranscript(t, path, raw, cases, actual)
			}
		})
	}
}

// base is time zero of every transcript; times print as offsets from it.
var base = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func rel(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return "+" + t.Sub(base).String()
}

type driver struct {
	t  *testing.T
	m  *coord.Machine
	tc tcase
}

func (d *driver) fatalf(format string, args ...any) {
	d.t.Helper()
	d.t.Fatalf("line %d (%s): %s", d.tc.line, d.tc.cmd, fmt.Sprintf(format, args...))
}

func (d *driver) arg(k string) (string, bool) {
	for _, a := range d.tc.args {
		if a.k == k {
			return a.v, true
		}
	}
	return "", false
}

func (d *driver) all(k string) []string {
	var out []string
	for _, a := range d.tc.args {
		if a.k == k {
			out = append(out, a.v)
		}
	}
	return out
}

func (d *driver) str(k, def string) string {
	if v, ok := d.arg(k); ok {
		return v
	}
	return def
}

func (d *driver) need(k string) string {
	v, ok := d.arg(k)
	if !ok {
		d.fatalf("missing %s=", k)
	}
	return v
}

func (d *driver) at() time.Time {
	v := d.str("at", "0s")
	dur, err := time.ParseDuration(v)
	if err != nil {
		d.fatalf("at=%s: %v", v, err)
	}
	return base.Add(dur)
}

func (d *driver) size(k, def string) int64 {
	v := d.str(k, def)
	mult := int64(1)
	switch {
	case strings.HasSuffix(v, "T"):
		mult, v = 1<<40, strings.TrimSuffix(v, "T")
	case strings.HasSuffix(v, "G"):
		mult, v = 1<<30, strings.TrimSuffix(v, "G")
	case strings.HasSuffix(v, "M"):
		mult, v = 1<<20, strings.TrimSuffix(v, "M")
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		d.fatalf("%s=%s: %v", k, v, err)
	}
	return n * mult
}

func (d *driver) int(k string, def int) int {
	v, ok := d.arg(k)
	if !ok {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		d.fatalf("%s=%s: %v", k, v, err)
	}
	return n
}

func (d *driver) apply(c coord.Command) coord.Result {
	// Every command goes through the log encoding, as under raft.
	b, err := coord.EncodeCommand(c)
	if err != nil {
		d.fatalf("encode: %v", err)
	}
	c2, err := coord.DecodeCommand(b)
	if err != nil {
		d.fatalf("decode: %v", err)
	}
	return d.m.Apply(c2)
}

func (d *driver) run(tc tcase) string {
	at := d.at()
	switch tc.cmd {
	case "config":
		cfg := coordapi.DefaultConfig()
		if v, ok := d.arg("lease"); ok {
			cfg.Lease.Duration = coordapi.Duration(mustDur(d, v))
		}
		if v, ok := d.arg("interval"); ok {
			cfg.Lease.Interval = coordapi.Duration(mustDur(d, v))
		}
		if v, ok := d.arg("margin"); ok {
			cfg.Lease.Margin = coordapi.Duration(mustDur(d, v))
		}
		if v, ok := d.arg("drift"); ok {
			cfg.Lease.MaxDrift = mustFloat(d, v)
		}
		if v, ok := d.arg("reserve"); ok {
			cfg.ReserveFraction = mustFloat(d, v)
		}
		rc := &cfg.Recovery
		for k, p := range map[string]*coordapi.Duration{"grace": &rc.Grace, "slot_retry": &rc.SlotRetry, "slot_ttl": &rc.SlotTTL, "mf_window": &rc.MassFailureWindow, "mf_grace": &rc.MassFailureGrace} {
			if v, ok := d.arg(k); ok {
				*p = coordapi.Duration(mustDur(d, v))
			}
		}
		for k, p := range map[string]*int{"max_remirrors": &rc.MaxRemirrors, "per_node": &rc.MaxRemirrorsPerNode, "catch_ups": &rc.MaxCatchUpsPerNode, "mf_losses": &rc.MassFailureLosses} {
			if _, ok := d.arg(k); ok {
				*p = d.int(k, 0)
			}
		}
		r := d.apply(coord.Command{Op: coord.OpConfigure, At: at, Configure: &cfg})
		return d.result(r)
	case "register":
		id := d.need("node")
		req := coordapi.RegisterRequest{
			Node:        coordapi.NodeID(id),
			Zone:        d.str("zone", ""),
			PrimaryAddr: d.str("primary", id+":10809"),
			ReplAddr:    d.str("repl", id+":10810"),
			Capacity:    d.size("cap", "100G"),
		}
		req.Free = d.size("free", strconv.FormatInt(req.Capacity, 10))
		return d.result(d.apply(coord.Command{Op: coord.OpRegister, At: at, Register: &req}))
	case "heartbeat":
		id := d.need("node")
		n, ok := d.m.Node(coordapi.NodeID(id))
		req := coordapi.HeartbeatRequest{Node: coordapi.NodeID(id), Capacity: n.Capacity, Free: n.Free}
		if !ok {
			req.Capacity, req.Free = 1<<30, 1<<30
		}
		if _, ok := d.arg("cap"); ok {
			req.Capacity = d.size("cap", "0")
		}
		if _, ok := d.arg("free"); ok {
			req.Free = d.size("free", "0")
		}
		for _, r := range d.all("report") {
			// vol:epoch:seq[:impaired[:reason-words-with-dashes]]
			parts := strings.Split(r, ":")
			if len(parts) < 3 {
				d.fatalf("report=%s: want vol:epoch:seq[:impaired[:reason]]", r)
			}
			e, _ := strconv.ParseUint(parts[1], 10, 64)
			s, _ := strconv.ParseUint(parts[2], 10, 64)
			rep := coordapi.ReplicaReport{Volume: coordapi.VolumeID(parts[0]), Epoch: coordapi.Epoch(e), DurableSeq: coordapi.Seq(s)}
			if len(parts) > 3 {
				rep.Health = coordapi.Health(parts[3])
			}
			if len(parts) > 4 {
				rep.Reason = strings.ReplaceAll(parts[4], "-", " ")
			}
			req.Replicas = append(req.Replicas, rep)
		}
		for _, r := range d.all("sync") {
			// vol:target:kind:done:total:rate, sizes in MiB
			parts := strings.Split(r, ":")
			if len(parts) != 6 {
				d.fatalf("sync=%s: want vol:target:kind:doneMiB:totalMiB:rateMiB", r)
			}
			num := func(s string) int64 { n, _ := strconv.ParseInt(s, 10, 64); return n << 20 }
			found := false
			for i := range req.Replicas {
				if string(req.Replicas[i].Volume) == parts[0] {
					req.Replicas[i].Syncs = append(req.Replicas[i].Syncs, coordapi.SyncReport{Target: coordapi.NodeID(parts[1]), Kind: coordapi.SyncKind(parts[2]), Done: num(parts[3]), Total: num(parts[4]), Rate: num(parts[5])})
					found = true
				}
			}
			if !found {
				d.fatalf("sync=%s: no report= for the volume", r)
			}
		}
		return d.result(d.apply(coord.Command{Op: coord.OpHeartbeat, At: at, Heartbeat: &req}))
	case "create":
		req := coordapi.CreateVolumeRequest{
			Name:      d.need("name"),
			Size:      d.size("size", "10G"),
			Replicas:  d.int("replicas", 2),
			RequestID: d.str("req", ""),
		}
		return d.result(d.apply(coord.Command{Op: coord.OpCreateVolume, At: at, CreateVolume: &req}))
	case "delete":
		return d.result(d.apply(coord.Command{Op: coord.OpDeleteVolume, At: at, DeleteVolume: &coord.VolumeRef{Volume: d.need("vol")}}))
	case "tick":
		return d.result(d.apply(coord.Command{Op: coord.OpTick, At: at}))
	case "rebase":
		return d.result(d.apply(coord.Command{Op: coord.OpRebase, At: at}))
	case "loss":
		e, _ := strconv.ParseUint(d.need("epoch"), 10, 64)
		req := coord.ReplicaLoss{Volume: d.need("vol"), ReplicaLossRequest: coordapi.ReplicaLossRequest{
			Node: coordapi.NodeID(d.need("node")), Epoch: coordapi.Epoch(e), Lost: coordapi.NodeID(d.need("lost")), Reason: d.str("reason", ""),
		}}
		return d.result(d.apply(coord.Command{Op: coord.OpReplicaLoss, At: at, ReplicaLoss: &req}))
	case "sync":
		e, _ := strconv.ParseUint(d.need("epoch"), 10, 64)
		req := coord.Sync{Volume: d.need("vol"), SyncRequest: coordapi.SyncRequest{Node: coordapi.NodeID(d.need("node")), Epoch: coordapi.Epoch(e), Target: coordapi.NodeID(d.need("target"))}}
		return d.result(d.apply(coord.Command{Op: coord.OpSync, At: at, Sync: &req}))
	case "rejoin":
		e, _ := strconv.ParseUint(d.need("epoch"), 10, 64)
		req := coord.Rejoin{Volume: d.need("vol"), RejoinRequest: coordapi.RejoinRequest{Node: coordapi.NodeID(d.need("node")), Epoch: coordapi.Epoch(e), Target: coordapi.NodeID(d.need("target")),
			Kind: coordapi.SyncKind(d.str("kind", "catch_up")), Copied: d.size("copied", "0")}}
		return d.result(d.apply(coord.Command{Op: coord.OpRejoin, At: at, Rejoin: &req}))
	case "members":
		v, ok := d.m.Volume(d.need("vol"))
		if !ok {
			return "no such volume"
		}
		var b strings.Builder
		for _, m := range v.Members {
			fmt.Fprintf(&b, "%s %s live=%v since=%s full=%v", m.Node, m.State, m.Live, rel(m.OutOfSyncSince), m.FullCopy)
			if p := m.Sync; p != nil {
				fmt.Fprintf(&b, " sync=%s %d/%dMiB rate=%dMiB/s eta=%s", p.Kind, p.Done>>20, p.Total>>20, p.Rate>>20, p.ETA)
			}
			b.WriteString("\n")
		}
		return b.String()
	case "cluster":
		c := d.m.Cluster()
		var b strings.Builder
		fmt.Fprintf(&b, "mode=%s since=%s recent_losses=%d remirrors=%d catch_ups=%d quarantined=%s granted=%d refused=%d rejoins=%d placed=%d gone=%d\n",
			c.Mode, rel(c.ModeSince), c.RecentLoss, c.Remirrors, c.CatchUps, gib(c.Quarantined), c.SlotsGranted, c.SlotsRefused, c.Rejoins, c.Placed, c.Gone)
		fmt.Fprintf(&b, "volumes: ok=%d degraded=%d impaired=%d fenced=%d\n", c.ByState[coordapi.StateOK], c.ByState[coordapi.StateDegraded], c.ByState[coordapi.StateImpaired], c.ByState[coordapi.StateFenced])
		for _, a := range c.Alarms {
			b.WriteString("alarm: " + a + "\n")
		}
		return b.String()
	case "drain":
		_, undo := d.arg("undo")
		return d.result(d.apply(coord.Command{Op: coord.OpDrain, At: at, Drain: &coord.Drain{Node: coordapi.NodeID(d.need("node")), Undo: undo}}))
	case "volumes":
		_, imp := d.arg("impaired")
		var b strings.Builder
		vols := d.m.Volumes(imp)
		if len(vols) == 0 {
			return "(none)"
		}
		for _, v := range vols {
			b.WriteString(fmtVolume(v) + "\n")
		}
		return b.String()
	case "nodes":
		var b strings.Builder
		for _, n := range d.m.Nodes() {
			drain := ""
			if n.Draining {
				drain = " draining"
			}
			if n.Quarantined != 0 {
				drain += " quarantined=" + gib(n.Quarantined)
			}
			if n.ReserveUsed != 0 {
				drain += " reserve_used=" + gib(n.ReserveUsed)
			}
			if n.ReserveAlarm != "" {
				drain += " alarm=(" + n.ReserveAlarm + ")"
			}
			fmt.Fprintf(&b, "%s zone=%s %s since=%s lease=%s cap=%s alloc=%s reserve=%s avail=%s primaries=%d replicas=%d%s\n",
				n.ID, zoneOf(n.Zone), n.State, rel(n.Since), rel(n.LeaseExpiry), gib(n.Capacity), gib(n.Allocated), gib(n.Reserve), gib(n.Available), n.Primaries, n.Replicas, drain)
		}
		return b.String()
	case "assign":
		as, ok := d.m.Assignments(coordapi.NodeID(d.need("node")))
		if !ok {
			return "unknown node"
		}
		return fmtAssignments(as)
	}
	d.fatalf("unknown command")
	return ""
}

func mustDur(d *driver, v string) time.Duration {
	x, err := time.ParseDuration(v)
	if err != nil {
		d.fatalf("%v", err)
	}
	return x
}

func mustFloat(d *driver, v string) float64 {
	x, err := strconv.ParseFloat(v, 64)
	if err != nil {
		d.fatalf("%v", err)
	}
	return x
}

func zoneOf(z string) string {
	if z == "" {
		return `""`
	}
	return z
}

func gib(n int64) string {
	return strconv.FormatFloat(float64(n)/(1<<30), 'f', -1, 64) + "G"
}

func (d *driver) result(r coord.Result) string {
	var b strings.Builder
	if r.Err != nil {
		fmt.Fprintf(&b, "error %s (%d): %s", r.Err.Code, r.Err.Status(), r.Err.Message)
		if r.Err.CurrentEpoch != 0 {
			fmt.Fprintf(&b, " [current epoch %d]", r.Err.CurrentEpoch)
		}
		if len(r.Events) != 0 {
			d.fatalf("a refused command emitted events: %v", r.Events)
		}
		return b.String()
	}
	for _, e := range r.Events {
		b.WriteString("event: " + e.String() + "\n")
	}
	if h := r.Heartbeat; h != nil {
		fmt.Fprintf(&b, "lease: node deadline sent+%s, coordinator expiry %s, next heartbeat %s\n",
			h.Lease.NodeDeadline(base).Sub(base), rel(mustNode(d, h.Node).LeaseExpiry), h.NextHeartbeat)
		b.WriteString(fmtAssignments(h.Assignments))
		for _, ig := range h.Ignored {
			fmt.Fprintf(&b, "ignored %s: %s\n", ig.Volume, ig.Reason)
		}
	}
	if v := r.Volume; v != nil {
		b.WriteString(fmtVolume(*v) + "\n")
	}
	if n := r.Node; n != nil {
		fmt.Fprintf(&b, "node %s %s draining=%v primaries=%d replicas=%d\n", n.ID, n.State, n.Draining, n.Primaries, n.Replicas)
	}
	if a := r.Assignment; a != nil {
		b.WriteString(fmtAssignments([]coordapi.Assignment{*a}))
	}
	if g := r.Grant; g != nil {
		if g.Granted {
			fmt.Fprintf(&b, "grant: %s\n", g.Kind)
		} else {
			fmt.Fprintf(&b, "wait %s (%s): %s\n", g.RetryAfter, g.Kind, g.Reason)
		}
	}
	if c := r.Config; c != nil {
		fmt.Fprintf(&b, "config: lease=%s drift=%v margin=%s interval=%s reserve=%v\n", c.Lease.Duration, c.Lease.MaxDrift, c.Lease.Margin, c.Lease.Interval, c.ReserveFraction)
	}
	if b.Len() == 0 {
		return "ok"
	}
	return b.String()
}

func mustNode(d *driver, id coordapi.NodeID) coordapi.Node {
	n, ok := d.m.Node(id)
	if !ok {
		d.fatalf("node %s vanished", id)
	}
	return n
}

func fmtAssignments(as []coordapi.Assignment) string {
	if len(as) == 0 {
		return "assignments: none\n"
	}
	var b strings.Builder
	for _, a := range as {
		sync := "out-of-sync"
		if a.InSync {
			sync = "in-sync"
		}
		var peers []string
		for _, p := range a.Peers {
			s := "out"
			if p.InSync {
				s = "in"
			}
			if !p.InSync {
				s += "," + string(p.State)
				if !p.Live {
					s += ",down"
				}
			}
			peers = append(peers, fmt.Sprintf("%s(%s,%s)", p.Node, p.Role, s))
		}
		sort.Strings(peers)
		prim := string(a.Primary)
		if prim == "" {
			prim = "none"
		}
		fmt.Fprintf(&b, "assign %s %s epoch=%d %s %s primary=%s peers=%s\n", a.Volume, a.Name, a.Epoch, a.Role, sync, prim, strings.Join(peers, ","))
	}
	return b.String()
}

func fmtVolume(v coordapi.Volume) string {
	var mem []string
	for _, m := range v.Members {
		s := m.Node
		flags := ""
		if m.InSync {
			flags += "+"
		} else {
			flags += "-"
		}
		if !m.Live {
			flags += "dead"
		}
		mem = append(mem, string(s)+flags)
	}
	prim := string(v.Primary)
	if prim == "" {
		prim = "none"
	}
	return fmt.Sprintf("%s %s size=%s replicas=%d epoch=%d primary=%s members=%s state=%s since=%s: %s",
		v.ID, v.Name, gib(v.Size), v.Replicas, v.Epoch, prim, strings.Join(mem, ","), v.State, rel(v.Since), v.Reason)
}

// A command without its payload (a caller bug, not a log entry: those are
// checked by DecodeCommand) is refused, not a panic.
func TestApplyWithoutPayload(t *testing.T) {
	m := coord.New(coordapi.Config{})
	for _, op := range []coord.Op{coord.OpConfigure, coord.OpRegister, coord.OpHeartbeat, coord.OpReplicaLoss, coord.OpCreateVolume, coord.OpDeleteVolume, coord.OpDrain, coord.OpSetMember, coord.OpRemoveMember, coord.OpSync, coord.OpRejoin, "bogus"} {
		if r := m.Apply(coord.Command{Op: op, At: base}); r.Err == nil || r.Err.Code != coordapi.CodeBadRequest {
			t.Errorf("%s without payload: %v", op, r.Err)
		}
	}
	if r := m.Apply(coord.Command{Op: coord.OpTick, At: base, Drain: &coord.Drain{Node: "n1"}}); r.Err == nil {
		t.Error("tick with a payload accepted")
	}
}

package attach

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
	"keel/netpath/nbdkernel"
)

// Entry is one line of `keel attach --list`: the recorded state of a
// device, corrected by what the kernel and the process table say now.
type Entry struct {
	State
	// Supervised: the recorded supervisor process is running.
	Supervised bool `json:"supervised"`
	// KernelConfigured is the kernel's NBD_CMD_STATUS "connected" bit;
	// nil when the kernel could not be asked.
	KernelConfigured *bool `json:"kernel_configured,omitempty"`
	// The volume as its coordinator sees it (devices attached with
	// --coord): state (ok, degraded, impaired, fenced) and reason; or
	// CoordError when the coordinator did not answer in time.
	VolumeState  coordapi.VolumeState `json:"volume_state,omitempty"`
	VolumeReason string               `json:"volume_reason,omitempty"`
	CoordError   string               `json:"coord_error,omitempty"`
}

// CoordTimeout bounds how long `keel attach --list` waits for the
// coordinators of all listed devices together.
const CoordTimeout = 3 * time.Second

// volumeGetter reads a volume from the coordinator at coord (one URL or
// several separated by commas).
type volumeGetter func(ctx context.Context, coord, volume string) (*coordapi.Volume, error)

// getVolume asks the coordinator once per member URL, no retries beyond:
// the caller's context bounds it.
func getVolume(ctx context.Context, coord, volume string) (*coordapi.Volume, error) {
	var urls []string
	for _, u := range strings.Split(coord, ",") {
		if u = strings.TrimSpace(u); u != "" {
			urls = append(urls, u)
		}
	}
	c, err := coordclient.New(coordclient.Config{URLs: urls, Attempts: len(urls), AttemptTimeout: CoordTimeout})
	if err != nil {
		return nil, err
	}
	return c.Volume(ctx, volume)
}

// addCoordState fills in each coordinator-attached entry's volume state,
// all within ctx (bounded by the caller).
func addCoordState(ctx context.Context, es []Entry, get volumeGetter) {
	for i := range es {
		e := &es[i]
		if e.Coord == "" || e.Volume == "" {
			continue
		}
		v, err := get(ctx, e.Coord, e.Volume)
		if err != nil {
			e.CoordError = fmt.Sprintf("coordinator %s not reachable: %v", e.Coord, err)
			continue
		}
		e.VolumeState, e.VolumeReason = v.State, v.Reason
	}
}

// entries merges the state files of dir with the kernel's device list
// (status, nil when unavailable) and the process table. Devices the
// kernel has configured without a state file are listed too, from sysfs.
func entries(dir string, status []nbdkernel.DeviceStatus, sysBlock string) ([]Entry, []error) {
	sts, errs := readStates(dir)
	configured := map[int]bool{}
	for _, d := range status {
		configured[d.Index] = d.Connected
	}
	seen := map[int]bool{}
	var out []Entry
	for _, st := range sts {
		seen[st.Index] = true
		e := Entry{State: st, Supervised: pidAlive(st.PID)}
		if status != nil {
			c := configured[st.Index]
			e.KernelConfigured = &c
		}
		switch {
		case e.KernelConfigured != nil && !*e.KernelConfigured:
			e.Why = fmt.Sprintf("the kernel has no connection configured for %s (was %s: %s); a stale record: keel detach %s", st.Device, st.Phase, st.Why, st.Device)
			e.Phase = "detached"
		case !e.Supervised && st.Phase != PhaseUnsupervised:
			e.Why = fmt.Sprintf("supervisor pid %d is gone (last recorded %s: %s); nobody reconnects this device", st.PID, st.Phase, st.Why)
			e.Phase = PhaseUnsupervised
		}
		out = append(out, e)
	}
	for _, d := range status {
		if !d.Connected || seen[d.Index] {
			continue
		}
		name := fmt.Sprintf("nbd%d", d.Index)
		backend, _ := os.ReadFile(filepath.Join(sysBlock, name, "backend"))
		c := true
		e := Entry{State: State{
			Device:  "/dev/" + name,
			Index:   d.Index,
			Backend: strings.TrimSpace(string(backend)),
			Phase:   PhaseUnsupervised,
			Why:     "attached without a keel attach record (another tool, or the record was removed)",
		}, KernelConfigured: &c}
		if pid, err := readInt(filepath.Join(sysBlock, name, "pid")); err == nil {
			e.PID = int(pid)
		}
		if sz, err := readInt(filepath.Join(sysBlock, name, "size")); err == nil {
			e.Size = uint64(sz) * 512
		}
		out = append(out, e)
	}
	return out, errs
}

// list prints the entries as a table or JSON.
func list(ctx context.Context, w io.Writer, dir, output string) error {
	if output != "table" && output != "json" {
		return fmt.Errorf("--output %q: want table or json", output)
	}
	var status []nbdkernel.DeviceStatus
	var kernelErr error
	if nl, err := nbdkernel.OpenNetlink(ctx); err != nil {
		kernelErr = err
	} else {
		status, kernelErr = nl.Status(ctx, -1)
		nl.Close()
		if status == nil && kernelErr == nil {
			status = []nbdkernel.DeviceStatus{}
		}
	}
	es, errs := entries(dir, status, "/sys/block")
	cctx, cancel := context.WithTimeout(ctx, CoordTimeout)
	addCoordState(cctx, es, getVolume)
	cancel()
	if output == "json" {
		if es == nil {
			es = []Entry{}
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(es)
	}
	writeTable(w, es)
	if kernelErr != nil {
		fmt.Fprintf(w, "(kernel not asked: %v)\n", kernelErr)
	}
	for _, err := range errs {
		fmt.Fprintf(w, "(unreadable record: %v)\n", err)
	}
	return nil
}

func writeTable(w io.Writer, es []Entry) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tSTATE\tSINCE\tSERVER\tEXPORT\tVOLUME\tNODE\tEPOCH\tCONNS\tSIZE\tVOLUME-STATE\tWHY")
	for _, e := range es {
		dash := func(s string) string {
			if s == "" {
				return "-"
			}
			return s
		}
		epoch := "-"
		if e.Epoch != 0 {
			epoch = strconv.FormatUint(e.Epoch, 10)
		}
		since := "-"
		if !e.Since.IsZero() {
			since = e.Since.Local().Format(time.DateTime)
		}
		conns := "-"
		if e.Connections > 0 {
			conns = fmt.Sprintf("%d/%d", e.Live, e.Connections)
		}
		vs, why := "-", e.Why
		switch {
		case e.VolumeState != "":
			vs = string(e.VolumeState)
			if e.VolumeState != coordapi.StateOK {
				why = joinWhy(why, "coordinator: "+e.VolumeReason)
			}
		case e.CoordError != "":
			vs = "unknown"
			why = joinWhy(why, e.CoordError)
		case e.Coord == "" && e.Volume == "" && e.Addr != "":
			vs = "no-coord" // attached with --addr: no coordinator to ask
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			e.Device, e.Phase, since, dash(e.Addr), dash(e.Export), dash(e.Volume), dash(e.Node), epoch, conns, humanBytes(e.Size), vs, dash(why))
	}
	tw.Flush()
}

func joinWhy(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

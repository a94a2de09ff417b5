package attach

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"keel/ctl/coordapi"
)

// --list shows the coordinator's view of each coordinator-attached
// volume, says when the coordinator cannot be reached, and that an --addr
// device has none.
func TestListCoordinatorState(t *testing.T) {
	es := []Entry{
		{State: State{Device: "/dev/nbd0", Volume: "data", Coord: "http://c1", Addr: "10.0.0.1:10809", Phase: PhaseConnected}},
		{State: State{Device: "/dev/nbd1", Volume: "logs", Coord: "http://c2", Addr: "10.0.0.2:10809", Phase: PhaseConnected}},
		{State: State{Device: "/dev/nbd2", Addr: "127.0.0.1:10809", Export: "v", Phase: PhaseConnected}},
		{State: State{Device: "/dev/nbd3", Volume: "ok", Coord: "http://c1", Addr: "10.0.0.1:10809", Phase: PhaseConnected}},
	}
	get := func(ctx context.Context, coord, volume string) (*coordapi.Volume, error) {
		switch {
		case coord == "http://c2":
			return nil, errors.New("connection refused")
		case volume == "data":
			return &coordapi.Volume{Name: "data", State: coordapi.StateImpaired, Reason: "no primary: waiting for one of n1, n2 to return"}, nil
		}
		return &coordapi.Volume{Name: volume, State: coordapi.StateOK, Reason: "all 2 replica(s) in sync"}, nil
	}
	addCoordState(context.Background(), es, get)
	if es[0].VolumeState != coordapi.StateImpaired || es[1].CoordError == "" || es[2].VolumeState != "" || es[3].VolumeState != coordapi.StateOK {
		t.Fatalf("entries: %+v", es)
	}
	var b bytes.Buffer
	writeTable(&b, es)
	out := b.String()
	for _, want := range []string{"VOLUME-STATE", "impaired", "coordinator: no primary: waiting for one of n1, n2 to return",
		"unknown", "coordinator http://c2 not reachable: connection refused", "no-coord"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "coordinator: all 2") {
		t.Errorf("an ok volume's reason cluttering the table:\n%s", out)
	}
}

// getVolume against a live endpoint, and against one that never answers:
// the caller's deadline bounds it.
func TestGetVolumeBounded(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/volumes/data" {
			w.WriteHeader(404)
			return
		}
		json.NewEncoder(w).Encode(coordapi.Volume{Name: "data", State: coordapi.StateDegraded, Reason: "1 of 2 replicas live and in sync (n2 catching up)"})
	}))
	defer srv.Close()
	v, err := getVolume(context.Background(), srv.URL, "data")
	if err != nil || v.State != coordapi.StateDegraded {
		t.Fatalf("live coordinator: %+v %v", v, err)
	}
	hang := make(chan struct{})
	stuck := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-hang:
		case <-r.Context().Done():
		}
	}))
	defer stuck.Close()
	defer close(hang)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	es := []Entry{{State: State{Device: "/dev/nbd0", Volume: "data", Coord: stuck.URL + "," + stuck.URL}}}
	addCoordState(ctx, es, getVolume)
	if es[0].CoordError == "" || ctx.Err() == nil {
		t.Fatalf("a stuck coordinator: %+v (ctx %v)", es[0], ctx.Err())
	}
}

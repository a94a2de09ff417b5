package nbd_test

import (
	"context"
	"testing"
	"time"

	"keel/netpath/nbd"
	"keel/netpath/nbdproto"
)

// TestAddRemoveExport: a server may start empty; an added export is served
// to new connections; removing it ends its connections (after answering
// what they had sent) while another export's connection goes on.
func TestAddRemoveExport(t *testing.T) {
	f := start(t, nbd.Config{})
	c := f.dial()
	c.greet(nbdproto.FlagCFixedNewstyle | nbdproto.FlagCNoZeroes)
	rs := c.option(nbdproto.OptGo, nbdproto.AppendInfoRequest(nil, nbdproto.InfoRequest{Name: ""}))
	if final(rs) != nbdproto.RepErrUnknown {
		t.Fatalf("GO on an empty server: %v", final(rs))
	}

	a, b := newMem(1<<20), newMem(1<<20)
	if err := f.srv.AddExport(nbd.Export{Name: "a", Backend: a}); err != nil {
		t.Fatal(err)
	}
	if err := f.srv.AddExport(nbd.Export{Name: "a", Backend: b}); err == nil {
		t.Fatal("a second export named a was accepted")
	}
	if err := f.srv.AddExport(nbd.Export{Name: "b", Backend: b}); err != nil {
		t.Fatal(err)
	}
	ca, cb := f.open("a", false), f.open("b", false)
	if r := ca.do(nbdproto.CmdWrite, 0, 0, 4096, pattern(4096, 1)); r.errno != 0 {
		t.Fatalf("write to a: %v", r.errno)
	}
	if err := f.srv.RemoveExport(context.Background(), "a"); err != nil {
		t.Fatal(err)
	}
	ca.expectClosed()
	if r := cb.do(nbdproto.CmdRead, 0, 0, 4096, nil); r.errno != 0 {
		t.Fatalf("read from b after removing a: %v", r.errno)
	}
	// New connections no longer find a; the default (empty name) is b now.
	c2 := f.dial()
	c2.greet(nbdproto.FlagCFixedNewstyle | nbdproto.FlagCNoZeroes)
	if r := final(c2.option(nbdproto.OptInfo, nbdproto.AppendInfoRequest(nil, nbdproto.InfoRequest{Name: "a"}))); r != nbdproto.RepErrUnknown {
		t.Fatalf("INFO a after removal: %v", r)
	}
	c2.goExport("", nil)
	mustEqual(t, a.at(0, 4096), pattern(4096, 1), "write acknowledged before the removal")
	// Removing what is not served is fine.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := f.srv.RemoveExport(ctx, "nope"); err != nil {
		t.Fatal(err)
	}
}

package main

import (
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"
)

// layers is DESIGN.md's import table: a keel package may import only keel
// packages of a strictly lower layer. A package missing from the table fails
// the test: place it in a layer first.
var layers = []struct {
	name string
	pkgs []string // a trailing "/..." matches the directory and everything under it
}{
	{"leaf", []string{"keel/datapath/iobuf", "keel/ctl/coordapi"}},
	{"mechanism", []string{
		"keel/datapath/dio", "keel/datapath/layout", "keel/datapath/cache",
		"keel/netpath/sock", "keel/netpath/nbdproto", "keel/netpath/replproto",
		"keel/netpath/nbdkernel", "keel/ctl/coord", "keel/ctl/coordclient",
	}},
	{"service", []string{
		"keel/datapath/volume", "keel/netpath/nbd", "keel/netpath/repl",
		"keel/ctl/coordsvc", "keel/ctl/cli", "keel/ctl/attach",
	}},
	{"wiring", []string{"keel/node/..."}},
	{"harness", []string{"keel/bench/..."}},
	{"binary", []string{"keel"}},
}

func layerOf(pkg string) (int, bool) {
	for i, l := range layers {
		for _, p := range l.pkgs {
			if p == pkg || strings.HasSuffix(p, "/...") && (pkg == strings.TrimSuffix(p, "/...") || strings.HasPrefix(pkg, strings.TrimSuffix(p, "..."))) {
				return i, true
			}
		}
	}
	return 0, false
}

type listedPackage struct {
	ImportPath string
	Doc        string
	Imports    []string
	Name       string
}

func listPackages(t *testing.T) []listedPackage {
	t.Helper()
	out, err := exec.Command("go", "list", "-json", "./...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []listedPackage
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p listedPackage
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("decoding go list output: %v", err)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

// TestImportDirection enforces DESIGN.md's layering: imports point one way,
// and nothing but the keel binary imports bench.
func TestImportDirection(t *testing.T) {
	for _, p := range listPackages(t) {
		from, ok := layerOf(p.ImportPath)
		if !ok {
			t.Errorf("%s is in no layer of deps_test.go: add it to the layer DESIGN.md gives it", p.ImportPath)
			continue
		}
		for _, imp := range p.Imports {
			if imp != "keel" && !strings.HasPrefix(imp, "keel/") {
				continue
			}
			to, ok := layerOf(imp)
			if !ok {
				continue // reported when that package itself is visited
			}
			sameTree := layers[from].name == layers[to].name && (layers[from].name == "wiring" || layers[from].name == "harness")
			if to >= from && !sameTree {
				t.Errorf("%s (%s) imports %s (%s): imports must point to a lower layer", p.ImportPath, layers[from].name, imp, layers[to].name)
			}
		}
	}
}

// TestPackageDocs: every package says what it owns.
func TestPackageDocs(t *testing.T) {
	for _, p := range listPackages(t) {
		if p.Name != "main" && strings.TrimSpace(p.Doc) == "" {
			t.Errorf("%s has no package doc: say what the package owns", p.ImportPath)
		}
	}
}

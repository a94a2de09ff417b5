package fio

import (
	"fmt"
	"os"
	"slices"
	"strings"
)

// KeelVariant is one more keel build measured as a target of its own, so
// that two builds (or one build under two environments) meet the same
// machine state in one run: `--keel-variant NAME=/path/to/keel[:ENV=VAL,...]`.
// It is started like the keel target, with Env added to its environment,
// and labelled Name in the table, the JSON and the chart. A variant is not
// a peer: no target's "best peer" is a keel variant, and issue 7's checks
// judge the target called keel only.
type KeelVariant struct {
	Name string   // the target's label
	Bin  string   // the keel binary
	Env  []string // KEY=VALUE pairs added to the server's environment
}

func (v KeelVariant) String() string {
	s := v.Name + "=" + v.Bin
	if len(v.Env) > 0 {
		s += ":" + strings.Join(v.Env, ",")
	}
	return s
}

// ParseKeelVariant reads NAME=PATH[:KEY=VAL,KEY=VAL...]. NAME is letters,
// digits, '.', '_' and '-'; PATH is everything up to the first ':' (a path
// with a colon cannot be given); a value cannot hold a comma.
func ParseKeelVariant(s string) (KeelVariant, error) {
	bad := func(format string, a ...any) (KeelVariant, error) {
		return KeelVariant{}, fmt.Errorf("--keel-variant %q: %s (want NAME=/path/to/keel[:ENV=VAL,...])", s, fmt.Sprintf(format, a...))
	}
	name, rest, ok := strings.Cut(s, "=")
	if !ok {
		return bad("no '=' after the name")
	}
	if name == "" {
		return bad("empty name")
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return bad("name %q: only letters, digits, '.', '_' and '-'", name)
		}
	}
	if _, known := targetByName(name); known {
		return bad("name %q is a target's own name; choose another", name)
	}
	bin, envs, hasEnv := strings.Cut(rest, ":")
	if bin == "" {
		return bad("empty binary path")
	}
	v := KeelVariant{Name: name, Bin: bin}
	if hasEnv {
		for kv := range strings.SplitSeq(envs, ",") {
			k, _, ok := strings.Cut(kv, "=")
			if !ok || !envName(k) {
				return bad("environment item %q is not KEY=VALUE with KEY of letters, digits and '_'", kv)
			}
			v.Env = append(v.Env, kv)
		}
	}
	return v, nil
}

func envName(k string) bool {
	if k == "" || k[0] >= '0' && k[0] <= '9' {
		return false
	}
	for _, c := range k {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// variantTarget is the keel target run from v's binary with v's
// environment, under v's name.
func variantTarget(v KeelVariant) Target {
	t, _ := targetByName("keel")
	keelLaunch := t.launch
	t.Name = v.Name
	t.Note = "keel variant " + v.String() + ": " + t.Note
	t.variant = true
	t.program = v.Bin
	env := slices.Clone(v.Env)
	t.launch = func(l launchSpec) launch {
		x := keelLaunch(l)
		x.env = env
		return x
	}
	return t
}

// addVariants puts the variants' targets into run, right after keel (or
// first when keel is not run), in the order given. names are the targets
// asked for by name. A name used twice or a binary that is not an
// executable file is an error: variants are asked for explicitly. Without
// fio's nbd engine they are skipped like every server.
func addVariants(run []Target, names []string, variants []KeelVariant, fioNBD bool) ([]Target, []Skip, error) {
	if len(variants) == 0 {
		return run, nil, nil
	}
	seen := map[string]bool{}
	for _, n := range names {
		seen[n] = true
	}
	var add []Target
	var skips []Skip
	for _, v := range variants {
		if seen[v.Name] {
			return nil, nil, fmt.Errorf("keel variant %q: name given twice", v.Name)
		}
		seen[v.Name] = true
		if fi, err := os.Stat(v.Bin); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return nil, nil, fmt.Errorf("keel variant %s: %s is not an executable file", v.Name, v.Bin)
		}
		if !fioNBD {
			skips = append(skips, Skip{v.Name, "fio has no nbd engine (fio --enghelp=nbd fails); " + installHint})
			continue
		}
		add = append(add, variantTarget(v))
	}
	at := 0
	if i := slices.IndexFunc(run, func(t Target) bool { return t.Name == "keel" }); i >= 0 {
		at = i + 1
	}
	return slices.Insert(slices.Clip(run), at, add...), skips, nil
}

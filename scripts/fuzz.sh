#!/usr/bin/env bash
# fuzz.sh SECONDS: run every Fuzz target in the module for SECONDS each.
# `make test` runs it briefly; `make fuzz` for longer.
set -euo pipefail
secs=${1:-5}
cd "$(dirname "$0")/.."
for pkg in $(go list ./...); do
	for f in $(go test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
		echo "fuzz: $pkg $f for ${secs}s"
		ok=0
		for try in 1 2; do
			if go test -run '^$' -fuzz "^${f}\$" -fuzztime "${secs}s" "$pkg" >/tmp/keel-fuzz.$$.log 2>&1; then
				ok=1
				break
			fi
			# The fuzzing engine gives up with "context deadline exceeded"
			# and no input when a worker does not answer in time (a
			# stalled machine): that is not a finding, so try once more.
			# A real failure writes its input ("Failing input written to").
			if grep -q 'Failing input written to' /tmp/keel-fuzz.$$.log || ! grep -q 'context deadline exceeded' /tmp/keel-fuzz.$$.log; then
				break
			fi
			echo "fuzz: $pkg $f: the engine timed out without a failing input; trying once more"
		done
		[ "$ok" = 1 ] || {
			cat /tmp/keel-fuzz.$$.log
			rm -f /tmp/keel-fuzz.$$.log
			echo "fuzz: $pkg $f FAILED (the failing input is under $(go list -f '{{.Dir}}' "$pkg")/testdata/fuzz/$f)"
			exit 1
		}
	done
done
rm -f /tmp/keel-fuzz.$$.log

#!/usr/bin/env bash
# fuzz.sh SECONDS: run every Fuzz target in the module for SECONDS each.
# `make test` runs it briefly; `make fuzz` for longer.
set -euo pipefail
secs=${1:-5}
cd "$(dirname "$0")/.."
for pkg in $(go list ./...); do
	for f in $(go test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
		echo "fuzz: $pkg $f for ${secs}s"
		go test -run '^$' -fuzz "^${f}\$" -fuzztime "${secs}s" "$pkg" >/tmp/keel-fuzz.$$.log 2>&1 || {
			cat /tmp/keel-fuzz.$$.log
			rm -f /tmp/keel-fuzz.$$.log
			echo "fuzz: $pkg $f FAILED (the failing input is under $(go list -f '{{.Dir}}' "$pkg")/testdata/fuzz/$f)"
			exit 1
		}
	done
done
rm -f /tmp/keel-fuzz.$$.log

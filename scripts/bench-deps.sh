#!/bin/sh
# bench-deps.sh installs what `keel bench fio` runs: fio (with its nbd
# engine), and the NBD servers keel is compared with. Idempotent: packages
# already installed are left alone, and apt is not touched when nothing is
# missing. Debian/Ubuntu only; run as root (or with sudo available).
set -eu

pkgs="fio nbdkit qemu-utils nbd-server libnbd-bin"

missing=""
for p in $pkgs; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing="$missing $p"
	fi
done

if [ -z "$missing" ]; then
	echo "bench-deps: all present ($pkgs)"
	exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
	echo "bench-deps: missing:$missing; no apt-get here: install them with your package manager" >&2
	exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
	sudo="sudo"
fi

echo "bench-deps: installing$missing"
$sudo apt-get update -qq
# nbd-server's package asks debconf questions; take the defaults.
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing

# fio must have been built with libnbd for the nbd engine.
if ! fio --enghelp=nbd >/dev/null 2>&1; then
	echo "bench-deps: this fio has no nbd engine; keel bench fio can then only run the raw target" >&2
	exit 1
fi
echo "bench-deps: done"

#!/usr/bin/env bash
# test-deps.sh: install what keel's tests need, only when it is missing.
# Idempotent; needs root (or sudo) for apt-get. Debian packages only.
set -euo pipefail
need=()
want() { # want COMMAND PACKAGE
	command -v "$1" >/dev/null 2>&1 || need+=("$2")
}
want fio fio
want qemu-io qemu-utils
want qemu-img qemu-utils
want nbdinfo libnbd-bin
want nbdcopy libnbd-bin
want nbdsh libnbd-bin
want nbdkit nbdkit
want nbd-server nbd-server
want losetup mount
want mkfs.ext4 e2fsprogs
want ip iproute2
want tc iproute2
want nft nftables
want qemu-system-x86_64 qemu-system-x86
want cpio cpio
[ -x /bin/busybox ] || need+=(busybox-static)
dpkg-query -W -f='${Status}' python3-libnbd 2>/dev/null | grep -q 'install ok installed' || need+=(python3-libnbd)
if [ ${#need[@]} -eq 0 ]; then
	exit 0
fi
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
echo "test-deps: installing ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"

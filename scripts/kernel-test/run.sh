#!/usr/bin/env bash
# run.sh: keel against the Linux kernel NBD client, end to end, in a qemu guest.
#
# The build machine's kernel has no NBD driver, so this boots Debian's kernel
# (the package linux-image-amd64 depends on) under qemu TCG with an initramfs
# holding busybox, the static keel binary, mkfs.ext4/e2fsck with their
# libraries, and the kernel modules nbd, ext4 and virtio. The guest runs the
# steps of guest.sh against keel on 127.0.0.1 and reports one line per check:
#
#   KEEL-TEST step<N> PASS|FAIL|SKIP: <what was checked>
#   KEEL-TEST-END
#
# Usage: scripts/kernel-test/run.sh            (make test-kernel)
# Environment:
#   KEEL_BIN            keel binary to test (default: build the repo root, static)
#   KEEL_KERNEL_STEPS   steps to run, e.g. "1 2" (default "0 1 2 3 4"; step 0 runs
#                       netpath/nbdkernel's kernel tests, 1-4 are issue 5's steps)
#   KEEL_KERNEL_TIMEOUT seconds the whole guest run may take (default 1200)
#   XDG_CACHE_HOME      the kernel package is cached under $XDG_CACHE_HOME/keel/kernel
#                       (default: <repo>/.cache/kernel, git-ignored)
# Artifacts: <repo>/.cache/kernel-test/serial.log (the last run), and
# serial-step<N>.log for each failed step, whose paths are printed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
if [ -n "${XDG_CACHE_HOME:-}" ]; then
	cache=$XDG_CACHE_HOME/keel/kernel
else
	cache=$repo/.cache/kernel
fi
work=$repo/.cache/kernel-test
steps=${KEEL_KERNEL_STEPS:-0 1 2 3 4}
limit=${KEEL_KERNEL_TIMEOUT:-1200}
mkdir -p "$cache" "$work"

say() { echo "kernel-test: $*"; }
die() { echo "kernel-test: $*" >&2; exit 1; }

# --- tools -------------------------------------------------------------------
need=()
for t in qemu-system-x86_64:qemu-system-x86 cpio:cpio mke2fs:e2fsprogs e2fsck:e2fsprogs xz:xz-utils dpkg-deb:dpkg apt-get:apt; do
	command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
done
busybox=/bin/busybox
if [ ! -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
	need+=(busybox-static)
fi
if [ ${#need[@]} -gt 0 ]; then
	say "installing ${need[*]}"
	SUDO=""
	[ "$(id -u)" -eq 0 ] || SUDO=sudo
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- kernel ------------------------------------------------------------------
# The versioned package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true)
if [ -z "$pkg" ] && ! ls "$cache"/linux-image-*.deb >/dev/null 2>&1; then
	# A fresh machine may have no package lists yet.
	say "apt-get update (no package lists to resolve linux-image-amd64)"
	SUDO=""
	[ "$(id -u)" -eq 0 ] || SUDO=sudo
	$SUDO apt-get update -qq || true
	pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true)
fi
deb=""
if [ -n "$pkg" ]; then
	deb=$(ls -t "$cache/${pkg}"_*.deb 2>/dev/null | head -1 || true)
	if [ -z "$deb" ]; then
		say "downloading $pkg"
		(cd "$cache" && apt-get download "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
		deb=$(ls -t "$cache/${pkg}"_*.deb 2>/dev/null | head -1 || true)
	fi
fi
if [ -z "$deb" ]; then
	deb=$(ls -t "$cache"/linux-image-*.deb 2>/dev/null | head -1 || true)
	[ -n "$deb" ] || die "no kernel package: apt-get download of linux-image-amd64's kernel failed and nothing is cached in $cache"
	say "apt could not resolve linux-image-amd64; using the cached $(basename "$deb")"
fi
tree=$cache/$(basename "$deb" .deb)
if [ ! -e "$tree/.done" ]; then
	say "unpacking $(basename "$deb")"
	rm -rf "$tree" && mkdir -p "$tree"
	dpkg-deb -x "$deb" "$tree/x"
	kver=$(ls "$tree/x/lib/modules" | head -1)
	# The uncompressed vmlinux boots faster than the bzImage: find the
	# compressed payload (xz here, or gzip/zstd) and decompress it, as the
	# kernel's scripts/extract-vmlinux does.
	vmlinuz=$tree/x/boot/vmlinuz-$kver
	for fmt in 'xz:\xfd7zXZ\x00' 'gzip:\x1f\x8b\x08' 'zstd:\x28\xb5\x2f\xfd'; do
		name=${fmt%%:*} magic=${fmt#*:}
		for off in $(LC_ALL=C grep -obUaP "$magic" "$vmlinuz" | cut -d: -f1 | head -5); do
			case $name in
			xz) tail -c +$((off + 1)) "$vmlinuz" | xz -dc --single-stream >"$tree/vmlinux" 2>/dev/null || true ;;
			gzip) tail -c +$((off + 1)) "$vmlinuz" | gzip -dc >"$tree/vmlinux" 2>/dev/null || true ;;
			zstd) tail -c +$((off + 1)) "$vmlinuz" | zstd -dc >"$tree/vmlinux" 2>/dev/null || true ;;
			esac
			if [ "$(head -c 4 "$tree/vmlinux" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; then
				break 2
			fi
		done
	done
	if [ "$(head -c 4 "$tree/vmlinux" 2>/dev/null | od -An -c | tr -d ' ')" != '177ELF' ]; then
		say "could not extract vmlinux; booting the bzImage"
		cp "$vmlinuz" "$tree/vmlinux"
	fi
	# The package ships no modules.dep: make one to resolve dependencies.
	"$busybox" depmod -b "$tree/x" "$kver"
	echo "$kver" >"$tree/.done"
fi
kver=$(cat "$tree/.done")
kernel=$tree/vmlinux
say "kernel $kver ($(basename "$deb"))"

# --- keel ----------------------------------------------------------------------
if [ -n "${KEEL_BIN:-}" ]; then
	keel=$KEEL_BIN
else
	keel=$work/keel
	say "building keel (static)"
	(cd "$repo" && CGO_ENABLED=0 go build -o "$keel" .)
fi
if ldd "$keel" >/dev/null 2>&1; then
	die "$keel is dynamically linked; build it with CGO_ENABLED=0"
fi
# The kernel tests of netpath/nbdkernel (they skip on the host) run in the
# guest as step 0.
say "building the nbdkernel test binary (static)"
(cd "$repo" && CGO_ENABLED=0 go test -c -o "$work/nbdkernel.test" ./netpath/nbdkernel)

# --- initramfs -----------------------------------------------------------------
root=$work/root
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,vol,lib,lib64,usr/lib}
cp "$busybox" "$root/bin/busybox"
for a in $("$busybox" --list); do
	[ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
done
ln -sf ../bin/busybox "$root/sbin/modprobe" # the kernel's module loader helper
cp "$keel" "$root/bin/keel"
cp "$work/nbdkernel.test" "$root/bin/nbdkernel.test"
# e2fsprogs with the libraries they need (mkfs.ext4 from busybox cannot make
# ext4 with a journal; fsck must be the real one).
for b in mke2fs e2fsck; do
	src=$(command -v "$b")
	rm -f "$root/bin/$b" # a busybox applet link: cp would write through it
	cp "$src" "$root/bin/$b"
	for lib in $(ldd "$src" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}'); do
		mkdir -p "$root$(dirname "$lib")"
		cp -L "$lib" "$root$lib"
	done
done
ln -sf mke2fs "$root/bin/mkfs.ext4"
ln -sf e2fsck "$root/bin/fsck.ext4"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
# Modules: those the guest loads, with their dependencies, from modules.dep.
mods=$tree/x/lib/modules/$kver
declare -A want=()
resolve() {
	local m=$1 line dep
	line=$(grep -E "(^|/)$m\.ko(\.[a-z]+)?:" "$mods/modules.dep" | head -1) || die "module $m not in $kver"
	[ -n "${want[${line%%:*}]:-}" ] && return 0
	want[${line%%:*}]=1
	for dep in ${line#*:}; do
		dep=$(basename "$dep")
		resolve "${dep%%.ko*}"
	done
}
for m in nbd ext4 crc32c_generic virtio_blk virtio_pci; do
	resolve "$m"
done
for f in "${!want[@]}"; do
	mkdir -p "$root/lib/modules/$kver/$(dirname "$f")"
	cp "$mods/$f" "$root/lib/modules/$kver/$f"
done
cp "$mods/modules.order" "$mods/modules.builtin" "$root/lib/modules/$kver/" 2>/dev/null || true
"$busybox" depmod -b "$root" "$kver"
cp "$here/init" "$root/init"
cp "$here/guest.sh" "$root/guest.sh"
chmod +x "$root/init" "$root/guest.sh"
(cd "$root" && find . | cpio -o -H newc --quiet) >"$work/initrd.cpio"
say "initramfs $(du -h "$work/initrd.cpio" | cut -f1) (keel $(du -h "$keel" | cut -f1))"

# --- disk ------------------------------------------------------------------------
# A virtio disk with ext4 for keel's volume files: the initramfs is tmpfs,
# which has no O_DIRECT on 6.1.
disk=$work/vol.img
rm -f "$disk"
truncate -s 4G "$disk"
mke2fs -q -F -t ext4 -L keelvol "$disk"

# --- boot --------------------------------------------------------------------------
log=$work/serial.log
rm -f "$work"/serial-step*.log "$work/serial-incomplete.log"
say "booting (steps: $steps; limit ${limit}s; serial log $log)"
start=$(date +%s)
: >"$log"
timeout -k 10 "$limit" qemu-system-x86_64 -M pc -accel tcg -cpu max -m 1024 -smp 2 \
	-nographic -nic none -no-reboot \
	-kernel "$kernel" -initrd "$work/initrd.cpio" \
	-append "console=ttyS0 panic=-1 quiet keel.steps=${steps// /,}" \
	-drive "file=$disk,if=virtio,format=raw,cache=unsafe" \
	</dev/null >"$log" 2>&1 &
qpid=$!
# timeout runs in its own process group: stop it if we are stopped.
trap 'kill "$qpid" 2>/dev/null' EXIT
trap 'kill "$qpid" 2>/dev/null; exit 130' INT TERM
tail -n +1 -f --pid="$qpid" "$log" | grep -a --line-buffered -E '^KEEL-TEST' | sed -u 's/\r$//' || true
set +e
wait "$qpid"
rc=$?
set -e
trap - EXIT INT TERM
elapsed=$(($(date +%s) - start))

# --- verdict -------------------------------------------------------------------------
tr -d '\r' <"$log" >"$log.tmp" && mv "$log.tmp" "$log"
failed=0
for s in $steps; do
	if grep -q "^KEEL-TEST step$s FAIL" "$log"; then
		cp "$log" "$work/serial-step$s.log"
		say "step $s FAILED; serial log kept: $work/serial-step$s.log"
		failed=1
	elif ! grep -qE "^KEEL-TEST step$s (PASS|SKIP)" "$log"; then
		cp "$log" "$work/serial-step$s.log"
		say "step $s reported nothing; serial log kept: $work/serial-step$s.log"
		failed=1
	fi
done
if ! grep -q '^KEEL-TEST-END' "$log"; then
	if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
		say "the guest did not finish within ${limit}s"
	else
		say "the guest stopped before the end (qemu exit $rc)"
	fi
	cp "$log" "$work/serial-incomplete.log"
	say "serial log kept: $work/serial-incomplete.log"
	failed=1
fi
say "kernel $kver, boot and test ${elapsed}s"
if [ "$failed" -ne 0 ]; then
	say "FAILED"
	exit 1
fi
say "passed ($(grep -c '^KEEL-TEST step[0-9]* PASS' "$log") checks passed, $(grep -c '^KEEL-TEST step[0-9]* SKIP' "$log") skipped)"

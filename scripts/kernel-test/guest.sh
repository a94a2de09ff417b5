#!/bin/sh
# guest.sh: the steps of the kernel end-to-end test, sourced by /init in the
# qemu guest (busybox sh). Each check prints one line:
#   KEEL-TEST step<N> PASS|FAIL|SKIP: what was checked
# A failed check ends its step; the step cleans up so that the next can run.
# Everything runs on 127.0.0.1; volume files live on /vol (ext4 on virtio,
# where O_DIRECT works).

STEP=0
T0=0

now() { cut -d' ' -f1 /proc/uptime; }
pass() { echo "KEEL-TEST step$STEP PASS: $* [$(now)s]"; }
fail() { echo "KEEL-TEST step$STEP FAIL: $* [$(now)s]"; }
skip() { echo "KEEL-TEST step$STEP SKIP: $*"; }
info() { echo "KEEL-TEST step$STEP info: $*"; }

# check "what" cmd...: PASS when cmd succeeds, else FAIL with its output.
check() {
	what=$1
	shift
	if out=$("$@" 2>&1); then
		pass "$what"
		return 0
	fi
	fail "$what: $(echo "$out" | tail -8 | tr '\n' '|')"
	return 1
}

# listening PORT: true once something listens on 127.0.0.1:PORT.
listening() {
	hex=$(printf ':%04X' "$1")
	awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' /proc/net/tcp
}

wait_for() { # wait_for SECONDS cmd...: poll a condition of a real process
	n=$(($1 * 5))
	shift
	while [ "$n" -gt 0 ]; do
		"$@" && return 0
		sleep 0.2
		n=$((n - 1))
	done
	return 1
}

# serve NAME PORT SIZE: keel serve /vol/NAME.vol; sets SERVE_PID.
serve() {
	if listening "$2"; then
		echo "port $2 is already in use: an earlier keel serve still runs"
		return 1
	fi
	keel serve --file "/vol/$1.vol" --size "$3" --listen "127.0.0.1:$2" --name "$1" >>"/tmp/serve-$1.log" 2>&1 &
	SERVE_PID=$!
	if ! wait_for 30 listening "$2"; then
		echo "keel serve did not listen on port $2:"
		tail -5 "/tmp/serve-$1.log"
		return 1
	fi
}

# start_serve "what" NAME PORT SIZE: serve, in this shell (check runs its
# command in a subshell, which would lose SERVE_PID), and report.
start_serve() {
	what=$1
	shift
	if serve "$@" >/tmp/serve.out 2>&1; then
		pass "$what (pid $SERVE_PID)"
		return 0
	fi
	fail "$what: $(tail -5 /tmp/serve.out | tr '\n' '|')"
	return 1
}

stop_serve() {
	[ -n "${SERVE_PID:-}" ] || return 0
	kill -TERM "$SERVE_PID" 2>/dev/null
	wait "$SERVE_PID" 2>/dev/null
	SERVE_PID=
}

# sha FILE: the sha256 of a file.
sha() { sha256sum "$1" | cut -d' ' -f1; }

# same_data DEV OFFSET_BLOCKS COUNT_BLOCKS PATTERN: read back with O_DIRECT
# and compare with the start of PATTERN.
same_data() {
	dd if="$1" of=/tmp/back bs=1M skip=$(($2 * 4096)) count=$(($3 * 4096)) iflag=direct,skip_bytes,count_bytes 2>/dev/null || return 1
	head -c $(($3 * 4096)) "$4" >/tmp/want
	[ "$(sha /tmp/back)" = "$(sha /tmp/want)" ] || {
		echo "data at block $2 (+$3) differs"
		return 1
	}
}

# diagnose: what the serial log should hold when a step failed.
diagnose() {
	echo "---- diagnostics for step $STEP ----"
	keel attach --list 2>&1
	for d in /sys/block/nbd*; do
		[ "$(cat "$d/size")" = 0 ] || echo "$d: size $(cat "$d/size") pid $(cat "$d/pid" 2>/dev/null) backend $(cat "$d/backend" 2>/dev/null)"
	done
	echo "-- attach log --"
	tail -40 /run/keel/attach/attach.log 2>/dev/null
	for f in /tmp/serve-*.log /tmp/coord.log /tmp/node-*.log; do
		echo "-- $f --"
		tail -20 "$f"
	done
	echo "-- kernel --"
	dmesg | grep -iE 'nbd|block|ext4|I/O' | tail -40
	echo "---- end of diagnostics ----"
}

cleanup() { # cleanup DEV: unmount, detach, stop the server
	umount /mnt 2>/dev/null
	keel detach --force "$1" >/dev/null 2>&1
	stop_serve
}

run_step() {
	STEP=$1
	T0=$(now)
	echo "KEEL-TEST step$STEP info: start at ${T0}s"
	case $1 in
	0) step0 || diagnose ;;
	1) step1 || { diagnose; cleanup /dev/nbd0; } ;;
	2) step2 || { diagnose; cleanup /dev/nbd1; } ;;
	3) step3 || { diagnose; umount /mnt 2>/dev/null; keel detach --force /dev/nbd3 >/dev/null 2>&1; stop_cluster; } ;;
	4) step4 || { diagnose; cleanup /dev/nbd2; } ;;
	*) fail "no step $1" ;;
	esac
	echo "KEEL-TEST step$STEP info: took $(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')s"
}

# Step 0: the netlink mechanism against this kernel: netpath/nbdkernel's
# kernel tests (connect with two sockets, status, link-dead notifications,
# reconfigure and adoption, backend identifier, disconnect, dead-connection
# timeout), from its test binary.
step0() {
	for t in TestKernelLifecycle TestKernelDeadConnTimeout; do
		if out=$(nbdkernel.test -test.run "^$t\$" -test.v -test.timeout 120s 2>&1); then
			if echo "$out" | grep -q -- "--- SKIP"; then
				fail "$t skipped: $(echo "$out" | grep -A1 -- '--- SKIP' | tail -1)"
				return 1
			fi
			pass "nbdkernel $t"
		else
			echo "$out"
			fail "nbdkernel $t: $(echo "$out" | grep -E '^\s+kernel_test.go|FAIL|panic' | head -5 | tr '\n' '|')"
			return 1
		fi
		echo "$out" | grep -E '^\s+[a-z_]+_test.go' | sed "s/^ */KEEL-TEST step0 info: /"
	done
}

# Step 1: keel serve + keel attach --addr; O_DIRECT pattern write and read
# back; mkfs.ext4, files with fsync, unmount, remount, checksums.
step1() {
	start_serve "keel serve s1 (512 MiB) on 127.0.0.1:10809" s1 10809 512M || return 1
	check "keel attach --addr 127.0.0.1:10809 --export s1 --device /dev/nbd0 --daemon" \
		keel attach --addr 127.0.0.1:10809 --export s1 --device /dev/nbd0 --timeout 20 --daemon || return 1
	check "size 512 MiB, logical block 4096" sh -c 'sz=$(blockdev --getsize64 /dev/nbd0); lbs=$(cat /sys/block/nbd0/queue/logical_block_size); echo "size $sz, logical block $lbs"; [ "$sz" = 536870912 ] && [ "$lbs" = 4096 ]' || return 1
	info "kernel queue: max_sectors_kb $(cat /sys/block/nbd0/queue/max_sectors_kb), write cache '$(cat /sys/block/nbd0/queue/write_cache)', fua $(cat /sys/block/nbd0/queue/fua 2>/dev/null), backend '$(cat /sys/block/nbd0/backend 2>/dev/null)'"
	check "the kernel sends flushes (write back cache: keel advertises NBD_FLAG_SEND_FLUSH)" grep -q 'write back' /sys/block/nbd0/queue/write_cache || return 1
	check "keel attach --list shows /dev/nbd0 connected" sh -c 'keel attach --list | grep -E "^/dev/nbd0 +connected"' || return 1

	dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
	blocks=$((536870912 / 4096))
	for spec in "0 1" "1 16" "12345 256" "77777 3" "$((blocks - 2048)) 2048"; do
		set -- $spec
		dd if=/tmp/pat of=/dev/nbd0 bs=1M seek=$(($1 * 4096)) count=$(($2 * 4096)) iflag=count_bytes oflag=direct,seek_bytes conv=notrunc 2>/dev/null || {
			fail "O_DIRECT write of $2 blocks at block $1"
			return 1
		}
	done
	for spec in "0 1" "1 16" "12345 256" "77777 3" "$((blocks - 2048)) 2048"; do
		set -- $spec
		check "O_DIRECT read back of $2 blocks at block $1 matches" same_data /dev/nbd0 "$1" "$2" /tmp/pat || return 1
	done
	check "nothing written beyond the pattern (block 12601 is zero)" sh -c '[ -z "$(dd if=/dev/nbd0 bs=4096 skip=12601 count=1 iflag=direct 2>/dev/null | od -An -v -tx1 | tr -d " \n0")" ]' || return 1

	check "mkfs.ext4 -b 4096 /dev/nbd0" mkfs.ext4 -F -q -b 4096 /dev/nbd0 || return 1
	check "mount /dev/nbd0" mount -t ext4 /dev/nbd0 /mnt || return 1
	i=1
	while [ $i -le 12 ]; do
		dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i * 5)) conv=fsync 2>/dev/null || {
			fail "writing /mnt/f$i with fsync"
			return 1
		}
		i=$((i + 1))
	done
	(cd /mnt && sha256sum f*) >/tmp/sums1
	check "sync" sync || return 1
	check "umount" umount /mnt || return 1
	check "remount" mount -t ext4 /dev/nbd0 /mnt || return 1
	check "checksums of 12 files (0.3 to 3.8 MiB) after remount" sh -c 'cd /mnt && sha256sum -c /tmp/sums1' || return 1
	check "umount" umount /mnt || return 1
	check "fsck.ext4 -fn clean" fsck.ext4 -fn /dev/nbd0 || return 1
	check "keel detach /dev/nbd0" keel detach /dev/nbd0 || return 1
	check "detached: size 0, no record" sh -c '[ "$(cat /sys/block/nbd0/size)" = 0 ] && ! keel attach --list | grep -q "^/dev/nbd0 "' || return 1
	stop_serve
}

# Step 2: SIGKILL keel while a writer appends with fsync; restart keel; the
# device reconnects; every append whose fsync returned is there; fsck clean.
step2() {
	start_serve "keel serve s2 (256 MiB) on 127.0.0.1:10810" s2 10810 256M || return 1
	check "keel attach --addr 127.0.0.1:10810 --export s2 --device /dev/nbd1 --timeout 10 --daemon" \
		keel attach --addr 127.0.0.1:10810 --export s2 --device /dev/nbd1 --timeout 10 --daemon || return 1
	check "mkfs.ext4 and mount" sh -c 'mkfs.ext4 -F -q -b 4096 /dev/nbd1 && mount -t ext4 /dev/nbd1 /mnt' || return 1
	rm -f /tmp/acked /tmp/errs
	: >/tmp/acked
	(
		i=1
		while [ $i -le 400 ]; do
			if printf 'rec %06d keel-was-here-%06d\n' $i $i | dd of=/mnt/log oflag=append conv=notrunc,fsync status=none 2>>/tmp/errs; then
				echo $i >>/tmp/acked
			else
				echo "append $i failed" >>/tmp/errs
			fi
			i=$((i + 1))
		done
	) &
	wpid=$!
	check "the writer acknowledged 60 fsync-ed appends" wait_for 120 sh -c '[ $(wc -l </tmp/acked) -ge 60 ]' || return 1
	kill -9 "$SERVE_PID"
	wait "$SERVE_PID" 2>/dev/null
	killed_at=$(wc -l </tmp/acked)
	info "SIGKILL keel after $killed_at acknowledged appends; keel stays down 2s"
	sleep 2
	check "the supervisor sees the lost connection" sh -c 'keel attach --list | tee /dev/stderr | grep -E "^/dev/nbd1 +(reconnecting|failed)"'
	start_serve "restart keel serve s2" s2 10810 256M || return 1
	check "the device reconnects (keel attach --list: connected)" wait_for 60 sh -c 'keel attach --list | grep -qE "^/dev/nbd1 +connected"' || return 1
	wait $wpid
	total=$(wc -l </tmp/acked)
	check "the writer continued past the kill: $total of 400 appends acknowledged, $killed_at before the kill" [ "$total" -gt "$killed_at" ] || return 1
	check "no append or fsync failed (the filesystem saw no error)" sh -c '[ ! -s /tmp/errs ] || { cat /tmp/errs; exit 1; }' || return 1
	check "umount, remount (drops the page cache: reads come from keel)" sh -c 'umount /mnt && mount -t ext4 /dev/nbd1 /mnt' || return 1
	check "every acknowledged append is in the file, intact and in order" awk '
		NR == FNR { want[$1] = 1; n++; next }
		{ if ($0 != sprintf("rec %06d keel-was-here-%06d", FNR, FNR)) { print "line " FNR " is \"" $0 "\""; bad = 1; exit } ; have[FNR] = 1 }
		END { if (bad) exit 1; for (k in want) if (!(k in have)) { print "acknowledged append " k " is missing"; exit 1 } ; print n " acknowledged, " FNR " present" }
	' /tmp/acked /mnt/log || return 1
	check "umount" umount /mnt || return 1
	check "fsck.ext4 -fn clean" fsck.ext4 -fn /dev/nbd1 || return 1
	check "keel detach /dev/nbd1" keel detach /dev/nbd1 || return 1
	stop_serve
}

# Step 3: coordinator and two nodes in the guest: attach by volume name, kill
# the primary node, the device continues on the promoted secondary with the
# mounted filesystem intact.
step3() {
	if ! keel coord --help >/dev/null 2>&1 || ! keel node --help >/dev/null 2>&1; then
		skip "this keel has no 'keel coord' and 'keel node' (issues 3 and 4): attach by volume name and failover cannot be tested"
		return 0
	fi
	C=http://127.0.0.1:7400
	keel coord --id c1 --data-dir /vol/c1 --listen 127.0.0.1:7400 --raft-addr 127.0.0.1:7401 --lease 4s --heartbeat-interval 1s >/tmp/coord.log 2>&1 &
	COORD_PID=$!
	check "keel coord (one member, node lease 4s) answers" wait_for 60 sh -c "keel node list --coord $C >/dev/null 2>&1" || return 1
	keel node --id n1 --zone a --data-dir /vol/n1 --coord $C --primary-listen 127.0.0.1:10821 --repl-listen 127.0.0.1:10921 --capacity 2G --repl-timeout 30s >/tmp/node-n1.log 2>&1 &
	N1_PID=$!
	keel node --id n2 --zone b --data-dir /vol/n2 --coord $C --primary-listen 127.0.0.1:10822 --repl-listen 127.0.0.1:10922 --capacity 2G --repl-timeout 30s >/tmp/node-n2.log 2>&1 &
	N2_PID=$!
	check "two keel nodes (n1 zone a, n2 zone b) are up" wait_for 60 nodes_up 2 || return 1
	check "keel volume create v3 --size 256M --replicas 2" keel volume create v3 --size 256M --replicas 2 --coord $C || return 1
	check "v3 is ok with both replicas in sync" wait_for 60 sh -c "keel volume status v3 --coord $C | grep -qE ' ok .* (n1,n2|n2,n1) '" || return 1
	check "keel attach v3 --coord $C --device /dev/nbd3 --daemon" \
		keel attach v3 --coord $C --device /dev/nbd3 --timeout 30 --daemon || return 1
	json=$(keel attach --list --output json)
	primary=$(echo "$json" | sed -n 's/.*"node": "\(n[12]\)".*/\1/p' | head -1)
	epoch=$(echo "$json" | sed -n 's/.*"epoch": \([0-9]*\).*/\1/p' | head -1)
	case $primary in
	n1) ppid=$N1_PID other=n2 ;;
	n2) ppid=$N2_PID other=n1 ;;
	*)
		fail "keel attach --list names no primary node: $json"
		return 1
		;;
	esac
	pass "attached to the primary, node $primary, epoch $epoch"
	check "mkfs.ext4 and mount" sh -c 'mkfs.ext4 -F -q -b 4096 /dev/nbd3 && mount -t ext4 /dev/nbd3 /mnt' || return 1
	i=1
	while [ $i -le 6 ]; do
		dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i * 4)) conv=fsync 2>/dev/null || {
			fail "writing /mnt/f$i with fsync"
			return 1
		}
		i=$((i + 1))
	done
	(cd /mnt && sha256sum f*) >/tmp/sums3
	: >/tmp/acked3
	rm -f /tmp/errs3
	(
		i=1
		while [ $i -le 300 ]; do
			if printf 'rec %06d keel-was-here-%06d\n' $i $i | dd of=/mnt/log oflag=append conv=notrunc,fsync status=none 2>>/tmp/errs3; then
				echo $i >>/tmp/acked3
			else
				echo "append $i failed" >>/tmp/errs3
			fi
			i=$((i + 1))
		done
	) &
	wpid=$!
	check "the writer acknowledged 40 fsync-ed appends" wait_for 120 sh -c '[ $(wc -l </tmp/acked3) -ge 40 ]' || return 1
	check "before the kill, both replicas are still in sync (else no failover may happen)" sh -c "keel volume status v3 --coord $C | tee /dev/stderr | grep -qE ' ok .* (n1,n2|n2,n1) '" || return 1
	kill -9 "$ppid"
	wait "$ppid" 2>/dev/null
	killed_at=$(wc -l </tmp/acked3)
	info "SIGKILL the primary node $primary after $killed_at acknowledged appends"
	t_kill=$(now)
	check "the coordinator promotes $other (keel volume status: primary $other)" wait_for 120 promoted "$other" || return 1
	check "the device follows: keel attach --list shows node $other, epoch > $epoch, connected" wait_for 120 follows "$other" "$epoch" || return 1
	info "failover: the device was connected to $other $(awk -v a="$t_kill" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')s after the kill"
	wait $wpid
	total=$(wc -l </tmp/acked3)
	check "the writer continued on $other: $total of 300 appends acknowledged, $killed_at before the kill" [ "$total" -gt "$killed_at" ] || return 1
	check "no append or fsync failed (the filesystem saw no error)" sh -c '[ ! -s /tmp/errs3 ] || { cat /tmp/errs3; exit 1; }' || return 1
	check "umount, remount on $other" sh -c 'umount /mnt && mount -t ext4 /dev/nbd3 /mnt' || return 1
	check "every acknowledged append is there, intact and in order" awk '
		NR == FNR { want[$1] = 1; n++; next }
		{ if ($0 != sprintf("rec %06d keel-was-here-%06d", FNR, FNR)) { print "line " FNR " is \"" $0 "\""; bad = 1; exit } ; have[FNR] = 1 }
		END { if (bad) exit 1; for (k in want) if (!(k in have)) { print "acknowledged append " k " is missing"; exit 1 } ; print n " acknowledged, " FNR " present" }
	' /tmp/acked3 /mnt/log || return 1
	check "checksums of the files written before the failover" sh -c 'cd /mnt && sha256sum -c /tmp/sums3 >/dev/null' || return 1
	check "umount" umount /mnt || return 1
	check "fsck.ext4 -fn clean" fsck.ext4 -fn /dev/nbd3 || return 1
	check "keel detach /dev/nbd3" keel detach /dev/nbd3 || return 1
	stop_cluster
}

# nodes_up N: the coordinator lists N nodes up.
nodes_up() { [ "$(keel node list --coord "$C" | grep -c ' up ')" = "$1" ]; }

# promoted NODE: the coordinator names NODE primary of v3.
promoted() {
	keel volume status v3 --coord "$C" | awk -v n="$1" '$1 == "v3" && $0 ~ " " n " " { f = 1 } END { exit !f }'
}

# follows NODE EPOCH: keel attach --list shows the device connected to NODE
# at an epoch above EPOCH.
follows() {
	j=$(keel attach --list --output json)
	echo "$j" | grep -q "\"node\": \"$1\"" || return 1
	e=$(echo "$j" | sed -n 's/.*"epoch": \([0-9]*\).*/\1/p' | head -1)
	[ "${e:-0}" -gt "$2" ] || return 1
	echo "$j" | grep -q '"state": "connected"'
}

stop_cluster() {
	for p in ${N1_PID:-} ${N2_PID:-} ${COORD_PID:-}; do
		kill -TERM "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
	N1_PID= N2_PID= COORD_PID=
}

# Step 4: four connections (one kernel queue each), concurrent writers,
# verify; kill keel and check that all four connections come back.
step4() {
	start_serve "keel serve s4 (512 MiB) on 127.0.0.1:10811" s4 10811 512M || return 1
	rm -f /tmp/errs4
	check "keel attach --connections 4 --device /dev/nbd2 --daemon" \
		keel attach --addr 127.0.0.1:10811 --export s4 --device /dev/nbd2 --connections 4 --timeout 10 --daemon || return 1
	check "4 TCP connections from the kernel to keel are established" sh -c 'n=$(awk '"'"'$4 == "01" && substr($3, length($3) - 4) == ":2A3B"'"'"' /proc/net/tcp | wc -l); echo "$n connections to :10811"; [ "$n" = 4 ]' || return 1
	hwq=$(ls /sys/block/nbd2/mq | wc -l)
	check "the kernel spreads I/O over min(4 connections, $(nproc) CPUs) = $hwq hardware queues" [ "$hwq" = "$(( $(nproc) < 4 ? $(nproc) : 4 ))" ] || return 1
	check "keel attach --list: 4/4 connections" sh -c 'keel attach --list | grep -E "^/dev/nbd2 +connected .* 4/4 "' || return 1
	w=0
	while [ $w -lt 4 ]; do
		dd if=/dev/urandom of=/tmp/pat$w bs=1M count=8 2>/dev/null
		w=$((w + 1))
	done
	# (wait for these pids only: a bare wait would wait for keel serve too)
	pids=
	w=0
	while [ $w -lt 4 ]; do
		dd if=/tmp/pat$w of=/dev/nbd2 bs=1M seek=$((w * 16)) oflag=direct conv=notrunc,fsync 2>/tmp/dd$w.err &
		pids="$pids $!"
		w=$((w + 1))
	done
	for p in $pids; do
		wait "$p" || echo "writer pid $p failed" >>/tmp/errs4
	done
	check "4 concurrent O_DIRECT writers: no error" sh -c '[ ! -s /tmp/errs4 ]' || return 1
	w=0
	while [ $w -lt 4 ]; do
		check "O_DIRECT region $w (8 MiB at $((w * 16)) MiB, written concurrently) reads back" same_data /dev/nbd2 $((w * 4096)) 2048 /tmp/pat$w || return 1
		w=$((w + 1))
	done
	check "mkfs.ext4 and mount" sh -c 'mkfs.ext4 -F -q -b 4096 /dev/nbd2 && mount -t ext4 /dev/nbd2 /mnt' || return 1
	pids=
	w=0
	while [ $w -lt 4 ]; do
		(
			mkdir -p /mnt/w$w
			i=0
			while [ $i -lt 8 ]; do
				dd if=/dev/urandom of=/mnt/w$w/f$i bs=32k count=$((8 + i * 4)) conv=fsync 2>/dev/null || echo "writer $w file $i failed" >>/tmp/errs4
				i=$((i + 1))
			done
		) &
		pids="$pids $!"
		w=$((w + 1))
	done
	for p in $pids; do
		wait "$p"
	done
	check "4 concurrent file writers with fsync: no error" sh -c '[ ! -s /tmp/errs4 ]' || return 1
	(cd /mnt && sha256sum w*/f*) >/tmp/sums4
	check "umount, remount, checksums of 32 files" sh -c 'umount /mnt && mount -t ext4 /dev/nbd2 /mnt && cd /mnt && sha256sum -c /tmp/sums4 >/dev/null' || return 1
	kill -9 "$SERVE_PID"
	wait "$SERVE_PID" 2>/dev/null
	start_serve "restart keel after SIGKILL" s4 10811 512M || return 1
	check "all 4 connections come back (keel attach --list: 4/4)" wait_for 60 sh -c 'keel attach --list | grep -qE "^/dev/nbd2 +connected .* 4/4 "' || return 1
	check "checksums again after the reconnect (page cache dropped)" sh -c 'umount /mnt && mount -t ext4 /dev/nbd2 /mnt && cd /mnt && sha256sum -c /tmp/sums4 >/dev/null' || return 1
	check "umount" umount /mnt || return 1
	check "fsck.ext4 -fn clean" fsck.ext4 -fn /dev/nbd2 || return 1
	check "keel detach /dev/nbd2" keel detach /dev/nbd2 || return 1
	stop_serve
}

# Shared helpers for the privileged tests (sourced, not run). Every test builds its own network
# namespaces, named after the test and its PID, and removes them on exit: no traffic ever
# touches the host's interfaces.
#
#   srv namespace:  bridge br0 with $SRV_IP/24 (and fd77::1/64); servers and QEMU run here
#   client namespaces: one veth each, the other end enslaved to br0

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROVISIONER=${PROVISIONER:-$REPO/target/debug/provisioner}
SUBNET_PREFIX=${SUBNET_PREFIX:-10.77.0}
SRV_IP=$SUBNET_PREFIX.1
TEST_NAME=${TEST_NAME:-$(basename "$0" .sh)}
NS_SRV="pv-${TEST_NAME:0:8}-$$"
# PV_TMPDIR: where the work directory goes (/tmp unless set; a test with large files sets
# /var/tmp).
WORK=$(mktemp -d "${PV_TMPDIR:-/tmp}/pv-${TEST_NAME}.XXXXXX")
_CLIENT_NS=()
_PIDS=()
FAILURES=0

log() { printf '[%s] %s\n' "$TEST_NAME" "$*" >&2; }
pass() { printf 'PASS %s: %s\n' "$TEST_NAME" "$*"; }
fail() { printf 'FAIL %s: %s\n' "$TEST_NAME" "$*"; FAILURES=$((FAILURES + 1)); }
# check DESCRIPTION CMD...: runs CMD, records PASS/FAIL.
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
in_srv() { ip netns exec "$NS_SRV" "$@"; }

# Every process a test starts in the background is recorded in $WORK/pids ("PID START NAME",
# START: the kernel's start time of the process, so a PID reused later is never taken for it):
# cleanup stops exactly those, by PID, also when they were started inside $(...). Under
# tests/run-all.sh (PV_TRACK_DIR set) the records and the work directory go there too, and the
# run checks at its end that nothing a test started is still running (tests/leftovers.sh).
[ -n "${PV_TRACK_DIR:-}" ] && echo "$WORK" >>"$PV_TRACK_DIR/workdirs"

# pid_start PID: the process's start time (clock ticks after boot, /proc/PID/stat field 22).
pid_start() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) } # the command name may hold spaces and parentheses
    set -- $stat
    echo "${20}"
}

# alive PID: the process exists and is not a zombie.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat:0:1}" != Z ]
}

# track_pid PID NAME: records a process this test started (see above); cleanup stops it.
track_pid() {
    local start line
    start=$(pid_start "$1") || return 0 # already gone
    line="$1 $start $2"
    echo "$line" >>"$WORK/pids"
    [ -n "${PV_TRACK_DIR:-}" ] && echo "$line $TEST_NAME" >>"$PV_TRACK_DIR/pids"
    return 0
}

# start_in NS NAME CMD...: starts CMD in the background inside network namespace NS, output in
# $WORK/NAME.log; records and prints its real PID (the shell that writes $WORK/NAME.pid execs
# CMD, so the PID is the command's own, whatever ip netns exec does).
start_in() {
    local ns=$1 name=$2; shift 2
    local pidfile=$WORK/$name.pid
    # A PID file left by an earlier start of the same name must not be read as this one's.
    rm -f "$pidfile"
    ip netns exec "$ns" sh -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" \
        >"$WORK/$name.log" 2>&1 &
    if ! wait_for 30 test -s "$pidfile"; then
        log "start_in $name: no PID file after 30 s"
        return 1
    fi
    track_pid "$(cat "$pidfile")" "$name"
    cat "$pidfile"
}
# start_in_srv NAME CMD...: start_in the server namespace.
start_in_srv() { start_in "$NS_SRV" "$@"; }

# stop_pid PID: SIGTERM, then SIGKILL if it is still there after 5 s; waits until it is gone;
# then the same for the children it had.
stop_pid() {
    local pid=$1 child children
    [ -n "$pid" ] || return 0
    # A wrapper's children are ours too (tests/serial-ts.py runs QEMU in a session of its own):
    # if the wrapper has to be killed before it could stop them, they would outlive the test.
    children=$(pgrep -P "$pid" 2>/dev/null || true)
    if kill "$pid" 2>/dev/null && ! wait_for 5 not alive "$pid"; then
        kill -9 "$pid" 2>/dev/null || true
        wait_for 5 not alive "$pid" || log "pid $pid still there after SIGKILL"
    fi
    alive "$pid" || wait "$pid" 2>/dev/null || true # reaps it when it is a child of this shell
    for child in $children; do stop_pid "$child"; done
}

# now_us: microseconds since the epoch (no fork: wait_for calls it ten times a second).
now_us() { echo "${EPOCHREALTIME//[!0-9]/}"; }

# wait_for [-p PID] [-i INTERVAL] SECONDS CMD...: runs CMD (output discarded) every INTERVAL
# seconds (0.1 unless given) until it succeeds (0) or SECONDS (whole) have passed (1); with -p,
# also gives up as soon as process PID has exited (after one last try of CMD). A CMD that costs
# something (a command over SSH in a VM) takes a longer INTERVAL.
# The one way tests wait for a condition: a deadline, never a fixed sleep.
wait_for() {
    local pid= interval=0.1
    while :; do
        case $1 in
            -p) pid=$2; shift 2 ;;
            -i) interval=$2; shift 2 ;;
            *) break ;;
        esac
    done
    local deadline=$(( $(now_us) + $1 * 1000000 ))
    shift
    while :; do
        "$@" >/dev/null 2>&1 && return 0
        [ "$(now_us)" -lt "$deadline" ] || return 1
        if [ -n "$pid" ] && ! alive "$pid"; then
            "$@" >/dev/null 2>&1
            return
        fi
        sleep "$interval"
    done
}

# started_here PID: the process has this test's work directory on its command line.
started_here() { tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qF -- "$WORK"; }

# not CMD...: the negation, as a command (for wait_for and check).
not() { ! "$@"; }

netns_up() {
    ip netns add "$NS_SRV"
    in_srv ip link set lo up
    in_srv ip link add br0 type bridge
    # A fixed address: a bridge without one takes its lowest port's, so adding a client later
    # could change it under the clients' ARP caches, and their frames to the old address would
    # be flooded and never reach the server's IP stack.
    in_srv ip link set br0 address 02:00:00:77:00:01
    in_srv ip link set br0 type bridge stp_state 0 forward_delay 0
    in_srv ip addr add "$SRV_IP/24" dev br0
    in_srv ip -6 addr add fd77::1/64 dev br0 nodad
    in_srv ip link set br0 up
}

# add_client NAME: a namespace with interface eth0 bridged to br0; prints the namespace name.
add_client() {
    local ns="pv-c${1:0:6}-$$"
    ip netns add "$ns"
    _CLIENT_NS+=("$ns")
    ip link add "v$1$$" type veth peer name eth0 netns "$ns"
    ip link set "v$1$$" netns "$NS_SRV"
    in_srv ip link set "v$1$$" master br0 up
    ip netns exec "$ns" ip link set lo up
    [ -n "${2:-}" ] && ip netns exec "$ns" ip link set eth0 address "$2"
    ip netns exec "$ns" ip link set eth0 up
    echo "$ns"
}

# udhcpc_bind NS: busybox udhcpc in client namespace NS takes a lease (netboot must answer DHCP on
# :67 in the server namespace) and puts its address on eth0, as a booting machine does; fails
# without a lease. netboot hands a machine its imaging token only after such an ACK, and only
# to its reserved address.
udhcpc_bind() {
    local script=$WORK/udhcpc-bind.sh
    if [ ! -x "$script" ]; then
        printf '%s\n' '#!/bin/sh' \
            'case "$1" in bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/${mask:-24}" dev "$interface" ;; esac' \
            >"$script"
        chmod +x "$script"
    fi
    ip netns exec "$1" busybox udhcpc -i eth0 -q -n -f -t 5 -T 1 -s "$script" >/dev/null 2>&1
}

# journal_phases FILE: the phases of netboot's phase records in FILE (`journalctl -o json`
# lines), in order, a repeat of the same phase once, on one line.
journal_phases() {
    python3 -c '
import json, sys
seen = []
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if "PHASE" in e and "MESSAGE_ID" in e and (not seen or seen[-1] != e["PHASE"]):
        seen.append(e["PHASE"])
print(" ".join(seen))' "$1"
}

# stub_boot_files DIR NAME...: small stand-ins for boot files a test's configuration names but
# no client of the test boots (netboot refuses to start when one is missing); an existing file
# is left as it is.
stub_boot_files() {
    local dir=$1 name; shift
    mkdir -p "$dir"
    for name in "$@"; do
        [ -e "$dir/$name" ] || echo "stand-in for $name" > "$dir/$name"
    done
}

# add_tap NAME: a tap on br0 for a QEMU guest (QEMU must run in the server namespace).
add_tap() {
    in_srv ip tuntap add dev "$1" mode tap
    in_srv ip link set "$1" master br0 up
}

# write_config FILE [KEY: VALUE]...: a `provisioner netboot` configuration for this test's
# namespace. Each argument replaces the default line of its top-level KEY, or adds one (a value
# may span lines); "KEY:" alone leaves KEY out. The defaults:
#   interface: br0                      serverAddress: $SRV_IP     subnet: $SUBNET_PREFIX.0/24
#   bootFiles: {ipxeDir: $WORK/assets, assetsDir: $WORK/assets}
#   boot: {kernel: vmlinuz, initrd: initrd.img}
#   listen: {dhcp: "0.0.0.0:67", tftp: "0.0.0.0:69", http: "0.0.0.0:80"}
#   inventory: {directory: $MACHINES}
write_config() {
    local file=$1 arg key; shift
    local keys=(interface serverAddress subnet bootFiles boot listen inventory)
    local -A line=(
        [interface]="interface: br0"
        [serverAddress]="serverAddress: $SRV_IP"
        [subnet]="subnet: $SUBNET_PREFIX.0/24"
        [bootFiles]="bootFiles: {ipxeDir: $WORK/assets, assetsDir: $WORK/assets}"
        [boot]="boot: {kernel: vmlinuz, initrd: initrd.img}"
        [listen]='listen: {dhcp: "0.0.0.0:67", tftp: "0.0.0.0:69", http: "0.0.0.0:80"}'
        [inventory]="inventory: {directory: $MACHINES}"
    )
    for arg in "$@"; do
        key=${arg%%:*}
        [ -n "${line[$key]+set}" ] || keys+=("$key")
        line[$key]=$arg
    done
    for key in "${keys[@]}"; do
        [ "${line[$key]}" = "$key:" ] || printf '%s\n' "${line[$key]}"
    done >"$file.tmp"
    mv "$file.tmp" "$file"
}

# write_machine NAME MAC IP [FIELD: VALUE]...: the Machine manifest $MACHINES/NAME.yaml with
# these spec fields, written whole at once (netboot watches the folder and may read it at any
# moment). MACHINES is $WORK/machines unless set.
MACHINES=${MACHINES:-$WORK/machines}
MACHINE_API_VERSION=provisioner.dev/v1alpha1
write_machine() {
    local name=$1 mac=$2 ip=$3 field; shift 3
    mkdir -p "$MACHINES"
    {
        printf 'apiVersion: %s\nkind: Machine\nmetadata:\n  name: %s\nspec:\n' "$MACHINE_API_VERSION" "$name"
        printf '  macAddress: "%s"\n  ipAddress: %s\n' "$mac" "$ip"
        for field in "$@"; do printf '  %s\n' "$field"; done
    } >"$MACHINES/.$name.yaml.tmp"
    mv "$MACHINES/.$name.yaml.tmp" "$MACHINES/$name.yaml"
}

cleanup() {
    local pid start name ns left f
    # Helpers are often called inside $(...), so their records in _PIDS/_CLIENT_NS may be lost in
    # the subshell: $WORK/pids has every start, and every namespace of this run is deleted.
    if [ -f "$WORK/pids" ]; then
        while read -r pid start name; do
            [ "$(pid_start "$pid" || true)" = "$start" ] && stop_pid "$pid"
        done < <(tac "$WORK/pids")
    fi
    for pid in "${_PIDS[@]}"; do stop_pid "$pid"; done
    # PID files a script wrote itself: a record too, when the process still names this run's
    # work directory on its command line (so a PID reused since is never taken for it).
    for f in "$WORK"/*.pid; do
        [ -s "$f" ] || continue
        pid=$(cat "$f")
        started_here "$pid" && stop_pid "$pid"
    done
    # Anything else still running with this run's work directory on its command line was
    # started by this test and escaped the records above: a defect of the test. Stopped here,
    # by PID, and the test fails.
    left=$(pgrep -f -- "$WORK" || true)
    for pid in $left; do
        printf 'FAIL %s: left running: %s\n' "$TEST_NAME" "$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")"
        stop_pid "$pid"
    done
    for ns in "${_CLIENT_NS[@]}" $(ip netns list | awk -v s="-$$" '$1 ~ "^pv-" && substr($1, length($1) - length(s) + 1) == s {print $1}'); do
        ip netns del "$ns" 2>/dev/null || true
    done
    ip netns del "$NS_SRV" 2>/dev/null || true
    if [ "${KEEP_WORK:-0}" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
    # Otherwise the test's own exit status stands.
    if [ -n "$left" ]; then exit 1; fi
}
trap cleanup EXIT

# finish: exit status for the test script.
finish() {
    if [ "$FAILURES" -eq 0 ]; then log "all checks passed"; exit 0; fi
    log "$FAILURES check(s) failed"; exit 1
}

# build_static_stage2 TARGET_DIR: stage2 as the initrd's /init: a static binary (no NSS, no libc
# in the initrd), no debug info and stripped to keep the initrd small without a release build,
# the C compressors optimised (at -O0 zstd takes ~4x longer to compress the initrd).
build_static_stage2() {
    (cd "$REPO" && RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_DEV_DEBUG=0 \
        CARGO_PROFILE_DEV_STRIP=true cargo build -q -p stage2 --bin stage2 \
        --target x86_64-unknown-linux-gnu --target-dir "$1" \
        --config 'profile.dev.package.zstd-sys.opt-level=3' \
        --config 'profile.dev.package.liblzma-sys.opt-level=3')
}

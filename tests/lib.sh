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
WORK=$(mktemp -d "/tmp/pv-${TEST_NAME}.XXXXXX")
_CLIENT_NS=()
_PIDS=()
FAILURES=0

log() { printf '[%s] %s\n' "$TEST_NAME" "$*" >&2; }
pass() { printf 'PASS %s: %s\n' "$TEST_NAME" "$*"; }
fail() { printf 'FAIL %s: %s\n' "$TEST_NAME" "$*"; FAILURES=$((FAILURES + 1)); }
# check DESCRIPTION CMD...: runs CMD, records PASS/FAIL.
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
in_srv() { ip netns exec "$NS_SRV" "$@"; }

# Starts a command in the background inside the server namespace; records its real PID
# (ip netns exec forks, so $! would be the wrong process).
start_in_srv() {
    local name=$1; shift
    local pidfile=$WORK/$name.pid
    ip netns exec "$NS_SRV" sh -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" \
        >"$WORK/$name.log" 2>&1 &
    local i
    for i in $(seq 1 50); do [ -s "$pidfile" ] && break; sleep 0.02; done
    _PIDS+=("$(cat "$pidfile")")
    cat "$pidfile"
}

stop_pid() {
    local pid=$1 child
    # A wrapper's children are ours too (tests/serial-ts.py runs QEMU in a session of its own):
    # if the wrapper has to be killed before it could stop them, they would outlive the test.
    local children
    children=$(pgrep -P "$pid" 2>/dev/null || true)
    if kill "$pid" 2>/dev/null; then
        local i
        for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    for child in $children; do stop_pid "$child"; done
}

netns_up() {
    ip netns add "$NS_SRV"
    in_srv ip link set lo up
    in_srv ip link add br0 type bridge
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

cleanup() {
    # Helpers are often called inside $(...), so their records in _PIDS/_CLIENT_NS may be lost in
    # the subshell: also stop every PID file of $WORK and delete every namespace of this run.
    local pid ns f
    for f in "$WORK"/*.pid; do [ -s "$f" ] && _PIDS+=("$(cat "$f")"); done
    for pid in "${_PIDS[@]}"; do stop_pid "$pid"; done
    for ns in "${_CLIENT_NS[@]}" $(ip netns list | awk -v s="-$$" '$1 ~ "^pv-" && substr($1, length($1) - length(s) + 1) == s {print $1}'); do
        ip netns del "$ns" 2>/dev/null || true
    done
    ip netns del "$NS_SRV" 2>/dev/null || true
    if [ "${KEEP_WORK:-0}" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
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

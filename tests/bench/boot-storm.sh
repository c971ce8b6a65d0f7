#!/bin/bash
# Boot storm: N machines start at once and each goes through the whole chain against
# `provisioner netboot` (release build, its own process), as a real machine does: iPXE's DHCP
# DORA (its own MAC, user class iPXE, the script URL from the ACK), its iPXE script over HTTP
# from its reserved address, the kernel and the initrd over HTTP, stage2's DHCP DORA, then
# stage2's `imaging` reports to /report with the token of the orders on the script's kernel
# line (parsed as stage2 parses it, by the wire crate). The client is agent/examples/
# boot_storm.rs in a client namespace; the driver an ignored test of the agent
# (cluster::tests::live::bench::storm) in this script's namespace, with a real kube-apiserver +
# etcd from the Kubernetes bundle (tests/lib-kube.sh) and the N Machines created before
# netboot starts. Folder mode is the reference row, cluster mode the measured one.
#
# For each N of SIZES: the time from the first DISCOVER until all N have their files, until all
# N reports are accepted and until all N are `Imaging` in the API (a watch); failures per step
# and the steps' times; the slowest machine and its steps; netboot's CPU seconds, resident
# memory and threads; the API server's + etcd's CPU and requests; the load average at the
# start of each part. Bounded: each machine stops STORM_TIMEOUT s after the storm's start, the
# watch waits 60 s more, each N at most 20 minutes in all.
#
# Sizes: KERNEL_SIZE + INITRD_SIZE bytes per machine (8 MiB + 32 MiB), scaled down (1:4 kept)
# when N x (kernel + initrd) would pass TRAFFIC_MAX bytes (4 GiB): 100 machines fetch 8 + 32
# MiB, 1000 machines 0.8 + 3.3 MiB. STORM_HTTP_MAX_CONNECTIONS sets netboot's
# limits.http.maxConnections (default 512). Work files under PV_TMPDIR (/var/tmp). Run as root.
#   SIZES="100 1000" STORM_FOLDER=1 STORM_PXE=0 STORM_REPORTS=2 STORM_TIMEOUT=300 tests/bench/boot-storm.sh
TEST_NAME=storm
REPO_DIR=$(cd "$(dirname "$0")/../.." && pwd)
PROVISIONER=${PROVISIONER:-$REPO_DIR/target/release/provisioner}
PV_TMPDIR=${PV_TMPDIR:-/var/tmp}
. "$REPO_DIR/tests/lib.sh"
. "$REPO/tests/lib-kube.sh"

SIZES=${SIZES:-"100 1000"}
KERNEL_SIZE=${KERNEL_SIZE:-$((8 << 20))}
INITRD_SIZE=${INITRD_SIZE:-$((32 << 20))}
TRAFFIC_MAX=${TRAFFIC_MAX:-$((4 << 30))}

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
bin=$(kube_unpack) || { fail "the Kubernetes bundle is found and verified"; finish; }
(cd "$REPO" && cargo build -q --release --locked -p agent --bins --example boot_storm)
client=$REPO/target/release/examples/boot_storm
exe=$(cd "$REPO" && cargo test -q --release --locked -p agent --lib --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "agent":
        print(m["executable"])' | tail -1)
[ -x "$exe" ] || { fail "the agent's release test binary is built"; finish; }

netns_up
in_srv ip addr add 10.80.0.1/16 dev br0
cns=$(add_client storm)
ip netns exec "$cns" ip addr add 10.80.255.250/16 dev eth0
cmac=$(ip netns exec "$cns" cat /sys/class/net/eth0/address)
mkdir -p "$WORK/tmp"

for n in $SIZES; do
    run=$WORK/n$n
    mkdir -p "$run"
    kernel=$KERNEL_SIZE initrd=$INITRD_SIZE
    if [ $((n * (kernel + initrd))) -gt "$TRAFFIC_MAX" ]; then
        per=$((TRAFFIC_MAX / n))
        kernel=$((per * KERNEL_SIZE / (KERNEL_SIZE + INITRD_SIZE) / 4096 * 4096))
        initrd=$(((per - kernel) / 4096 * 4096))
    fi
    status=0
    in_srv env TMPDIR="$WORK/tmp" KUBERNETES_BIN="$bin" PROVISIONER="$PROVISIONER" \
        BENCH_WORK="$run" BENCH_CLIENT_NS="$cns" BENCH_CLIENT_MAC="$cmac" STORM_CLIENT="$client" STORM_MACHINES="$n" \
        STORM_KERNEL_SIZE="$kernel" STORM_INITRD_SIZE="$initrd" \
        STORM_FOLDER="${STORM_FOLDER:-1}" STORM_PXE="${STORM_PXE:-0}" \
        STORM_REPORTS="${STORM_REPORTS:-2}" STORM_TIMEOUT="${STORM_TIMEOUT:-300}" \
        ${STORM_HTTP_MAX_CONNECTIONS:+STORM_HTTP_MAX_CONNECTIONS="$STORM_HTTP_MAX_CONNECTIONS"} \
        timeout 1200 "$exe" --ignored --exact cluster::tests::live::bench::storm::boot_storm_against_kube_apiserver \
        --nocapture --test-threads=1 >"$run/out.log" 2>&1 || status=$?
    grep -vE '^(running|test |$|successes:|failures:|test result)' "$run/out.log" | grep -vE '^\s+cluster::' || true
    check "boot storm of $n machines: every machine through the chain, all Imaging in the API" test "$status" -eq 0
    [ "$status" -eq 0 ] || tail -30 "$run/out.log"
    # The boot files of this size are not needed any more.
    rm -rf "$run"/*/assets
done
leftover=$(pgrep -f "$WORK/" || true)
check "no process of the benchmark left running" test -z "$leftover"
for pid in $leftover; do stop_pid "$pid"; done
finish

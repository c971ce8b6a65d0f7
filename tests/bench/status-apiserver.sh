#!/bin/bash
# The status pipeline against a real API server: `provisioner netboot` (release build, its own
# process) with the cluster inventory of a kube-apiserver + etcd from the Kubernetes bundle
# (tests/lib-kube.sh), all on the loopback and bridge of this script's network namespace; DHCP
# from a client namespace (tests/bench/dhcp-burst.py, perfdhcp). For each size in SIZES, one
# fresh control plane and, in the same run, folder mode as the reference:
#   READY and all Machines Served (time from netboot's start), the API server's request counts,
#   resident memory, CPU of netboot and of the API server + etcd; a burst of one DISCOVER per
#   Machine for the first BURST Machines: DISCOVER -> OFFER and DISCOVER -> .status.phase seen
#   by a watch; perfdhcp exchanges/s at RATE for PERIOD s over those Machines while each one's
#   first exchange is a phase change (after a reimage), cluster vs folder mode.
# The driver is an ignored test of the agent (cluster::tests::live::bench). Bounded: each size
# stops by itself (a few minutes for 10000 Machines). Run as root.
#   SIZES="1000 10000" BURST=1000 RATE=4000 PERIOD=5 tests/bench/status-apiserver.sh
TEST_NAME=status-apiserver
REPO_DIR=$(cd "$(dirname "$0")/../.." && pwd)
PROVISIONER=${PROVISIONER:-$REPO_DIR/target/release/provisioner}
. "$REPO_DIR/tests/lib.sh"
. "$REPO/tests/lib-kube.sh"

SIZES=${SIZES:-"1000 10000"}
BURST=${BURST:-1000}
RATE=${RATE:-4000}
PERIOD=${PERIOD:-5}
command -v perfdhcp >/dev/null || { echo "FAIL: perfdhcp (kea-admin) missing"; exit 1; }

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
bin=$(kube_unpack) || { fail "the Kubernetes bundle is found and verified"; finish; }
(cd "$REPO" && cargo build -q --release --locked -p agent --bins)
exe=$(cd "$REPO" && cargo test -q --release --locked -p agent --lib --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "agent":
        print(m["executable"])' | tail -1)
[ -x "$exe" ] || { fail "the agent's release test binary is built"; finish; }

netns_up
in_srv ip addr add 10.80.0.1/16 dev br0
client=$(add_client sapi)
# perfdhcp sends as a relay agent from this address (giaddr): netboot's dhcpRelays lists it.
client_ip=10.80.255.250
ip netns exec "$client" ip addr add "$client_ip/16" dev eth0
mkdir -p "$WORK/tmp"

for n in $SIZES; do
    run=$WORK/n$n
    mkdir -p "$run"
    status=0
    in_srv env TMPDIR="$WORK/tmp" KUBERNETES_BIN="$bin" PROVISIONER="$PROVISIONER" \
        BENCH_WORK="$run" BENCH_CLIENT_NS="$client" BENCH_CLIENT_IP="$client_ip" BENCH_BURST_SCRIPT="$REPO/tests/bench/dhcp-burst.py" \
        BENCH_MACHINES="$n" BENCH_BURST="$BURST" BENCH_RATE="$RATE" BENCH_PERIOD="$PERIOD" \
        timeout 900 "$exe" --ignored --exact cluster::tests::live::bench::status_pipeline_against_kube_apiserver \
        --nocapture --test-threads=1 >"$run/out.log" 2>&1 || status=$?
    grep -vE '^(running|test |$|successes:|failures:|test result)' "$run/out.log" | grep -vE '^\s+cluster::' || true
    check "status pipeline benchmark with $n Machines ran to the end" test "$status" -eq 0
    [ "$status" -eq 0 ] || tail -30 "$run/out.log"
done
leftover=$(pgrep -f "$WORK/" || true)
check "no process of the benchmark left running" test -z "$leftover"
for pid in $leftover; do stop_pid "$pid"; done
finish

#!/bin/bash
# TFTP throughput: an 8 MiB file fetched from a client namespace, from our server and from
# tftpd-hpa (in.tftpd) serving the same directory on the same address, RUNS times each.
# Prints MB/s (10^6 bytes/s, median of the runs) per client/options and the ratio ours/tftpd-hpa.
# curl (blksize 1468 + tsize) and tftp-hpa (plain 512) cannot do windowsize; atftp can
# (RFC 7440), so windowsize rows use atftp. tftpd-hpa ignores windowsize: its rows run lock-step.
# Run as root. Packages: tftpd-hpa, tftp-hpa, curl, atftp.
# Server binary: cargo build -p netboot --example tftp_server (or TFTP_SERVER=...; a release
# build gives fairer figures against the C server: TFTP_SERVER=target/release/examples/tftp_server).
#   RUNS=5 tests/bench/tftp.sh
TEST_NAME=tftpbench
. "$(dirname "$0")/../lib.sh"

RUNS=${RUNS:-5}
SIZE_MIB=${SIZE_MIB:-8}
SERVER=${TFTP_SERVER:-$REPO/target/debug/examples/tftp_server}
[ -x "$SERVER" ] || { echo "FAIL: no $SERVER (cargo build -p netboot --example tftp_server)"; exit 1; }
for tool in in.tftpd curl atftp tftp; do
    command -v "$tool" >/dev/null || { echo "FAIL: $tool missing (tftpd-hpa, curl, atftp, tftp-hpa)"; exit 1; }
done

netns_up
CLI=$(add_client c1)
ip netns exec "$CLI" ip addr add "$SUBNET_PREFIX.50/24" dev eth0

ROOT=$WORK/root
mkdir -p "$ROOT" "$WORK/out"
chmod 755 "$ROOT" # in.tftpd chroots there and drops to user tftp
head -c "${SIZE_MIB}M" /dev/urandom >"$ROOT/payload"
chmod 644 "$ROOT/payload"
SUM=$(sha256sum <"$ROOT/payload" | cut -d' ' -f1)
BYTES=$((SIZE_MIB * 1024 * 1024))

listening() { in_srv ss -Hlun "sport = :69" | grep -q "$SRV_IP:69"; }
wait_listen() { wait_for -p "$1" 10 listening || { echo "FAIL: server did not listen"; exit 1; }; }

# One fetch; prints the elapsed seconds, or fails if the copy differs.
fetch() {
    local out=$WORK/out/payload t0 t1
    rm -f "$out"
    t0=$(date +%s.%N)
    case $1 in
        curl) ip netns exec "$CLI" curl -sS --max-time 120 -o "$out" "tftp://$SRV_IP/payload" --tftp-blksize "$2" ;;
        hpa) (cd "$WORK/out" && ip netns exec "$CLI" timeout 120 tftp -m binary "$SRV_IP" -c get payload payload) ;;
        atftp) ip netns exec "$CLI" timeout 120 atftp -g -r payload -l "$out" --option "blksize $2" \
            --option "windowsize $3" "$SRV_IP" >/dev/null 2>&1 ;;
    esac
    t1=$(date +%s.%N)
    [ "$(sha256sum <"$out" | cut -d' ' -f1)" = "$SUM" ] || { echo "FAIL: $* copy differs" >&2; return 1; }
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f\n", b - a }'
}

# median MB/s over RUNS fetches
measure() {
    local i times=()
    for i in $(seq 1 "$RUNS"); do times+=("$(fetch "$@")") || return 1; done
    printf '%s\n' "${times[@]}" | sort -n | awk -v n="$BYTES" '{ t[NR] = $1 }
        END { m = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2; printf "%.2f\n", n / m / 1e6 }'
}

CASES=("curl 1468" "curl 512" "hpa" "atftp 1468 1" "atftp 1468 8" "atftp 1468 64")
declare -A OURS HPA

pid=$(start_in_srv ours "$SERVER" "$SRV_IP:69" "$ROOT")
wait_listen "$pid"
for c in "${CASES[@]}"; do OURS[$c]=$(measure $c) || exit 1; done
stop_pid "$pid"

pid=$(start_in_srv hpa in.tftpd -L -s "$ROOT" --address "$SRV_IP:69")
wait_listen "$pid"
for c in "${CASES[@]}"; do HPA[$c]=$(measure $c) || exit 1; done
stop_pid "$pid"

echo "TFTP ${SIZE_MIB} MiB, median of $RUNS runs, MB/s; server binary: $SERVER"
printf '%-34s %10s %10s %8s\n' "client (blksize windowsize)" ours tftpd-hpa ratio
for c in "${CASES[@]}"; do
    case $c in
        hpa) label="tftp-hpa (512, no options)" ;;
        curl*) label="curl (${c#curl } + tsize)" ;;
        atftp*) set -- $c; label="atftp ($2 window $3)" ;;
    esac
    printf '%-34s %10s %10s %8s\n' "$label" "${OURS[$c]}" "${HPA[$c]}" \
        "$(awk -v a="${OURS[$c]}" -v b="${HPA[$c]}" 'BEGIN { printf "%.2f", a / b }')"
done
echo "(tftpd-hpa does not implement windowsize: its atftp rows are lock-step)"

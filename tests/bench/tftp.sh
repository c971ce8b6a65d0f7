#!/bin/bash
# TFTP throughput: an 8 MiB file fetched from a client namespace, from our server and from
# tftpd-hpa (in.tftpd) serving the same directory.
#
# Single client: RUNS fetches each, one server after the other on the same address; prints MB/s
# (10^6 bytes/s, median of the runs) per client/options and the ratio ours/tftpd-hpa.
# curl (blksize 1468 + tsize) and tftp-hpa (plain 512) cannot do windowsize; atftp can
# (RFC 7440), so windowsize rows use atftp. tftpd-hpa ignores windowsize: its rows run lock-step.
#
# Concurrent clients: for each N of CLIENTS (20 and 100), N curl processes (blksize 1468 + tsize,
# as UEFI firmware asks) from N addresses of the client namespace, as N machines booting at
# once, start together (they wait on one lock) and each fetch the same file. Both servers run
# side by side (ours on .1, tftpd-hpa on .2) and take turns, CONC_RUNS rounds each. Per server
# and N: aggregate MB/s (N x size / first start to last end) and the slowest client (median of
# the rounds), the ratio, and every client that failed or got other bytes (cksum: CRC and size)
# in any round. The load average is printed at the start of each part.
# Run as root. Packages: tftpd-hpa, tftp-hpa, curl, atftp.
# Server binary: cargo build -p netboot --example tftp_server (or TFTP_SERVER=...; a release
# build gives fairer figures against the C server: TFTP_SERVER=target/release/examples/tftp_server).
# It runs with its defaults, but for max_transfers: TFTP_MAX_TRANSFERS (default 128) so that 100
# clients at once fit (the default 64 answers the rest "busy").
#   RUNS=5 CONC_RUNS=3 CLIENTS="20 100" tests/bench/tftp.sh
TEST_NAME=tftpbench
. "$(dirname "$0")/../lib.sh"

RUNS=${RUNS:-5}
SIZE_MIB=${SIZE_MIB:-8}
CONC_RUNS=${CONC_RUNS:-3}
CLIENTS=${CLIENTS:-20 100}
SINGLE=${SINGLE:-1} # SINGLE=0: only the concurrent part
export TFTP_MAX_TRANSFERS=${TFTP_MAX_TRANSFERS:-128}
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
CKSUM=$(cksum <"$ROOT/payload")
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

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

if [ "$SINGLE" = 1 ]; then
    CASES=("curl 1468" "curl 512" "hpa" "atftp 1468 1" "atftp 1468 8" "atftp 1468 64")
    declare -A OURS HPA

    echo "load average at the start of the single-client part: $(loadavg)"
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
fi

# --- concurrent clients -------------------------------------------------------------------
# storm N SERVER_IP OUT: run inside the client namespace. N curl processes, client i from
# address $SUBNET_PREFIX.(100+i), wait on one lock held by this shell, then fetch; each writes
# "rc start end cksum size" to OUT/i. Bounded: curl --max-time, and the caller's timeout.
storm() {
    local n=$1 ip=$2 out=$3 i
    rm -rf "$out"
    mkdir -p "$out"
    exec 9>"$out/lock"
    flock -x 9
    for i in $(seq 1 "$n"); do
        (
            exec 9>&-
            : >"$out/ready.$i"
            flock -s "$out/lock" true
            t0=$EPOCHREALTIME
            curl -sS --max-time 120 --interface "$SUBNET_PREFIX.$((100 + i))" -o - \
                "tftp://$ip/payload" --tftp-blksize 1468 2>"$out/err.$i" | cksum >"$out/sum.$i"
            rc=${PIPESTATUS[0]}
            echo "$rc $t0 $EPOCHREALTIME $(cat "$out/sum.$i")" >"$out/$i"
        ) &
    done
    # Every client is waiting on the lock: let them all go at once.
    for _ in $(seq 1 300); do
        [ "$(find "$out" -name 'ready.*' | wc -l)" -ge "$n" ] && break
        sleep 0.1
    done
    flock -u 9
    exec 9>&-
    wait
}

# summarize N OUT: "aggregate_MB/s slowest_s failed wrong", and the failures' messages on stderr.
# The aggregate counts the clients that got the whole file, over the time from the first start
# to the last end of any client; the slowest is of all clients.
summarize() {
    local n=$1 out=$2 i failed=0 wrong=0 line
    for i in $(seq 1 "$n"); do
        line=$(cat "$out/$i" 2>/dev/null) || { failed=$((failed + 1)); echo "client $i: no result" >&2; continue; }
        set -- $line
        if [ "$1" != 0 ]; then
            failed=$((failed + 1))
            echo "client $i: curl exit $1: $(head -c 200 "$out/err.$i")" >&2
        elif [ "$4 $5" != "$CKSUM" ]; then
            wrong=$((wrong + 1))
            echo "client $i: got cksum $4 size $5, expected $CKSUM" >&2
        fi
    done
    cat "$out"/[0-9]* 2>/dev/null | awk -v ok=$((n - failed - wrong)) -v bytes="$BYTES" -v f="$failed" -v w="$wrong" '
        NR == 1 || $2 < s { s = $2 } NR == 1 || $3 > e { e = $3 }
        $3 - $2 > slow { slow = $3 - $2 }
        END { printf "%.1f %.3f %d %d\n", (e > s) ? ok * bytes / (e - s) / 1e6 : 0, slow, f, w }'
}

HPA_IP=$SUBNET_PREFIX.2
max_n=0
for n in $CLIENTS; do [ "$n" -gt "$max_n" ] && max_n=$n; done
if [ "$max_n" -gt 0 ]; then
    [ "$max_n" -le 150 ] || { echo "FAIL: at most 150 clients"; exit 1; }
    in_srv ip addr add "$HPA_IP/24" dev br0
    for i in $(seq 1 "$max_n"); do
        ip netns exec "$CLI" ip addr add "$SUBNET_PREFIX.$((100 + i))/24" dev eth0
    done
    ours=$(start_in_srv ours-conc "$SERVER" "$SRV_IP:69" "$ROOT")
    wait_listen "$ours"
    hpa=$(start_in_srv hpa-conc in.tftpd -L -s "$ROOT" --address "$HPA_IP:69")
    wait_for -p "$hpa" 10 bash -c "ip netns exec $NS_SRV ss -Hlun 'sport = :69' | grep -q '$HPA_IP:69'" ||
        { echo "FAIL: tftpd-hpa did not listen"; exit 1; }
    echo
    echo "TFTP ${SIZE_MIB} MiB to N concurrent curl clients (blksize 1468 + tsize), $CONC_RUNS rounds;" \
        "ours with max_transfers $TFTP_MAX_TRANSFERS"
    printf '%-5s %-10s %10s %8s %12s %8s %8s   %s\n' N server "MB/s" ratio "slowest (s)" failed wrong "load at start"
    for n in $CLIENTS; do
        declare -A agg=() slow=() bad=() miss=()
        for r in $(seq 1 "$CONC_RUNS"); do
            for s in ours hpa; do
                [ $s = ours ] && ip=$SRV_IP || ip=$HPA_IP
                load=$(loadavg)
                [ "$r" = 1 ] && eval "load_$s=\$load"
                timeout 300 ip netns exec "$CLI" bash -c "SUBNET_PREFIX=$SUBNET_PREFIX; $(declare -f storm); storm $n $ip $WORK/conc" ||
                    echo "storm of $n clients against $s: exit $?" >&2
                set -- $(summarize "$n" "$WORK/conc" 2> >(sed "s/^/[$s N=$n round $r] /" >&2))
                agg[$s]+="$1 "
                slow[$s]+="$2 "
                bad[$s]=$(( ${bad[$s]:-0} + $3 ))
                miss[$s]=$(( ${miss[$s]:-0} + $4 ))
            done
        done
        median() { printf '%s\n' $1 | sort -n | awk '{ t[NR] = $1 } END { print (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2 }'; }
        a_ours=$(median "${agg[ours]}")
        a_hpa=$(median "${agg[hpa]}")
        printf '%-5s %-10s %10s %8s %12s %8s %8s   %s\n' "$n" ours "$a_ours" \
            "$(awk -v a="$a_ours" -v b="$a_hpa" 'BEGIN { printf "%.2f", a / b }')" "$(median "${slow[ours]}")" \
            "${bad[ours]}" "${miss[ours]}" "$load_ours"
        printf '%-5s %-10s %10s %8s %12s %8s %8s   %s\n' "$n" tftpd-hpa "$a_hpa" "" "$(median "${slow[hpa]}")" \
            "${bad[hpa]}" "${miss[hpa]}" "$load_hpa"
        echo "      rounds, MB/s: ours ${agg[ours]}; tftpd-hpa ${agg[hpa]}"
        unset agg slow bad miss
    done
    stop_pid "$ours"
    stop_pid "$hpa"
    rm -rf "$WORK/conc"
fi

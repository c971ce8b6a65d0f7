#!/bin/bash
# TFTP server against real clients (tftp-hpa, curl, atftp) across network namespaces:
# downloads compared by sha256, block-number rollover, path confinement, write refusal, and a
# server killed and restarted in the middle of a batch of transfers (the link throttled so that
# none of them can finish before the kill, however fast the machine).
# Needs: root, iproute2, tftp-hpa, curl, atftp; the server binary from
#   cargo build -p netboot --example tftp_server   (or TFTP_SERVER=/path/to/binary)
TEST_NAME=tftp
source "$(dirname "$0")/lib.sh"

SERVER=${TFTP_SERVER:-$REPO/target/debug/examples/tftp_server}
[ -x "$SERVER" ] || { fail "no server binary $SERVER (cargo build -p netboot --example tftp_server)"; finish; }
for tool in tftp curl atftp sha256sum; do
    command -v "$tool" >/dev/null || { fail "missing client tool $tool"; finish; }
done

netns_up
CLI=$(add_client c1)
ip netns exec "$CLI" ip addr add "$SUBNET_PREFIX.50/24" dev eth0
in_cli() { ip netns exec "$CLI" "$@"; }

ROOT=$WORK/root
OUT=$WORK/out
mkdir -p "$ROOT/sub" "$OUT"
: >"$ROOT/empty"
head -c 1024 /dev/urandom >"$ROOT/exact1024"
head -c 100000 /dev/urandom >"$ROOT/sub/small"
head -c 8M /dev/urandom >"$ROOT/big8"
# More than 65535 blocks of 512 bytes: the block number rolls over.
head -c 33M /dev/urandom >"$ROOT/big33"
for i in $(seq 1 8); do head -c 3M /dev/urandom >"$ROOT/batch$i"; done
echo "outside the root" >"$WORK/secret"
ln -s /etc/passwd "$ROOT/leak"
ln -s "$WORK/secret" "$ROOT/sub/leak2"

SERVER_PID=
listening() { in_srv ss -Hlun "sport = :69" | grep -q "$SRV_IP:69"; }
start_server() {
    SERVER_PID=$(start_in_srv "tftpd-$1" "$SERVER" "$SRV_IP:69" "$ROOT")
    wait_for -p "$SERVER_PID" 10 listening && return 0
    fail "server did not start: $(cat "$WORK/tftpd-$1.log")"
    finish
}

# same SRC DST: sha256 of the served file and the downloaded copy agree.
same() {
    [ -f "$2" ] || { log "$2 missing"; return 1; }
    local a b
    a=$(sha256sum <"$1" | cut -d' ' -f1)
    b=$(sha256sum <"$2" | cut -d' ' -f1)
    [ "$a" = "$b" ] || { log "$2: sha256 $b, expected $a"; return 1; }
}
# tftp-hpa exits 0 even on errors: it prints "Error code N: message" instead.
hpa_get() { (cd "$OUT" && in_cli timeout 120 tftp -m binary "$SRV_IP" -c get "$1" "$2") 2>&1; }
hpa_error() { # NAME CODE: the server refuses NAME with TFTP error CODE
    local out
    out=$(hpa_get "$1" refused) || true
    log "tftp-hpa get $1: $out"
    [[ $out == *"Error code $2:"* ]] && ! grep -q "root:" "$OUT/refused" 2>/dev/null
}
curl_get() { in_cli curl -sS --max-time 60 -o "$OUT/$2" "tftp://$SRV_IP/$1" "${@:3}"; }
curl_rc() { # NAME RC [ARGS]: curl fails with exit code RC (68 not found, 69 access violation)
    local rc=0
    in_cli curl -sS --max-time 20 -o "$OUT/refused" "tftp://$SRV_IP/$1" "${@:3}" 2>/dev/null || rc=$?
    log "curl $1: exit $rc"
    [ "$rc" = "$2" ] && ! grep -q "root:" "$OUT/refused" 2>/dev/null
}

start_server 1

# tftp-hpa sends plain RFC 1350 requests: no options, 512-byte blocks.
for f in empty exact1024 sub/small big8; do
    hpa_get "$f" "hpa-${f//\//_}" >/dev/null
    check "tftp-hpa get $f" same "$ROOT/$f" "$OUT/hpa-${f//\//_}"
done
t0=$(date +%s.%N)
hpa_get big33 hpa-big33 >/dev/null
log "tftp-hpa 33 MiB in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
check "tftp-hpa get 33 MiB (block number rolls over past 65535)" same "$ROOT/big33" "$OUT/hpa-big33"

# curl sends tsize and blksize.
for bs in 512 1468; do
    curl_get big8 "curl-$bs" --tftp-blksize "$bs" || true
    check "curl blksize $bs (with tsize)" same "$ROOT/big8" "$OUT/curl-$bs"
done
curl_get sub/small curl-noopt --tftp-no-options || true
check "curl without options" same "$ROOT/sub/small" "$OUT/curl-noopt"

# atftp negotiates windowsize (RFC 7440).
for opts in "blksize 1468;windowsize 8" "blksize 8192;windowsize 64" "blksize 512;windowsize 2"; do
    args=()
    IFS=';' read -ra pairs <<<"$opts"
    for p in "${pairs[@]}"; do args+=(--option "$p"); done
    in_cli timeout 120 atftp -g -r big8 -l "$OUT/atftp" "${args[@]}" "$SRV_IP" >/dev/null 2>&1 || true
    check "atftp $opts" same "$ROOT/big8" "$OUT/atftp"
    rm -f "$OUT/atftp"
done

# Confinement: nothing outside the root, whatever the client asks.
check "tftp-hpa ../etc/passwd refused (error 2)" hpa_error ../etc/passwd 2
check "tftp-hpa sub/../../secret refused (error 2)" hpa_error sub/../../secret 2
check "tftp-hpa /etc/passwd is relative to the root: not found (error 1)" hpa_error /etc/passwd 1
check "tftp-hpa symlink to /etc/passwd refused (error 2)" hpa_error leak 2
check "tftp-hpa symlink to a file outside refused (error 2)" hpa_error sub/leak2 2
check "tftp-hpa directory refused (error 2)" hpa_error sub 2
check "curl ../etc/passwd refused (access violation)" curl_rc ../etc/passwd 69 --path-as-is
check "curl //etc/passwd not found" curl_rc /etc/passwd 68
check "curl symlink escape refused (access violation)" curl_rc leak 69
put_out=$( (cd "$ROOT" && in_cli tftp -m binary "$SRV_IP" -c put empty uploaded) 2>&1 || true)
log "tftp-hpa put: $put_out"
check "write request refused (error 2), nothing written" \
    bash -c "[[ '$put_out' == *'Error code 2:'* ]] && [ ! -e '$ROOT/uploaded' ]"
check "server still running after all of the above" kill -0 "$SERVER_PID"

# Restart in the middle of a batch: kill the server by PID while transfers run, start it again,
# fetch again what did not complete. Every file must end up identical. The server's side of the
# link is throttled to 512 kbit/s for the batch, so one 3 MiB file alone takes at least 49 s:
# the server is killed once every transfer has its first block, within 20 s of the start, when
# none can have finished.
rm -f "$OUT"/batch*
in_srv tc qdisc add dev "vc1$$" root tbf rate 512kbit burst 16kb latency 1s
batch_pids=()
for i in $(seq 1 8); do
    batch_pids+=("$(start_in "$CLI" "batch$i" curl -s --max-time 120 -o "$OUT/batch$i" "tftp://$SRV_IP/batch$i" --tftp-blksize 512)")
done
all_begun() { local i; for i in $(seq 1 8); do [ -s "$OUT/batch$i" ] || return 1; done; }
check "every transfer of the batch has begun" wait_for 20 all_begun
kill -9 "$SERVER_PID"
log "killed server $SERVER_PID during the batch; sizes: $(cd "$OUT" && stat -c %s batch? 2>/dev/null | tr '\n' ' ')"
in_srv tc qdisc del dev "vc1$$" root
wait_for 10 not alive "$SERVER_PID" || true
start_server 2
# Their server is gone: these transfers cannot complete any more.
for p in "${batch_pids[@]}"; do stop_pid "$p"; done
cut=0
for i in $(seq 1 8); do same "$ROOT/batch$i" "$OUT/batch$i" 2>/dev/null || cut=$((cut + 1)); done
check "the restart cut all 8 transfers in flight ($cut cut)" test "$cut" -eq 8
for round in 1 2; do
    for i in $(seq 1 8); do
        same "$ROOT/batch$i" "$OUT/batch$i" 2>/dev/null && continue
        curl_get "batch$i" "batch$i" --tftp-blksize 1468 || true
    done
done
all_same() { local i; for i in $(seq 1 8); do same "$ROOT/batch$i" "$OUT/batch$i" || return 1; done; }
check "after the restart every file of the batch matches" all_same

finish

#!/bin/bash
# Denial-of-service attacks against `provisioner netboot` (HTTP, TFTP) and `provisioner
# imageserver` (a pull-through cache of a python http.server upstream), from an attacker
# namespace with 100 addresses (10.77.0.100-199), while a legitimate client (node2's MAC,
# 10.77.0.20) keeps asking for a DHCP lease (busybox udhcpc), the kernel over HTTP (curl,
# sha256), the image from the imageserver (curl, sha256) and the BIOS loader over TFTP
# (tftp-hpa, sha256). Every attack is bounded in time and count (tests/attack.py):
#
#   slowloris    1000 connections to each server, one header line every 2 s, from 50 addresses
#   slow-read    512 connections to each server asking for a 20 MiB file with a 4 KiB
#                receive buffer, never reading
#   TFTP flood   read requests never acknowledged, 300/s for 15 s from 100 addresses
#   timeout=255  read requests with timeout=255 from one address, 100/s for 10 s
#   misses       5000 requests for 200 names the upstream lacks (nested paths)
#   FIFO         a FIFO in each served directory (HTTP assets, TFTP root, imageserver)
#
# Each has a check: the legitimate client is served in every round while it runs, and a figure
# of the server's own (connections closed, descriptors, directories, upstream requests…). netboot
# runs with a 1024-descriptor limit (its HTTP cap drops to 384 to fit) and small deadlines
# (headerTimeout 5 s, writeTimeout 5 s, 16 connections and 4 TFTP transfers per address). The
# resident memory of both servers is sampled throughout and must stay under RSS_MAX_MB (200 by
# default, for the debug build; unit MemoryMax= is 256M). A table of the attacks and their
# figures is printed at the end, with the rows of tests/attack-hijack.sh (the hijack of a
# machine's token from another host, and DHCP, TFTP and HTTP floods against the journal's rate
# limit), which runs last: one table for every attack of issue 11.
TEST_NAME=attack
# shellcheck source=tests/lib.sh
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || { echo "FAIL $TEST_NAME: must run as root"; exit 1; }
for tool in curl tftp busybox python3 prlimit ss sha256sum; do
    command -v "$tool" >/dev/null || { echo "FAIL $TEST_NAME: $tool not installed"; exit 1; }
done
[ -x "$PROVISIONER" ] || { echo "FAIL $TEST_NAME: no $PROVISIONER (cargo build -p agent)"; exit 1; }
RSS_MAX_MB=${RSS_MAX_MB:-200}
ATTACK=$REPO/tests/attack.py
# The attack scripts hold a thousand sockets or more.
ulimit -n 16384

MAC=52:54:00:12:34:56
LEGIT_IP=$SUBNET_PREFIX.20
HTTP=$SRV_IP:8080
IMG=$SRV_IP:8081
UP=$SRV_IP:8082
ATK_ALL=$SUBNET_PREFIX.100-$SUBNET_PREFIX.199

mkdir -p "$WORK/assets" "$WORK/ipxe" "$WORK/cache" "$WORK/upstream" "$WORK/machines" "$WORK/out"
head -c 20M /dev/urandom >"$WORK/assets/vmlinuz"
head -c 1M /dev/urandom >"$WORK/assets/initrd.img"
head -c 70000 /dev/urandom >"$WORK/ipxe/undionly.kpxe"
stub_boot_files "$WORK/ipxe" snponly.efi
head -c 20M /dev/urandom >"$WORK/cache/image.raw"
sha() { sha256sum <"$1" | cut -d' ' -f1; }
SHA_KERNEL=$(sha "$WORK/assets/vmlinuz")
SHA_IMAGE=$(sha "$WORK/cache/image.raw")
SHA_LOADER=$(sha "$WORK/ipxe/undionly.kpxe")
api_version=$(sed -n 's/.*API_VERSION: &str = "\(.*\)";/\1/p' "$REPO/agent/src/machines/folder.rs")
cat >"$WORK/machines/node2.yaml" <<EOF
apiVersion: ${api_version:-provisioner.dev/v1alpha1}
kind: Machine
metadata:
  name: node2
spec:
  macAddress: "$MAC"
  ipAddress: $LEGIT_IP
EOF
cat >"$WORK/provisioner.yaml" <<EOF
interface: br0
routerAdvertisements: false
serverAddress: $SRV_IP
subnet: $SUBNET_PREFIX.0/24
leaseTime: 600
bootFiles:
  ipxeDir: $WORK/ipxe
  assetsDir: $WORK/assets
boot:
  kernel: vmlinuz
  initrd: initrd.img
listen:
  dhcp: 0.0.0.0:67
  tftp: $SRV_IP:69
  http: $HTTP
inventory:
  directory: $WORK/machines
stateFile: $WORK/state.yaml
limits:
  http:
    headerTimeout: 5
    writeTimeout: 5
    maxConnectionsPerPeer: 16
  tftp:
    maxTransfersPerPeer: 4
EOF

netns_up
LEGIT=$(add_client legit "$MAC")
ip netns exec "$LEGIT" ip addr add "$LEGIT_IP/24" dev eth0
ATK=$(add_client atk)
for i in $(seq 100 199); do ip netns exec "$ATK" ip addr add "$SUBNET_PREFIX.$i/24" dev eth0; done
in_legit() { ip netns exec "$LEGIT" "$@"; }
in_atk() { ip netns exec "$ATK" "$@"; }

RUST_LOG=info start_in_srv netboot prlimit --nofile=1024:1024 "$PROVISIONER" netboot --config "$WORK/provisioner.yaml" >/dev/null
NETBOOT_PID=$(cat "$WORK/netboot.pid")
start_in_srv upstream python3 -m http.server --bind "$SRV_IP" --directory "$WORK/upstream" 8082 >/dev/null
RUST_LOG=info start_in_srv imageserver "$PROVISIONER" imageserver --dir "$WORK/cache" --listen "$IMG" \
    --upstream "http://$UP/" --header-timeout 5 --write-timeout 5 --max-connections-per-peer 16 >/dev/null
IMG_PID=$(cat "$WORK/imageserver.pid")
ready() { in_legit curl -s -o /dev/null --max-time 1 "http://$1/$2"; }
all_ready() { ready "$HTTP" assets/initrd.img && ready "$IMG" image.raw && ready "$UP" ""; }
if ! wait_for 15 all_ready; then
    fail "servers answer"
    tail -20 "$WORK/netboot.log" "$WORK/imageserver.log" >&2
    finish
fi
cap_line=$(grep -m1 'HTTP server listening' "$WORK/netboot.log" || true)
cap=$(sed -n 's/.*max_connections=\([0-9]*\).*/\1/p' <<<"$cap_line")
log "netboot under a 1024-descriptor limit: HTTP connection cap ${cap:-?}"
check "netboot's HTTP cap fits its descriptor limit (${cap:-?} <= (1024 - 256) / 2)" \
    bash -c '[ -n "$1" ] && [ "$1" -le 384 ]' _ "$cap"

# --- the legitimate client, the resource sampler ----------------------------------------------
cat >"$WORK/udhcpc.sh" <<'SH'
#!/bin/sh
[ "$1" = bound ] && echo "bound ip=$ip" >>"$OUT"
exit 0
SH
chmod +x "$WORK/udhcpc.sh"
# One round: DHCP, HTTP kernel, imageserver image, TFTP loader; prints "dhcp http img tftp secs"
# (1 = served and byte-exact).
legit_round() {
    local t0 dhcp=0 http=0 img=0 tftp=0 out=$WORK/out
    t0=$(date +%s%N)
    rm -f "$out/lease" "$out/loader"
    OUT=$out/lease in_legit busybox udhcpc -i eth0 -s "$WORK/udhcpc.sh" -q -n -f -t 3 -T 1 >/dev/null 2>&1 || true
    grep -q "ip=$LEGIT_IP\$" "$out/lease" 2>/dev/null && dhcp=1
    [ "$(in_legit curl -s --max-time 20 "http://$HTTP/assets/vmlinuz" | sha256sum | cut -d' ' -f1)" = "$SHA_KERNEL" ] && http=1
    [ "$(in_legit curl -s --max-time 20 "http://$IMG/image.raw" | sha256sum | cut -d' ' -f1)" = "$SHA_IMAGE" ] && img=1
    (cd "$out" && in_legit timeout 20 tftp -m binary "$SRV_IP" -c get undionly.kpxe loader >/dev/null 2>&1) || true
    [ -f "$out/loader" ] && [ "$(sha "$out/loader")" = "$SHA_LOADER" ] && tftp=1
    echo "$dhcp $http $img $tftp $(( ($(date +%s%N) - t0) / 1000000 ))"
}
# legit_loop FILE: rounds until $WORK/stop exists.
legit_loop() {
    while [ ! -e "$WORK/stop" ]; do legit_round >>"$1"; sleep 0.3; done
}
# The servers' resident memory (KiB), open descriptors and established HTTP connections.
sample() {
    local n_rss n_fd i_rss i_fd n_est i_est
    n_rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$NETBOOT_PID/status" 2>/dev/null || echo 0)
    i_rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$IMG_PID/status" 2>/dev/null || echo 0)
    n_fd=$(ls "/proc/$NETBOOT_PID/fd" 2>/dev/null | wc -l || true)
    i_fd=$(ls "/proc/$IMG_PID/fd" 2>/dev/null | wc -l || true)
    n_est=$(in_srv ss -Htn state established "( sport = :8080 )" | wc -l || true)
    i_est=$(in_srv ss -Htn state established "( sport = :8081 )" | wc -l || true)
    echo "$(date +%s%N) $n_rss $n_fd $n_est $i_rss $i_fd $i_est"
}
sampler() { while [ ! -e "$WORK/stop" ]; do sample >>"$1"; sleep 0.5; done; }

ROWS=()
# row ATTACK LOAD FIGURES LEGIT VERDICT
row() { ROWS+=("$(printf '%-13s | %-34s | %-62s | %-24s | %s' "$@")"); }

# phase NAME: starts the legitimate client and the sampler; end_phase stops them and sets
# LEGIT_SUMMARY/LEGIT_OK and the samples' maxima.
phase() {
    PHASE=$1
    rm -f "$WORK/stop"
    : >"$WORK/legit-$PHASE"
    : >"$WORK/samples-$PHASE"
    legit_loop "$WORK/legit-$PHASE" &
    LEGIT_PID=$!
    sampler "$WORK/samples-$PHASE" &
    SAMPLER_PID=$!
    PHASE_T0=$(date +%s%N)
}
end_phase() {
    touch "$WORK/stop"
    wait "$LEGIT_PID" "$SAMPLER_PID" 2>/dev/null || true
    local f=$WORK/legit-$PHASE
    ROUNDS=$(wc -l <"$f")
    BAD=$(awk '$1 != 1 || $2 != 1 || $3 != 1 || $4 != 1' "$f" | wc -l)
    SLOWEST=$(awk 'BEGIN {m = 0} $5 > m {m = $5} END {printf "%.1f", m / 1000}' "$f")
    LEGIT_SUMMARY="$((ROUNDS - BAD))/$ROUNDS rounds, max ${SLOWEST}s"
    if [ "$ROUNDS" -ge 1 ] && [ "$BAD" -eq 0 ]; then LEGIT_OK=0; else LEGIT_OK=1; fi
    [ "$LEGIT_OK" = 0 ] || log "$PHASE: legitimate rounds (dhcp http img tftp ms):"$'\n'"$(cat "$f")"
    read -r MAX_NRSS MAX_NFD MAX_NEST MAX_IRSS MAX_IFD MAX_IEST < <(awk '
        {for (i = 2; i <= 7; i++) if ($i > m[i]) m[i] = $i}
        END {print m[2] + 0, m[3] + 0, m[4] + 0, m[5] + 0, m[6] + 0, m[7] + 0}' "$WORK/samples-$PHASE")
}
# samples_after SECONDS COLUMN: the largest value of a sample column (3 netboot fds, 4 netboot
# established, 6 imageserver fds, 7 imageserver established) from SECONDS into the phase.
samples_after() {
    awk -v t0="$PHASE_T0" -v after="$1" -v c="$2" \
        '($1 - t0) / 1e9 >= after && $c > m {m = $c} END {print m + 0}' "$WORK/samples-$PHASE"
}
json() { python3 -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1], {}, d))' "$2" <<<"$1"; }
verdict() { [ "$1" = 0 ] && echo PASS || echo FAIL; }

# Baseline: one legitimate round with no attack.
base=$(legit_round)
log "baseline round (dhcp http img tftp ms): $base"
check "the legitimate client is served without an attack" [ "${base% *}" = "1 1 1 1" ]
sample >"$WORK/samples-base"
read -r _ BASE_NRSS BASE_NFD _ BASE_IRSS BASE_IFD _ <"$WORK/samples-base"
log "baseline: netboot RSS $((BASE_NRSS / 1024)) MiB, $BASE_NFD descriptors; imageserver RSS $((BASE_IRSS / 1024)) MiB, $BASE_IFD descriptors"

# --- 1. slowloris against both HTTP servers -------------------------------------------------
phase slowloris
in_atk python3 "$ATTACK" slowloris "$SRV_IP" 8080 --sources "$SUBNET_PREFIX.100-$SUBNET_PREFIX.149" \
    --conns 1000 --every 2 --duration 20 >"$WORK/slowloris-netboot.json" &
p1=$!
in_atk python3 "$ATTACK" slowloris "$SRV_IP" 8081 --sources "$SUBNET_PREFIX.150-$SUBNET_PREFIX.199" \
    --conns 1000 --every 2 --duration 20 >"$WORK/slowloris-img.json" &
p2=$!
wait "$p1" "$p2" || true
end_phase
n=$(cat "$WORK/slowloris-netboot.json" 2>/dev/null || true) i=$(cat "$WORK/slowloris-img.json" 2>/dev/null || true)
log "slowloris: netboot $n; imageserver $i"
n_open=$(json "$n" opened 2>/dev/null || echo 0) n_max=$(json "$n" lifetime_max_s 2>/dev/null || echo 99)
i_open=$(json "$i" opened 2>/dev/null || echo 0) i_max=$(json "$i" lifetime_max_s 2>/dev/null || echo 99)
check "slowloris: the legitimate client is served in every round ($LEGIT_SUMMARY)" [ "$LEGIT_OK" = 0 ]
# Every connection is closed by the server (header deadline 5 s, or sooner to make room).
ok=0; awk -v a="$n_max" -v b="$i_max" 'BEGIN {exit !(a != "None" && b != "None" && a < 9 && b < 9)}' || ok=1
check "slowloris: no connection is held longer than the 5 s header deadline (+4 s), netboot ${n_max}s, imageserver ${i_max}s" [ "$ok" = 0 ]
row slowloris "1000 conns/server, 1 line/2s, 20 s" \
    "opened $n_open+$i_open; longest held ${n_max}s/${i_max}s; fds max $MAX_NFD/$MAX_IFD" \
    "$LEGIT_SUMMARY" "$(verdict $((LEGIT_OK + ok)))"

# --- 2. slow-read of a 20 MiB file from both servers ----------------------------------------
phase slowread
in_atk python3 "$ATTACK" slowread "$SRV_IP" 8080 /assets/vmlinuz --sources "$SUBNET_PREFIX.100-$SUBNET_PREFIX.131" \
    --conns 512 --duration 20 >"$WORK/slowread-netboot.json" &
p1=$!
in_atk python3 "$ATTACK" slowread "$SRV_IP" 8081 /image.raw --sources "$SUBNET_PREFIX.150-$SUBNET_PREFIX.181" \
    --conns 512 --duration 20 >"$WORK/slowread-img.json" &
p2=$!
wait "$p1" "$p2" || true
end_phase
n=$(cat "$WORK/slowread-netboot.json" 2>/dev/null || true) i=$(cat "$WORK/slowread-img.json" 2>/dev/null || true)
# From 14 s in (well past the 5 s write deadline) while the attacker still holds its sockets.
late_nest=$(samples_after 14 4) late_iest=$(samples_after 14 7)
late_nfd=$(samples_after 14 3) late_ifd=$(samples_after 14 6)
log "slow-read: netboot $n; imageserver $i; after 14 s: established $late_nest/$late_iest, descriptors $late_nfd/$late_ifd"
check "slow-read: the legitimate client is served in every round ($LEGIT_SUMMARY)" [ "$LEGIT_OK" = 0 ]
ok=0; [ "$late_nest" -le 10 ] && [ "$late_iest" -le 10 ] || ok=1
check "slow-read: stalled connections are closed by the write deadline (established after 14 s: $late_nest, $late_iest)" [ "$ok" = 0 ]
ok2=0; [ "$MAX_NFD" -lt 1000 ] || ok2=1
check "slow-read: netboot stays under its 1024 descriptors (max $MAX_NFD)" [ "$ok2" = 0 ]
row slow-read "512 conns/server, 4 KiB window, 20 s" \
    "established max $MAX_NEST/$MAX_IEST, after 14 s $late_nest/$late_iest; fds max $MAX_NFD/$MAX_IFD" \
    "$LEGIT_SUMMARY" "$(verdict $((LEGIT_OK + ok + ok2)))"

# --- 3. never-acknowledged TFTP flood -------------------------------------------------------
phase tftp-flood
t=$(in_atk python3 "$ATTACK" tftp-flood "$SRV_IP" --sources "$ATK_ALL" --rate 300 --duration 15 || true)
end_phase
log "TFTP flood: $t"
started=$(json "$t" transfers_started 2>/dev/null || echo ?) busy=$(json "$t" busy 2>/dev/null || echo ?)
requests=$(json "$t" requests 2>/dev/null || echo ?) stopped=$(json "$t" error_other 2>/dev/null || echo ?)
check "TFTP flood: the legitimate client is served in every round ($LEGIT_SUMMARY)" [ "$LEGIT_OK" = 0 ]
row "TFTP no-ACK" "$requests RRQs, 100 addresses, 15 s" "$started started, $stopped stopped for newer ones, $busy busy; RSS max $((MAX_NRSS / 1024)) MiB" \
    "$LEGIT_SUMMARY" "$(verdict "$LEGIT_OK")"

# --- 4. timeout=255 from one address --------------------------------------------------------
phase timeout255
t=$(in_atk python3 "$ATTACK" tftp-flood "$SRV_IP" --sources "$SUBNET_PREFIX.150" --rate 100 --duration 10 \
    --sockets 64 --option timeout=255 --option tsize=0 --option blksize=1468 || true)
flood_end=$(date +%s%N)
end_phase
log "timeout=255 flood: $t"
started=$(json "$t" transfers_started 2>/dev/null || echo 99) with_timeout=$(json "$t" oack_with_timeout 2>/dev/null || echo 99)
busy=$(json "$t" busy 2>/dev/null || echo ?) requests=$(json "$t" requests 2>/dev/null || echo ?)
# The same address is served again once its silent transfers gave up (1 s x 6 tries each).
served_again() {
    in_atk curl -s --max-time 5 --interface "$SUBNET_PREFIX.150" -o "$WORK/out/again" "tftp://$SRV_IP/undionly.kpxe" &&
        [ "$(sha "$WORK/out/again")" = "$SHA_LOADER" ]
}
again=fail
wait_for 15 served_again && again=$(( ($(date +%s%N) - flood_end) / 1000000 ))
log "the flooding address served again ${again} ms after its flood"
check "timeout=255: the legitimate client is served in every round ($LEGIT_SUMMARY)" [ "$LEGIT_OK" = 0 ]
check "timeout=255: no OACK acknowledges the timeout ($with_timeout of them did)" [ "$with_timeout" = 0 ]
# 4 at a time, each given up after 6 s: over the 11 s of the flood at most 4 x 3.
check "timeout=255: one address holds at most its share of 4 transfers ($started started over 10 s)" [ "$started" -le 12 ]
check "timeout=255: the address is served again within 15 s (${again} ms after its flood)" [ "$again" != fail ]
row "timeout=255" "$requests RRQs from one address, 10 s" "$started transfers, $with_timeout OACKs with timeout, $busy busy; served again in ${again} ms" \
    "$LEGIT_SUMMARY" "$(verdict $((LEGIT_OK)))"

# --- 5. anonymous misses at the imageserver -------------------------------------------------
up_before=$(grep -c '"GET /miss-' "$WORK/upstream.log" || true)
phase misses
# 4 at a time: well under the 16-connection share of one address (the point here is the
# cache, not the connection cap).
m=$(in_atk python3 "$ATTACK" misses "$SRV_IP" 8081 --names 200 --repeat 25 --threads 4 || true)
end_phase
up=$(( $(grep -c '"GET /miss-' "$WORK/upstream.log" || true) - up_before ))
dirs=$(find "$WORK/cache" -mindepth 1 -type d | wc -l)
secs=$(json "$m" seconds 2>/dev/null || echo 0) statuses=$(json "$m" statuses 2>/dev/null || echo ?)
# One upstream request per name per 10 s (the negative cache), never two per request.
allowed=$(awk -v s="$secs" 'BEGIN {printf "%d", 200 * (1 + int(s / 10))}')
log "misses: $m; upstream GETs $up (allowed $allowed); directories in the cache $dirs"
check "misses: every request is a 404 ($statuses)" [ "$statuses" = "{'404': 5000}" ]
check "misses: the imageserver created no directory ($dirs)" [ "$dirs" = 0 ]
check "misses: the upstream was asked at most once per name per 10 s ($up for 5000 requests, allowed $allowed)" \
    bash -c '[ "$1" -ge 200 ] && [ "$1" -le "$2" ]' _ "$up" "$allowed"
check "misses: the legitimate client is served in every round ($LEGIT_SUMMARY)" [ "$LEGIT_OK" = 0 ]
row misses "5000 GETs of 200 missing names, ${secs} s" "$up upstream GETs, $dirs directories created" \
    "$LEGIT_SUMMARY" "$(verdict $((LEGIT_OK)))"

# --- 6. a FIFO in every served directory ----------------------------------------------------
for d in assets ipxe cache; do mkfifo "$WORK/$d/fifo"; done
phase fifo
ms() { local t0; t0=$(date +%s%N); "$@" >/dev/null 2>&1 || true; echo $(( ($(date +%s%N) - t0) / 1000000 )); }
code() { in_atk curl -s -o /dev/null --max-time 10 -w '%{http_code}' "$1" || true; }
http_code=$(code "http://$HTTP/assets/fifo") img_code=$(code "http://$IMG/fifo")
http_ms=$(ms in_atk curl -s --max-time 10 "http://$HTTP/assets/fifo")
img_ms=$(ms in_atk curl -s --max-time 10 "http://$IMG/fifo")
tftp_out=$(cd "$WORK/out" && in_atk timeout 10 tftp -m binary "$SRV_IP" -c get fifo fifo.got 2>&1 || true)
tftp_ms=$(ms bash -c "cd '$WORK/out' && ip netns exec '$ATK' timeout 10 tftp -m binary '$SRV_IP' -c get fifo fifo.got")
# 600 from 100 addresses, 100 at a time: far more than the runtime's 64 blocking threads, each
# of which a blocking open would hold for good (curl would then give up after 10 s: 000).
t0=$(date +%s%N)
many=$(seq 1 600 | awk -v p="$SUBNET_PREFIX" '{print p "." 100 + $1 % 100}' |
    in_atk xargs -P 100 -I{} curl -s -o /dev/null --max-time 10 --interface {} -w '%{http_code}\n' "http://$HTTP/assets/fifo" |
    sort | uniq -c | tr -s ' ' | tr '\n' ';' || true)
many_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
end_phase
up_fifo=$(grep -c '"GET /fifo' "$WORK/upstream.log" || true)
log "FIFO: netboot $http_code in $http_ms ms, imageserver $img_code in $img_ms ms (upstream asked $up_fifo times), TFTP '$tftp_out' in $tftp_ms ms; 600 at once: $many in $many_ms ms"
check "FIFO: netboot refuses /assets/fifo at once ($http_code in $http_ms ms)" bash -c '[ "$1" = 404 ] && [ "$2" -lt 2000 ]' _ "$http_code" "$http_ms"
check "FIFO: the imageserver refuses it at once, without asking upstream ($img_code in $img_ms ms)" \
    bash -c '[ "$1" = 404 ] && [ "$2" -lt 2000 ] && [ "$3" = 0 ]' _ "$img_code" "$img_ms" "$up_fifo"
check "FIFO: TFTP refuses it at once (error 2 in $tftp_ms ms)" bash -c '[[ $1 == *"Error code 2"* ]] && [ "$2" -lt 2000 ]' _ "$tftp_out" "$tftp_ms"
check "FIFO: 600 requests, 100 at a time, are all refused ($many in $many_ms ms)" [ "$many" = " 600 404;" ]
check "FIFO: the legitimate client is served in every round ($LEGIT_SUMMARY)" [ "$LEGIT_OK" = 0 ]
row FIFO "600 GETs at once + TFTP + imageserver" "404 in $http_ms ms, $img_ms ms; TFTP error 2 in $tftp_ms ms; 600 in $many_ms ms" \
    "$LEGIT_SUMMARY" "$(verdict "$LEGIT_OK")"

# --- memory over the whole run ----------------------------------------------------------------
n_hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$NETBOOT_PID/status" 2>/dev/null || echo 0)
i_hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$IMG_PID/status" 2>/dev/null || echo 0)
log "peak RSS: netboot $((n_hwm / 1024)) MiB (baseline $((BASE_NRSS / 1024))), imageserver $((i_hwm / 1024)) MiB (baseline $((BASE_IRSS / 1024)))"
check "peak RSS of netboot $((n_hwm / 1024)) MiB < $RSS_MAX_MB MiB" [ "$n_hwm" -lt $((RSS_MAX_MB * 1024)) ]
check "peak RSS of the imageserver $((i_hwm / 1024)) MiB < $RSS_MAX_MB MiB" [ "$i_hwm" -lt $((RSS_MAX_MB * 1024)) ]
check "both servers are still running" kill -0 "$NETBOOT_PID" "$IMG_PID"
emfile=$(cat "$WORK/netboot.log" "$WORK/imageserver.log" | grep -ci 'too many open files' || true)
check "no descriptor ran out in either server ($emfile 'Too many open files' in their logs)" [ "$emfile" = 0 ]
row "RSS" "the whole run" "peak netboot $((n_hwm / 1024)) MiB, imageserver $((i_hwm / 1024)) MiB (bound $RSS_MAX_MB)" "-" \
    "$(verdict $(( n_hwm < RSS_MAX_MB * 1024 && i_hwm < RSS_MAX_MB * 1024 ? 0 : 1 )))"
limits_lines=$(cat "$WORK/netboot.log" "$WORK/imageserver.log" | grep -c 'limits applied' || true)
log "limit counters logged: $limits_lines lines; last: $(grep 'limits applied' "$WORK/netboot.log" | tail -2 | tr '\n' ' ')"

# --- the hijack and the log flood (tests/attack-hijack.sh) -----------------------------------
# Its own namespaces and netboot; these servers are done with.
stop_pid "$NETBOOT_PID"
stop_pid "$IMG_PID"
log "running tests/attack-hijack.sh"
: >"$WORK/hijack.rows"
hijack=0
ATTACK_ROWS=$WORK/hijack.rows bash "$REPO/tests/attack-hijack.sh" >"$WORK/hijack.out" 2>&1 || hijack=1
grep -E '^(PASS|FAIL) ' "$WORK/hijack.out" || tail -20 "$WORK/hijack.out"
[ "$hijack" = 0 ] || tail -20 "$WORK/hijack.out"
check "tests/attack-hijack.sh: $(grep -c '^PASS ' "$WORK/hijack.out" || true) checks passed, $(grep -c '^FAIL ' "$WORK/hijack.out" || true) failed" [ "$hijack" = 0 ]
check "tests/attack-hijack.sh gave its rows of the table ($(wc -l <"$WORK/hijack.rows"))" [ -s "$WORK/hijack.rows" ]
while IFS=$'\t' read -r a b c d e; do row "$a" "$b" "$c" "$d" "$e"; done <"$WORK/hijack.rows"

printf '\n%-13s | %-34s | %-62s | %-24s | %s\n' attack load "server figures (netboot/imageserver)" "legitimate client" result
printf '%s\n' "${ROWS[@]}"
echo
finish

#!/usr/bin/env bash
# HTTP file serving against nginx (Debian's, `sendfile on`), same files, same address, same run:
#
#   (a) storm: CLIENTS (50) clients at once, each from its own address, each fetching a 64 MiB
#       and an 8 MiB file over one keep-alive connection from `provisioner netboot`'s /assets
#       (the serving code of the product, release build) and from nginx;
#   (b) imageserver: IMAGE_CLIENTS (4) clients at once each fetching the same 512 MiB image from
#       `provisioner imageserver` and from nginx (four machines imaging from one image).
#
# Files are random and read once before the first round, so both servers serve from the page
# cache. Each part runs ROUNDS times (default 3), ours and nginx interleaved; the best round
# counts. Prints MB/s (10^6 bytes/s: all bytes / wall time from the first request to the last
# byte), the slowest client's time, ratios ours/nginx, our server's peak thread count, the CPU
# time each server used (user + system, nginx's workers included), and the load average at the
# start of each part. Every byte count is checked; curl gives up after 120 s.
# Run as root; needs nginx (tests/install-deps.sh) and curl. Big files go to /var/tmp.
#   ROUNDS=3 CLIENTS=50 tests/bench/http.sh
TEST_NAME=httpbench
# shellcheck source=tests/lib.sh
source "$(dirname "$0")/../lib.sh"

[ "$(id -u)" -eq 0 ] || { echo "FAIL $TEST_NAME: must run as root"; exit 1; }
for tool in curl nginx; do
    command -v "$tool" >/dev/null || { echo "FAIL $TEST_NAME: $tool not installed (tests/install-deps.sh)"; exit 1; }
done
PROVISIONER=${PROVISIONER:-$REPO/target/release/provisioner}
[ -x "$PROVISIONER" ] || { echo "FAIL $TEST_NAME: no $PROVISIONER (cargo build --release -p agent)"; exit 1; }
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-50}
IMAGE_CLIENTS=${IMAGE_CLIENTS:-4}
BIG_MIB=${BIG_MIB:-64}
SMALL_MIB=${SMALL_MIB:-8}
IMAGE_MIB=${IMAGE_MIB:-512}
OURS_PORT=8080
IMAGE_PORT=8000
NGINX_PORT=8088

DATA=$(mktemp -d /var/tmp/pv-http-bench.XXXXXX)
teardown() {
    rm -rf "$DATA"
    cleanup
}
trap teardown EXIT
# nginx's workers drop to an unprivileged user: the files must be readable by anyone.
chmod 755 "$DATA"
mkdir -p "$DATA/assets" "$DATA/ipxe" "$DATA/images"
head -c "${BIG_MIB}M" /dev/urandom >"$DATA/assets/big.bin"
head -c "${SMALL_MIB}M" /dev/urandom >"$DATA/assets/small.bin"
head -c "${IMAGE_MIB}M" /dev/urandom >"$DATA/images/image.raw"
stub_boot_files "$DATA/assets" vmlinuz initrd.img
stub_boot_files "$DATA/ipxe" undionly.kpxe snponly.efi
chmod -R a+rX "$DATA"
cat "$DATA"/assets/* "$DATA"/images/* >/dev/null # into the page cache

write_config "$WORK/provisioner.yaml" \
    "bootFiles: {ipxeDir: $DATA/ipxe, assetsDir: $DATA/assets}" \
    "listen: {dhcp: \"$SRV_IP:67\", tftp: \"$SRV_IP:69\", http: \"$SRV_IP:$OURS_PORT\"}"
mkdir -p "$MACHINES"

# nginx as a plain static server: its own configuration, PID and log files, no daemon (so that
# its master is the process we started and stop by PID; it stops its workers).
cat >"$WORK/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 10s;
    default_type application/octet-stream;
    client_body_temp_path $WORK/nginx-body;
    proxy_temp_path $WORK/nginx-proxy;
    fastcgi_temp_path $WORK/nginx-fastcgi;
    uwsgi_temp_path $WORK/nginx-uwsgi;
    scgi_temp_path $WORK/nginx-scgi;
    server {
        listen $SRV_IP:$NGINX_PORT;
        root $DATA;
    }
}
EOF

netns_up
CLI=$(add_client bench)
for i in $(seq 1 "$CLIENTS"); do
    ip netns exec "$CLI" ip addr add "$SUBNET_PREFIX.$((99 + i))/24" dev eth0
done

NETBOOT_PID=$(RUST_LOG=warn start_in_srv netboot "$PROVISIONER" netboot --config "$WORK/provisioner.yaml")
IMAGE_PID=$(RUST_LOG=warn start_in_srv imageserver "$PROVISIONER" imageserver \
    --dir "$DATA/images" --listen "$SRV_IP:$IMAGE_PORT")
NGINX_PID=$(start_in_srv nginx nginx -p "$WORK" -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log")
answers() { ip netns exec "$CLI" curl -s -o /dev/null --max-time 1 "$1"; }
for url in "http://$SRV_IP:$OURS_PORT/assets/vmlinuz" "http://$SRV_IP:$IMAGE_PORT/image.raw" \
    "http://$SRV_IP:$NGINX_PORT/assets/vmlinuz"; do
    wait_for 10 answers "$url" || { fail "no answer from $url"; tail -n 20 "$WORK"/*.log >&2; finish; }
done

threads_of() { awk '/^Threads:/ {print $2}' "/proc/$1/status" 2>/dev/null; }
# cpu_ticks PID: user + system clock ticks of PID and of its children (nginx's workers).
cpu_ticks() {
    local p total=0 stat
    for p in "$1" $(pgrep -P "$1" || true); do
        stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        set -- $stat
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}
TICKS=$(getconf CLK_TCK)
# sample_threads PID FILE: the peak thread count of PID, written to FILE, sampled every 20 ms
# while FILE.run exists (at most 10 minutes).
sample_threads() {
    local pid=$1 out=$2 peak=0 n i
    for ((i = 0; i < 30000; i++)); do
        [ -e "$out.run" ] || break
        n=$(threads_of "$pid") || break
        [ "${n:-0}" -gt "$peak" ] && peak=$n
        sleep 0.02
    done
    echo "$peak" >"$out"
}

# storm BASE_URL PID: one round of part (a); prints "MB/s slowest_s"; PID's thread peak goes to
# $WORK/threads.
# image BASE_URL PID: one round of part (b), the same.
# Each client is one curl (both files over one connection), from its own address; it writes
# "bytes seconds" per file.
run_clients() {
    local n=$1 pid=$2; shift 2
    local urls=("$@") dir=$WORK/round i t0 t1
    rm -rf "$dir"
    mkdir -p "$dir"
    touch "$WORK/threads.run"
    sample_threads "$pid" "$WORK/threads" &
    local sampler=$!
    local curls=() c0
    c0=$(cpu_ticks "$pid")
    t0=$(now_us)
    for i in $(seq 1 "$n"); do
        local args=()
        for u in "${urls[@]}"; do args+=(-o /dev/null "$u"); done
        ip netns exec "$CLI" curl -sS --max-time 120 --interface "$SUBNET_PREFIX.$((99 + i))" \
            -w '%{size_download} %{time_total}\n' "${args[@]}" >"$dir/$i" 2>"$dir/$i.err" &
        curls+=($!)
    done
    # Bounded by curl's own --max-time.
    wait "${curls[@]}" 2>/dev/null || true
    t1=$(now_us)
    echo $(( $(cpu_ticks "$pid") - c0 )) >"$WORK/cpu"
    rm -f "$WORK/threads.run"
    wait "$sampler"
    cat "$dir"/*.err >&2
    # Per client: the sum of its transfers' times (one after the other on one connection).
    awk -v t="$(( t1 - t0 ))" -v files="${#urls[@]}" -v n="$n" '
        FNR == 1 { if (NR > 1) { if (s > slow) slow = s }; s = 0; clients++ }
        { bytes += $1; s += $2; lines++ }
        END { if (s > slow) slow = s
              if (lines != n * files) { print "ERR"; exit }
              printf "%.0f %.3f %.0f\n", bytes / (t / 1e6) / 1e6, slow, bytes }' "$dir"/[0-9]*
}

declare -A BEST SLOW PEAK CPU
measure() {
    local key=$1 pid=$2 want=$3; shift 3
    local r mbs slow bytes
    r=$(run_clients "$@" | tail -n 1)
    read -r mbs slow bytes <<<"$r"
    if [ "$mbs" = ERR ] || [ "$bytes" != "$want" ]; then
        fail "$key: clients got $bytes bytes, expected $want"
        return
    fi
    local cpu
    cpu=$(awk -v t="$(cat "$WORK/cpu")" -v hz="$TICKS" 'BEGIN { printf "%.2f", t / hz }')
    log "$key: $mbs MB/s, slowest client ${slow} s, server CPU ${cpu} s, peak threads $(cat "$WORK/threads")"
    if [ "$mbs" -gt "${BEST[$key]:-0}" ]; then BEST[$key]=$mbs; SLOW[$key]=$slow; CPU[$key]=$cpu; fi
    if [ "$(cat "$WORK/threads")" -gt "${PEAK[$key]:-0}" ]; then PEAK[$key]=$(cat "$WORK/threads"); fi
}

MIB=1048576
STORM_BYTES=$(( CLIENTS * (BIG_MIB + SMALL_MIB) * MIB ))
IMAGE_BYTES=$(( IMAGE_CLIENTS * IMAGE_MIB * MIB ))
LOAD_A=$(cut -d' ' -f1-3 /proc/loadavg)
IDLE_THREADS=$(threads_of "$NETBOOT_PID")
for r in $(seq 1 "$ROUNDS"); do
    measure ours-storm "$NETBOOT_PID" "$STORM_BYTES" "$CLIENTS" "$NETBOOT_PID" \
        "http://$SRV_IP:$OURS_PORT/assets/big.bin" "http://$SRV_IP:$OURS_PORT/assets/small.bin"
    measure nginx-storm "$NGINX_PID" "$STORM_BYTES" "$CLIENTS" "$NGINX_PID" \
        "http://$SRV_IP:$NGINX_PORT/assets/big.bin" "http://$SRV_IP:$NGINX_PORT/assets/small.bin"
done
LOAD_B=$(cut -d' ' -f1-3 /proc/loadavg)
IMAGE_IDLE_THREADS=$(threads_of "$IMAGE_PID")
for r in $(seq 1 "$ROUNDS"); do
    measure ours-image "$IMAGE_PID" "$IMAGE_BYTES" "$IMAGE_CLIENTS" "$IMAGE_PID" \
        "http://$SRV_IP:$IMAGE_PORT/image.raw"
    measure nginx-image "$NGINX_PID" "$IMAGE_BYTES" "$IMAGE_CLIENTS" "$NGINX_PID" \
        "http://$SRV_IP:$NGINX_PORT/images/image.raw"
done
check "netboot still running" alive "$NETBOOT_PID"
check "imageserver still running" alive "$IMAGE_PID"

ratio() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
echo "HTTP file serving, best of $ROUNDS rounds; server: $PROVISIONER; nginx $(nginx -v 2>&1 | sed 's/.*\///') (sendfile on)"
printf '%-44s %10s %10s %7s %12s %12s %14s\n' test "ours MB/s" "nginx MB/s" ratio "ours slowest" "nginx slowest" "ours threads"
printf '%-44s %10s %10s %7s %11ss %11ss %14s\n' \
    "(a) $CLIENTS clients x (${BIG_MIB} + ${SMALL_MIB} MiB), netboot /assets" \
    "${BEST[ours-storm]:-}" "${BEST[nginx-storm]:-}" "$(ratio "${BEST[ours-storm]:-}" "${BEST[nginx-storm]:-}")" \
    "${SLOW[ours-storm]:-}" "${SLOW[nginx-storm]:-}" "$IDLE_THREADS -> ${PEAK[ours-storm]:-}"
printf '%-44s %10s %10s %7s %11ss %11ss %14s\n' \
    "(b) $IMAGE_CLIENTS clients x ${IMAGE_MIB} MiB, imageserver" \
    "${BEST[ours-image]:-}" "${BEST[nginx-image]:-}" "$(ratio "${BEST[ours-image]:-}" "${BEST[nginx-image]:-}")" \
    "${SLOW[ours-image]:-}" "${SLOW[nginx-image]:-}" "$IMAGE_IDLE_THREADS -> ${PEAK[ours-image]:-}"
echo "server CPU seconds in the best round: (a) ours ${CPU[ours-storm]:-} nginx ${CPU[nginx-storm]:-}; (b) ours ${CPU[ours-image]:-} nginx ${CPU[nginx-image]:-}"
echo "load average at the start: (a) $LOAD_A; (b) $LOAD_B"
finish

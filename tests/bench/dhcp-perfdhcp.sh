#!/usr/bin/env bash
# DHCP throughput: perfdhcp (kea-admin) DORA exchanges for N reserved machines against
# `provisioner netboot`, then against dnsmasq (`leasefile-ro`) and ISC Kea (memfile,
# `persist: false`, host reservations) with the same reservations, in the same run. Prints
# each server's exchanges/s, drops, and CPU (user + system, from /proc) per 1000 exchanges.
# Then the ceiling: one perfdhcp process is itself a limit (its own CPU, its rate control), so
# CEILING_RATE is offered by two perfdhcp processes at once, from two relay addresses, each with
# half of the machines; the row sums both and prints the server's share of one core over the
# run (a server below 100% of a core while exchanges drop is not what limits the figure).
# Bounded: each run lasts PERIOD seconds. Run as root after `cargo build -p agent`.
# Packages: kea-admin (perfdhcp), dnsmasq-base, kea-dhcp4-server (installed by
# tests/bench/install-kea.sh with its service kept from starting on the host).
#   N=200 PERIOD=5 RATES="500 4000" CEILING_RATE=20000 tests/bench/dhcp-perfdhcp.sh
#   (CEILING_RATE=0 leaves the ceiling out)
TEST_NAME=dhcpbench
. "$(dirname "$0")/../lib.sh"

N=${N:-200}
PERIOD=${PERIOD:-5}
RATES=${RATES:-"500 4000"}
CEILING_RATE=${CEILING_RATE:-20000}
[ "$N" -le 240 ] || { echo "N must be <= 240 (one /24)"; exit 1; }
[ -x "$PROVISIONER" ] || { echo "FAIL: $PROVISIONER not built (cargo build -p agent)"; exit 1; }
command -v perfdhcp >/dev/null || { echo "FAIL: perfdhcp (kea-admin) missing"; exit 1; }
command -v dnsmasq >/dev/null || { echo "FAIL: dnsmasq (dnsmasq-base) missing"; exit 1; }
"$REPO/tests/bench/install-kea.sh" || { echo "FAIL: kea-dhcp4 (kea-dhcp4-server) missing"; exit 1; }

netns_up
mkdir -p "$WORK/assets"
stub_boot_files "$WORK/assets" vmlinuz initrd.img
: >"$WORK/macs.txt"
: >"$WORK/dnsmasq-hosts.conf"
kea_reservations=()
for i in $(seq 1 "$N"); do
    mac=$(printf '52:54:00:bb:%02x:%02x' $((i / 256)) $((i % 256)))
    ip=$SUBNET_PREFIX.$((i + 9))
    echo "$mac" >>"$WORK/macs.txt"
    write_machine "$(printf m%03d "$i")" "$mac" "$ip"
    echo "dhcp-host=$mac,$ip,m$(printf %03d "$i")" >>"$WORK/dnsmasq-hosts.conf"
    kea_reservations+=("{\"hw-address\": \"$mac\", \"ip-address\": \"$ip\"}")
done
# perfdhcp sends as a relay agent (giaddr = its address, .250 below): netboot answers relayed
# packets only from the relays it lists.
write_config "$WORK/config.yaml" "gateway: $SRV_IP" "dnsServers: [$SRV_IP]" "leaseTime: 3600" \
    "dhcpRelays: [$SUBNET_PREFIX.250, $SUBNET_PREFIX.251]" \
    "bootFiles: {ipxeDir: /usr/lib/ipxe, uefiLoader: snponly.efi, assetsDir: $WORK/assets}" \
    'boot: {kernel: vmlinuz, initrd: initrd.img, cmdline: "console=ttyS0"}' \
    'listen: {dhcp: "0.0.0.0:67", tftp: "0.0.0.0:69", http: "0.0.0.0:8080"}'
cat >"$WORK/dnsmasq.conf" <<CONF
port=0
interface=br0
bind-interfaces
no-ping
quiet-dhcp
dhcp-authoritative
dhcp-range=$SUBNET_PREFIX.0,static,255.255.255.0,1h
dhcp-option=3,$SRV_IP
dhcp-option=6,$SRV_IP
leasefile-ro
conf-file=$WORK/dnsmasq-hosts.conf
CONF
# Kea: reservations only (no pool), leases in memory only; logs at INFO (DHCP4_STARTED says it
# serves) but not a line per lease.
reservations=$(IFS=,; echo "${kea_reservations[*]}")
cat >"$WORK/kea.json" <<CONF
{"Dhcp4": {
  "interfaces-config": {"interfaces": ["br0"], "dhcp-socket-type": "raw"},
  "lease-database": {"type": "memfile", "persist": false},
  "valid-lifetime": 3600,
  "host-reservation-identifiers": ["hw-address"],
  "subnet4": [{"id": 1, "subnet": "$SUBNET_PREFIX.0/24",
    "option-data": [{"name": "routers", "data": "$SRV_IP"},
                    {"name": "domain-name-servers", "data": "$SRV_IP"}],
    "reservations": [$reservations]}],
  "loggers": [{"name": "kea-dhcp4", "severity": "INFO", "output_options": [{"output": "stdout"}]},
              {"name": "kea-dhcp4.leases", "severity": "WARN", "output_options": [{"output": "stdout"}]}]
}}
CONF

add_client perf >/dev/null
CLIENT_NS=pv-cperf-$$
ip netns exec "$CLIENT_NS" ip addr add "$SUBNET_PREFIX.250/24" dev eth0
# The ceiling's second perfdhcp, and the halves of the machines each one asks for.
add_client perf2 >/dev/null
CLIENT2_NS=pv-cperf2-$$
ip netns exec "$CLIENT2_NS" ip addr add "$SUBNET_PREFIX.251/24" dev eth0
half=$(((N + 1) / 2))
head -n "$half" "$WORK/macs.txt" >"$WORK/macs-1.txt"
tail -n +$((half + 1)) "$WORK/macs.txt" >"$WORK/macs-2.txt"

# perf_counts FILE: "rate sent received drops" of one perfdhcp output (sent, received and drops
# summed over both exchanges, DISCOVER-OFFER and REQUEST-ACK).
perf_counts() {
    awk -F'[:,]' '/^Rate:/ && !r { split($2, a, " "); r = a[1] }
        /^sent packets:/ { s += $2 } /^received packets:/ { v += $2 } /^drops:/ { d += $2 }
        END { printf "%s %d %d %d\n", (r == "" ? 0 : r), s, v, d }' "$1"
}

udp67() { in_srv ss -Hlun 'sport = :67' | grep -q .; }

# cpu_ticks PID: user + system clock ticks the process has used
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run_perf LABEL RATE SERVER_PID: prints "LABEL RATE exchanges/s drops sent received CPU"
run_perf() {
    local out=$WORK/perf-$1-$2.txt ticks_before ticks
    ticks_before=$(cpu_ticks "$3")
    ip netns exec "$CLIENT_NS" timeout $((PERIOD + 15)) perfdhcp -4 -l eth0 -M "$WORK/macs.txt" -R "$N" \
        -r "$2" -p "$PERIOD" -W 1000000 >"$out" 2>&1 || true
    ticks=$(( $(cpu_ticks "$3") - ticks_before ))
    local rate sent recv drops cpu
    read -r rate sent recv drops < <(perf_counts "$out")
    # CPU ms per 1000 DORA exchanges; each completed exchange is an OFFER and an ACK received.
    cpu=$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v r="$recv" \
        'BEGIN { if (r > 1) printf "%.1f", t * 1000 / hz / (r / 2) * 1000; else print "n/a" }')
    printf '%-8s rate=%-6s exchanges/s=%-10s drops=%-6s sent=%-7s received=%-7s cpu_ms/1000=%s\n' \
        "$1" "$2" "${rate:-?}" "$drops" "$sent" "$recv" "$cpu"
    echo "${rate:-0} $drops $cpu" >"$WORK/result-$1-$2"
}

# run_ceiling LABEL RATE SERVER_PID: two perfdhcp processes at RATE/2 each, at once; prints the
# summed exchanges/s, drops, CPU per 1000 exchanges and the server's share of one core.
run_ceiling() {
    local ticks_before ticks t0 t1 i pids=()
    ticks_before=$(cpu_ticks "$3")
    t0=$(date +%s.%N)
    for i in 1 2; do
        local ns=$CLIENT_NS
        [ "$i" = 2 ] && ns=$CLIENT2_NS
        ip netns exec "$ns" timeout $((PERIOD + 15)) perfdhcp -4 -l eth0 -M "$WORK/macs-$i.txt" \
            -R "$N" -r $(($2 / 2)) -p "$PERIOD" -W 1000000 >"$WORK/ceiling-$1-$i.txt" 2>&1 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || true; done
    t1=$(date +%s.%N)
    ticks=$(( $(cpu_ticks "$3") - ticks_before ))
    local rate=0 sent=0 recv=0 drops=0 r s v d
    for i in 1 2; do
        read -r r s v d < <(perf_counts "$WORK/ceiling-$1-$i.txt")
        rate=$(awk -v a="$rate" -v b="$r" 'BEGIN { printf "%.1f", a + b }')
        sent=$((sent + s)) recv=$((recv + v)) drops=$((drops + d))
    done
    local hz cpu core
    hz=$(getconf CLK_TCK)
    cpu=$(awk -v t="$ticks" -v hz="$hz" -v r="$recv" \
        'BEGIN { if (r > 1) printf "%.1f", t * 1000 / hz / (r / 2) * 1000; else print "n/a" }')
    core=$(awk -v t="$ticks" -v hz="$hz" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", t / hz / (b - a) * 100 }')
    printf '%-8s ceiling: 2 perfdhcp x rate=%-6s exchanges/s=%-10s drops=%-6s sent=%-7s received=%-7s cpu_ms/1000=%s server_core=%s%%\n' \
        "$1" "$(($2 / 2))" "$rate" "$drops" "$sent" "$recv" "$cpu" "$core"
    echo "$rate $drops $cpu $core" >"$WORK/ceiling-$1"
}
# ceiling LABEL PID: the ceiling run, unless CEILING_RATE=0.
ceiling() { [ "$CEILING_RATE" -gt 0 ] && run_ceiling "$1" "$CEILING_RATE" "$2"; return 0; }

log "$N reservations, ${PERIOD}s per run, rates: $RATES"
pid=$(start_in_srv netboot env RUST_LOG=warn "$PROVISIONER" netboot --config "$WORK/config.yaml")
wait_for -p "$pid" 10 udp67 || { echo "FAIL: netboot did not bind udp/67"; tail "$WORK/netboot.log"; exit 1; }
for r in $RATES; do run_perf ours "$r" "$pid"; done
ceiling ours "$pid"
stop_pid "$pid"
wait_for 5 not udp67 || true

pid=$(start_in_srv dnsmasq dnsmasq -k -C "$WORK/dnsmasq.conf" --pid-file=)
wait_for -p "$pid" 10 udp67 || { echo "FAIL: dnsmasq did not bind udp/67"; tail "$WORK/dnsmasq.log"; exit 1; }
for r in $RATES; do run_perf dnsmasq "$r" "$pid"; done
ceiling dnsmasq "$pid"
stop_pid "$pid"
wait_for 5 not udp67 || true

# Kea's raw socket does not show in ss; its log says when it serves br0.
kea_up() { grep -q "DHCP4_STARTED" "$WORK/kea.log"; }
pid=$(start_in_srv kea env KEA_LOCKFILE_DIR=none KEA_PIDFILE_DIR="$WORK" kea-dhcp4 -c "$WORK/kea.json")
wait_for -p "$pid" 10 kea_up || { echo "FAIL: kea-dhcp4 did not start"; tail "$WORK/kea.log"; exit 1; }
for r in $RATES; do run_perf kea "$r" "$pid"; done
ceiling kea "$pid"
stop_pid "$pid"

for r in $RATES; do
    read -r ours ours_drops ours_cpu <"$WORK/result-ours-$r"
    for peer in dnsmasq kea; do
        read -r theirs _ theirs_cpu <"$WORK/result-$peer-$r"
        ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
        echo "rate $r: ours/$peer = $ratio (ours: $ours exchanges/s, $ours_drops drops, $ours_cpu CPU ms/1000; $peer: $theirs exchanges/s, $theirs_cpu CPU ms/1000)"
    done
done
if [ "$CEILING_RATE" -gt 0 ]; then
    read -r ours ours_drops ours_cpu ours_core <"$WORK/ceiling-ours"
    for peer in dnsmasq kea; do
        read -r theirs theirs_drops theirs_cpu theirs_core <"$WORK/ceiling-$peer"
        ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
        echo "ceiling (2 perfdhcp, $CEILING_RATE/s offered): ours/$peer = $ratio (ours: $ours exchanges/s, $ours_drops drops, $ours_cpu CPU ms/1000, ${ours_core}% of a core; $peer: $theirs exchanges/s, $theirs_drops drops, $theirs_cpu CPU ms/1000, ${theirs_core}% of a core)"
    done
    # What one core would do at the CPU cost measured: the server's own ceiling, which the
    # clients on this machine may not reach.
    for who in ours dnsmasq kea; do
        read -r _ _ cpu _ <"$WORK/ceiling-$who"
        awk -v w="$who" -v c="$cpu" 'BEGIN { if (c + 0 > 0) printf "%s: one core at %s CPU ms/1000 exchanges = %.0f exchanges/s\n", w, c, 1e6 / c }'
    done
fi
[ "${KEEP_WORK:-0}" = 1 ] && log "raw perfdhcp output in $WORK/perf-*.txt"
exit 0

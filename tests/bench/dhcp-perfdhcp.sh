#!/usr/bin/env bash
# DHCP throughput: perfdhcp (kea-admin) DORA exchanges for N reserved machines against
# `provisioner netboot`, then against dnsmasq with the same reservations, in the same run.
# Bounded: each run lasts PERIOD seconds. Run as root after `cargo build -p agent`.
# Packages: kea-admin (perfdhcp), dnsmasq-base.
#   N=200 PERIOD=5 RATES="500 4000" tests/bench/dhcp-perfdhcp.sh
TEST_NAME=dhcpbench
. "$(dirname "$0")/../lib.sh"

N=${N:-200}
PERIOD=${PERIOD:-5}
RATES=${RATES:-"500 4000"}
[ "$N" -le 240 ] || { echo "N must be <= 240 (one /24)"; exit 1; }
[ -x "$PROVISIONER" ] || { echo "FAIL: $PROVISIONER not built (cargo build -p agent)"; exit 1; }
command -v perfdhcp >/dev/null || { echo "FAIL: perfdhcp (kea-admin) missing"; exit 1; }
command -v dnsmasq >/dev/null || { echo "FAIL: dnsmasq (dnsmasq-base) missing"; exit 1; }

netns_up
mkdir -p "$WORK/assets"
stub_boot_files "$WORK/assets" vmlinuz initrd.img
: >"$WORK/macs.txt"
: >"$WORK/dnsmasq-hosts.conf"
for i in $(seq 1 "$N"); do
    mac=$(printf '52:54:00:bb:%02x:%02x' $((i / 256)) $((i % 256)))
    ip=$SUBNET_PREFIX.$((i + 9))
    echo "$mac" >>"$WORK/macs.txt"
    write_machine "$(printf m%03d "$i")" "$mac" "$ip"
    echo "dhcp-host=$mac,$ip,m$(printf %03d "$i")" >>"$WORK/dnsmasq-hosts.conf"
done
# perfdhcp sends as a relay agent (giaddr = its address, .250 below): netboot answers relayed
# packets only from the relays it lists.
write_config "$WORK/config.yaml" "gateway: $SRV_IP" "dnsServers: [$SRV_IP]" "leaseTime: 3600" \
    "dhcpRelays: [$SUBNET_PREFIX.250]" \
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
dhcp-leasefile=$WORK/dnsmasq.leases
conf-file=$WORK/dnsmasq-hosts.conf
CONF

add_client perf >/dev/null
CLIENT_NS=pv-cperf-$$
ip netns exec "$CLIENT_NS" ip addr add "$SUBNET_PREFIX.250/24" dev eth0

udp67() { in_srv ss -Hlun 'sport = :67' | grep -q .; }

# run_perf LABEL RATE: prints "LABEL RATE exchanges/s drops sent received"
run_perf() {
    local out=$WORK/perf-$1-$2.txt
    ip netns exec "$CLIENT_NS" timeout $((PERIOD + 15)) perfdhcp -4 -l eth0 -M "$WORK/macs.txt" -R "$N" \
        -r "$2" -p "$PERIOD" -W 1000000 >"$out" 2>&1 || true
    local rate sent recv drops
    rate=$(awk '/^Rate:/ {print $2; exit}' "$out")
    # Sum over both exchanges (DISCOVER-OFFER and REQUEST-ACK).
    sent=$(awk -F'[:,]' '/^sent packets:/ {s += $2} END {print s + 0}' "$out")
    recv=$(awk -F'[:,]' '/^received packets:/ {s += $2} END {print s + 0}' "$out")
    drops=$(awk -F'[:,]' '/^drops:/ {s += $2} END {print s + 0}' "$out")
    printf '%-8s rate=%-6s exchanges/s=%-10s drops=%-6s sent=%-7s received=%s\n' \
        "$1" "$2" "${rate:-?}" "$drops" "$sent" "$recv"
    echo "${rate:-0} $drops" >"$WORK/result-$1-$2"
}

log "$N reservations, ${PERIOD}s per run, rates: $RATES"
pid=$(start_in_srv netboot env RUST_LOG=warn "$PROVISIONER" netboot --config "$WORK/config.yaml")
wait_for -p "$pid" 10 udp67 || { echo "FAIL: netboot did not bind udp/67"; tail "$WORK/netboot.log"; exit 1; }
for r in $RATES; do run_perf ours "$r"; done
stop_pid "$pid"
wait_for 5 not udp67 || true

pid=$(start_in_srv dnsmasq dnsmasq -k -C "$WORK/dnsmasq.conf" --pid-file=)
wait_for -p "$pid" 10 udp67 || { echo "FAIL: dnsmasq did not bind udp/67"; tail "$WORK/dnsmasq.log"; exit 1; }
for r in $RATES; do run_perf dnsmasq "$r"; done
stop_pid "$pid"

for r in $RATES; do
    read -r ours ours_drops <"$WORK/result-ours-$r"
    read -r theirs _ <"$WORK/result-dnsmasq-$r"
    ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    echo "rate $r: ours/dnsmasq = $ratio (ours: $ours exchanges/s, $ours_drops drops)"
done
[ "${KEEP_WORK:-0}" = 1 ] && log "raw perfdhcp output in $WORK/perf-*.txt"
exit 0

#!/usr/bin/env bash
# Real DHCP clients (busybox udhcpc, ISC dhclient, a scripted client) against
# `provisioner netboot` in network namespaces. Run as root after `cargo build -p agent`.
# Packages: busybox-static, isc-dhcp-client, python3, iproute2.
TEST_NAME=dhcp
. "$(dirname "$0")/lib.sh"

[ -x "$PROVISIONER" ] || { echo "FAIL $TEST_NAME: $PROVISIONER not built (cargo build -p agent)"; exit 1; }
command -v busybox >/dev/null || { echo "FAIL $TEST_NAME: busybox (busybox-static) missing"; exit 1; }
CLIENT_PY=$REPO/tests/dhcp-client.py

MAC_UDHCPC=52:54:00:aa:00:20
MAC_DHCLIENT=52:54:00:aa:00:21
MAC_PY=52:54:00:aa:00:22
MAC_UNKNOWN=52:54:00:ee:ee:01

netns_up
# add_client records in an array what cleanup must remove: called inside $(...) that record
# would be lost, so it is called directly and the names derived.
mkdir -p "$WORK/assets"
stub_boot_files "$WORK/assets" vmlinuz initrd.img
write_machine node20 "$MAC_UDHCPC" "$SUBNET_PREFIX.20" "hostname: node20-host"
write_machine node21 "$MAC_DHCLIENT" "$SUBNET_PREFIX.21" "hostname: node21-host"
write_machine node22 "$MAC_PY" "$SUBNET_PREFIX.22" "hostname: node22-host"
write_config "$WORK/config.yaml" "gateway: $SRV_IP" "dnsServers: [$SRV_IP, $SUBNET_PREFIX.2]" "leaseTime: 600" \
    "bootFiles: {ipxeDir: /usr/lib/ipxe, uefiLoader: snponly.efi, assetsDir: $WORK/assets}" \
    'boot: {kernel: vmlinuz, initrd: initrd.img, cmdline: "console=ttyS0"}' \
    'listen: {dhcp: "0.0.0.0:67", tftp: "0.0.0.0:69", http: "0.0.0.0:8080"}'

SERVER_PID=$(start_in_srv netboot env RUST_LOG=info "$PROVISIONER" netboot --config "$WORK/config.yaml")
udp67() { in_srv ss -Hlun 'sport = :67' | grep -q .; }
check "server listens on udp/67" wait_for -p "$SERVER_PID" 10 udp67

# --- busybox udhcpc: reserved address, mask, router, DNS, hostname --------------------------
cat >"$WORK/udhcpc.sh" <<'SH'
#!/bin/sh
echo "$1 ip=$ip subnet=$subnet mask=$mask router=$router dns=$dns hostname=$hostname lease=$lease serverid=$serverid" >>"$OUT"
SH
chmod +x "$WORK/udhcpc.sh"
add_client udh "$MAC_UDHCPC" >/dev/null; C1=pv-cudh-$$
OUT=$WORK/udhcpc.out ip netns exec "$C1" busybox udhcpc -i eth0 -s "$WORK/udhcpc.sh" -q -n -f -t 3 -T 1 \
    >"$WORK/udhcpc.log" 2>&1 || true
log "udhcpc: $(grep '^bound' "$WORK/udhcpc.out" 2>/dev/null || echo 'no lease')"
bound() { grep -q "^bound .*$1" "$WORK/udhcpc.out"; }
check "udhcpc gets the reserved address" bound "ip=$SUBNET_PREFIX.20 "
check "udhcpc gets the mask" bound "subnet=255.255.255.0 "
check "udhcpc gets the router" bound "router=$SRV_IP "
check "udhcpc gets both DNS servers" bound "dns=$SRV_IP $SUBNET_PREFIX.2 "
check "udhcpc gets the hostname" bound "hostname=node20-host "
check "udhcpc gets the lease time" bound "lease=600 "
check "udhcpc sees our server id" bound "serverid=$SRV_IP"

# --- ISC dhclient -----------------------------------------------------------------------------
if command -v dhclient >/dev/null; then
    add_client dhc "$MAC_DHCLIENT" >/dev/null; C2=pv-cdhc-$$
    cat >"$WORK/dhclient.conf" <<'CONF'
timeout 10;
retry 1;
request subnet-mask, routers, domain-name-servers, host-name;
CONF
    cat >"$WORK/dhclient.sh" <<SH
#!/bin/sh
echo "\$reason ip=\$new_ip_address mask=\$new_subnet_mask routers=\$new_routers dns=\$new_domain_name_servers host=\$new_host_name" >>"$WORK/dhclient.out"
SH
    chmod +x "$WORK/dhclient.sh"
    timeout 20 ip netns exec "$C2" dhclient -1 -cf "$WORK/dhclient.conf" -sf "$WORK/dhclient.sh" \
        -lf "$WORK/dhclient.leases" -pf "$WORK/dhclient.pid" eth0 >"$WORK/dhclient.log" 2>&1 || true
    # dhclient -1 stays in the background with its lease: stopped by cleanup.
    [ -s "$WORK/dhclient.pid" ] && track_pid "$(cat "$WORK/dhclient.pid")" dhclient
    log "dhclient: $(grep '^BOUND' "$WORK/dhclient.out" 2>/dev/null || echo 'no lease')"
    check "dhclient binds the reserved lease" grep -q \
        "^BOUND ip=$SUBNET_PREFIX.21 mask=255.255.255.0 routers=$SRV_IP dns=$SRV_IP $SUBNET_PREFIX.2 host=node21-host" \
        "$WORK/dhclient.out"
else
    log "dhclient not installed: skipped"
fi

# --- scripted client: NAK for a wrong address, ACK for the right one, INFORM, RELEASE -----------
# (INFORM and RELEASE count only from the client's reserved address, which it names as ciaddr)
add_client py "$MAC_PY" >/dev/null; C3=pv-cpy-$$
# An address so the kernel can send to 255.255.255.255; the server does not look at it.
ip netns exec "$C3" ip addr add "$SUBNET_PREFIX.222/24" dev eth0
py() { ip netns exec "$C3" python3 "$CLIENT_PY" eth0 "$@"; }
py "$MAC_PY" request --requested "$SUBNET_PREFIX.99" >"$WORK/nak.out"
check "REQUEST for a wrong address gets a NAK" grep -qx 'type=nak' "$WORK/nak.out"
check "the NAK carries our server id" grep -qx "option 54=0a4d0001" "$WORK/nak.out"
py "$MAC_PY" request --requested "$SUBNET_PREFIX.99" --server-id "$SUBNET_PREFIX.254" >"$WORK/other.out"
check "REQUEST for another server gets silence" grep -qx 'type=none' "$WORK/other.out"
py "$MAC_PY" request --requested "$SUBNET_PREFIX.22" --server-id "$SRV_IP" >"$WORK/ack.out"
check "REQUEST for the reserved address gets an ACK" grep -qx 'type=ack' "$WORK/ack.out"
check "the ACK gives the reserved address" grep -qx "yiaddr=$SUBNET_PREFIX.22" "$WORK/ack.out"
py "$MAC_PY" inform --ciaddr "$SUBNET_PREFIX.222" --timeout 1 >"$WORK/inform-foreign.out" || true
check "INFORM naming another address than the reservation gets silence" grep -qx 'type=none' "$WORK/inform-foreign.out"
# The client now uses its lease: the reserved address is its only one.
ip netns exec "$C3" ip addr flush dev eth0
ip netns exec "$C3" ip addr add "$SUBNET_PREFIX.22/24" dev eth0
py "$MAC_PY" inform --ciaddr "$SUBNET_PREFIX.22" >"$WORK/inform.out" || true
# The INFORM ACK is unicast to ciaddr, which this namespace owns.
check "INFORM gets an ACK without lease time" sh -c \
    "grep -qx type=ack '$WORK/inform.out' && grep -qx yiaddr=0.0.0.0 '$WORK/inform.out' && ! grep -q '^option 51=' '$WORK/inform.out'"
py "$MAC_PY" release --server-id "$SRV_IP" --ciaddr "$SUBNET_PREFIX.22" --timeout 0.5 >"$WORK/release.out"
check "RELEASE gets no reply" grep -qx 'type=none' "$WORK/release.out"
check "the client's own RELEASE is recorded" wait_for 10 grep -q 'machine=node22.*DhcpReleased' "$WORK/netboot.log"

# --- unknown MAC: nothing -----------------------------------------------------------------------
add_client unk "$MAC_UNKNOWN" >/dev/null; C4=pv-cunk-$$
if OUT=$WORK/unknown.out ip netns exec "$C4" busybox udhcpc -i eth0 -s "$WORK/udhcpc.sh" -q -n -f -t 3 -T 1 \
    >"$WORK/unknown.log" 2>&1; then
    fail "udhcpc with an unknown MAC got a lease: $(cat "$WORK/unknown.out")"
else
    pass "udhcpc with an unknown MAC gets no lease"
fi
ip netns exec "$C4" ip addr add "$SUBNET_PREFIX.223/24" dev eth0
ip netns exec "$C4" python3 "$CLIENT_PY" eth0 "$MAC_UNKNOWN" discover >"$WORK/unknown-py.out"
check "DISCOVER from an unknown MAC gets no OFFER" grep -qx 'type=none' "$WORK/unknown-py.out"
# Another host sends node22's RELEASE (its MAC and address, from .223): refused, not recorded.
released=$(grep -c 'DhcpReleased' "$WORK/netboot.log" || true)
ip netns exec "$C4" python3 "$CLIENT_PY" eth0 "$MAC_PY" release --server-id "$SRV_IP" \
    --ciaddr "$SUBNET_PREFIX.22" --timeout 0.5 >/dev/null
# The server reads its socket in order and logs before it reads the next datagram: once a known
# machine has its OFFER, every packet before it has been logged.
py "$MAC_PY" discover >"$WORK/after-unknown.out"
check "a known MAC still gets its OFFER" grep -qx 'type=offer' "$WORK/after-unknown.out"
check "a RELEASE for node22 from another host is refused" grep -q "DHCP packet refused.*NotTheClient" "$WORK/netboot.log"
check "and not recorded" [ "$(grep -c 'DhcpReleased' "$WORK/netboot.log" || true)" = "$released" ]
unknown_logs=$(grep -c "no reservation for this MAC" "$WORK/netboot.log" || true)
check "the unknown MAC is logged once, not per packet ($unknown_logs)" test "$unknown_logs" = 1

check "server still running" kill -0 "$SERVER_PID"
if [ "$FAILURES" -ne 0 ]; then log "server log:"; tail -n 40 "$WORK/netboot.log" >&2; fi
finish

#!/bin/bash
# ProxyDHCP (dhcpMode: proxy) beside the LAN's own DHCP server. The LAN's server is dnsmasq in a
# namespace of its own on the test bridge (10.77.0.254, DHCP only, every machine's address
# reserved, no PXE option at all); netboot runs in proxy mode in the server namespace, on
# sockets passed as systemd passes netboot-dhcp.socket's (two sockets named dhcp: 67 and 4011).
#   (a) a plain DHCP client (busybox udhcpc) of a reserved machine gets its address from the
#       LAN's server only, and netboot sends it nothing; its script is refused (no proxy answer
#       to an iPXE opened the window). A machine the LAN's server gives another address than its
#       spec.ipAddress is warned about.
#   (b) SeaBIOS + QEMU's iPXE NIC ROM: address from the LAN's server, script URL by ProxyDHCP,
#       imaging script (with its token) over HTTP, kernel + initrd, marker.
#   (c) OVMF's own PXE: address from the LAN's server, snponly.efi by ProxyDHCP over TFTP, then
#       as (b). Whether the firmware asked the boot-server port (4011) is logged.
#   (d) OVMF's UEFI HTTP Boot (its PXE off): address from the LAN's server, the HTTPClient proxy
#       offer's ipxe.efi URL, then as (b).
# Between (a) and (b), a PXE client asks the boot-server port (UDP 4011) as EDK2 does for a
# BINL offer (tests/dhcp-client.py): a DHCPACK with the boot file, unicast back, no address.
# Every frame on br0 is logged (tests/fixtures/dhcp-sniff.py --lines): no reply of netboot
# carries an address, none is a NAK. Each boot prints its time ("BOOT name seconds=…").
#
#   PATHS="seabios ovmf httpboot"   which boots to run      TIMEOUT=120 (per boot)     KEEP_WORK=1
TEST_NAME=proxydhcp
. "$(dirname "$0")/lib.sh"
. "$REPO/tests/lib-qemu.sh"

PATHS=${PATHS:-seabios ovmf httpboot}
TIMEOUT=${TIMEOUT:-120}
MARKER=PROXYDHCP-BOOT-OK
LAN_IP=$SUBNET_PREFIX.254
SNIFF=$REPO/tests/fixtures/dhcp-sniff.py
MAC_BIOS=52:54:00:b0:00:01 IP_BIOS=$SUBNET_PREFIX.21
MAC_UEFI=52:54:00:b0:00:02 IP_UEFI=$SUBNET_PREFIX.22
MAC_HTTP=52:54:00:b0:00:05 IP_HTTP=$SUBNET_PREFIX.23
MAC_PLAIN=52:54:00:b0:00:03 IP_PLAIN=$SUBNET_PREFIX.31
# spec.ipAddress .32, but the LAN's server gives it .42
MAC_MOVED=52:54:00:b0:00:04 IP_MOVED=$SUBNET_PREFIX.32 IP_MOVED_LAN=$SUBNET_PREFIX.42
SHA=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

[ -x "$PROVISIONER" ] || { fail "no $PROVISIONER (cargo build -p agent)"; finish; }
netns_up
add_tap tap0
boot_setup "$WORK/boot" "$MARKER"
# The initrd prints its kernel command line: the imaging script's orders (the token) show there.
qemu_mk_initrd "$WORK/boot/assets/initrd.img" "$MARKER" cmdline
boot_add_machine "$WORK/boot" node-bios "$MAC_BIOS" "$IP_BIOS"
boot_add_machine "$WORK/boot" node-uefi "$MAC_UEFI" "$IP_UEFI"
boot_add_machine "$WORK/boot" node-http "$MAC_HTTP" "$IP_HTTP"
boot_add_machine "$WORK/boot" node-plain "$MAC_PLAIN" "$IP_PLAIN"
boot_add_machine "$WORK/boot" node-moved "$MAC_MOVED" "$IP_MOVED"
# Under systemd the sockets come from the unit; these addresses must stay unused.
boot_write_config "$WORK/boot" "dhcpMode: proxy" \
    "image: {url: \"http://$SRV_IP:$BOOT_HTTP_PORT/assets/unused.raw\", sha256: $SHA}" \
    'listen: {dhcp: "127.0.0.1:1067", pxe: "127.0.0.1:1401", tftp: "127.0.0.1:1069", http: "127.0.0.1:1080"}'

# Every DHCP frame br0 sees (netboot's own replies, broadcasts, what is sent to 10.77.0.1).
start_in_srv sniff python3 "$SNIFF" --iface br0 --lines --timeout 3600 >/dev/null
# sniffing NS: an AF_PACKET socket is open in namespace NS (its sniffer listens).
sniffing() { [ "$(ip netns exec "$1" cat /proc/net/packet | tail -n +2 | wc -l)" -gt 0 ]; }
wait_for 10 sniffing "$NS_SRV" || log "the br0 sniffer has no socket yet"

# --- the LAN's DHCP server ---------------------------------------------------------------------
LAN_NS=$(add_client lan)
ip netns exec "$LAN_NS" ip addr add "$LAN_IP/24" dev eth0
cat > "$WORK/lan-dnsmasq.conf" <<EOF
port=0
interface=eth0
bind-interfaces
no-ping
dhcp-authoritative
log-dhcp
dhcp-leasefile=$WORK/lan.leases
dhcp-range=$SUBNET_PREFIX.100,$SUBNET_PREFIX.199,255.255.255.0,1h
dhcp-option=option:router,$LAN_IP
dhcp-host=$MAC_BIOS,$IP_BIOS
dhcp-host=$MAC_UEFI,$IP_UEFI
dhcp-host=$MAC_HTTP,$IP_HTTP
dhcp-host=$MAC_PLAIN,$IP_PLAIN
dhcp-host=$MAC_MOVED,$IP_MOVED_LAN
EOF
: > "$WORK/lan.leases"
LAN_PID=$(start_in "$LAN_NS" lan-dnsmasq dnsmasq -C "$WORK/lan-dnsmasq.conf" --keep-in-foreground \
    --user=root --group=root --log-facility=-)
check "the LAN's DHCP server (dnsmasq) runs" wait_for -p "$LAN_PID" 5 grep -q "DHCP, IP range" "$WORK/lan-dnsmasq.log"

# --- netboot in proxy mode, on inherited sockets ----------------------------------------------
NETBOOT_PID=$(start_in_srv netboot env RUST_LOG="${RUST_LOG:-info}" "$REPO/tests/activate.py" \
    dhcp=udp:0.0.0.0:67 dhcp=udp:0.0.0.0:4011 tftp=udp:0.0.0.0:69 http=tcp:$SRV_IP:$BOOT_HTTP_PORT \
    -- "$PROVISIONER" netboot --config "$WORK/boot/provisioner.yaml")
if ! wait_for -p "$NETBOOT_PID" 15 grep -q "netboot ready" "$WORK/netboot.log"; then
    fail "netboot starts in proxy mode"
    tail -n 30 "$WORK/netboot.log" >&2
    finish
fi
check "the ready line says the mode" grep -q "DHCP: proxy beside the LAN's server" "$WORK/netboot.log"
check "the DHCP server says it gives no addresses" grep -q "boot information only" "$WORK/netboot.log"
check "the inherited port-4011 socket is the PXE boot server" grep -q "PXE 0.0.0.0:4011" "$WORK/netboot.log"
check "nothing bound on the configuration's own ports" bash -c \
    "! ip netns exec $NS_SRV ss -Hlun | grep -Eq ':(1067|1401|1069) '"

# our_replies: every frame netboot sent from its DHCP or boot-server port
our_replies() { grep -E "^[0-9.]+ $SRV_IP:(67|4011)->" "$WORK/sniff.log" || true; }

# --- (a) a plain DHCP client ------------------------------------------------------------------
cat > "$WORK/udhcpc.sh" <<'EOF'
#!/bin/sh
case "$1" in
    bound|renew)
        echo "ip=$ip serverid=$serverid router=$router" >> "$LEASE_FILE"
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface" ;;
esac
exit 0
EOF
chmod +x "$WORK/udhcpc.sh"
PLAIN_NS=$(add_client plain "$MAC_PLAIN")
PLAIN_SNIFF=$(start_in "$PLAIN_NS" plain-sniff python3 "$SNIFF" --iface eth0 --lines --timeout 600)
wait_for 10 sniffing "$PLAIN_NS" || log "the plain client's sniffer has no socket yet"
mark=$(wc -l < "$WORK/sniff.log")
LEASE_FILE=$WORK/plain.lease ip netns exec "$PLAIN_NS" busybox udhcpc -i eth0 -q -n -f -t 5 -T 1 \
    -s "$WORK/udhcpc.sh" >"$WORK/udhcpc-plain.log" 2>&1 || true
check "(a) udhcpc took its reserved address from the LAN's server" \
    grep -qx "ip=$IP_PLAIN serverid=$LAN_IP router=$LAN_IP" "$WORK/plain.lease"
check "(a) the LAN's server recorded the lease" grep -q "$MAC_PLAIN $IP_PLAIN" "$WORK/lan.leases"
# The client's own capture: the LAN's OFFER and ACK reached it (the capture works) …
check "(a) the client saw the LAN's offer and ack" bash -c \
    "grep -q '^[0-9.]* $LAN_IP:67->.* offer chaddr=$MAC_PLAIN' '$WORK/plain-sniff.log' &&
     grep -q '^[0-9.]* $LAN_IP:67->.* ack chaddr=$MAC_PLAIN' '$WORK/plain-sniff.log'"
# … without PXE options from the LAN's server …
check "(a) the LAN's replies carry no boot file and no vendor class" bash -c \
    "! grep '^[0-9.]* $LAN_IP:67->' '$WORK/plain-sniff.log' | grep -qv 'vc=- file=-\$'"
# … and nothing from netboot, on the client's link or on br0.
check "(a) netboot sent the client nothing" bash -c "! grep -q '$SRV_IP:' '$WORK/plain-sniff.log'"
check "(a) and nothing on br0 while it took its lease" bash -c \
    "! tail -n +$((mark + 1)) '$WORK/sniff.log' | grep -qE '^[0-9.]+ $SRV_IP:(67|4011)->'"
check "(a) netboot logged no reply to it" bash -c \
    "! grep -q 'ProxyDHCP reply sent.*$MAC_PLAIN' '$WORK/netboot.log'"
# A plain client's DHCP opens no window: its own address gets no imaging script.
code=$(ip netns exec "$PLAIN_NS" curl -s -o "$WORK/plain-script" -w '%{http_code}' \
    "http://$SRV_IP:$BOOT_HTTP_PORT/ipxe/${MAC_PLAIN//:/-}" || true)
check "(a) its imaging script is refused without a ProxyDHCP answer to its iPXE (got $code)" [ "$code" = 403 ]
stop_pid "$PLAIN_SNIFF"

# A machine the LAN's server gives another address than its spec.ipAddress: warned about.
MOVED_NS=$(add_client moved "$MAC_MOVED")
LEASE_FILE=$WORK/moved.lease ip netns exec "$MOVED_NS" busybox udhcpc -i eth0 -q -n -f -t 5 -T 1 \
    -s "$WORK/udhcpc.sh" >"$WORK/udhcpc-moved.log" 2>&1 || true
check "(a) the moved machine got $IP_MOVED_LAN from the LAN's server" grep -q "ip=$IP_MOVED_LAN " "$WORK/moved.lease"
foreign_warned() {
    grep "not its reserved address" "$WORK/netboot.log" | grep "$MAC_MOVED" | grep -q "$IP_MOVED_LAN"
}
check "(a) netboot warns that it uses $IP_MOVED_LAN, not its reservation $IP_MOVED" wait_for 5 foreign_warned

# --- the PXE boot-server port (UDP 4011), asked as EDK2 asks it for a BINL offer's file -------
ip netns exec "$PLAIN_NS" python3 "$REPO/tests/dhcp-client.py" eth0 "$MAC_PLAIN" request \
    --ciaddr "$IP_PLAIN" --vendor-class PXEClient:Arch:00007:UNDI:003000 --arch 7 \
    --to "$SRV_IP:4011" --port 4011 --timeout 5 >"$WORK/boot-server.out" 2>&1 || true
check "4011: a REQUEST from the client's address gets a DHCPACK" grep -qx type=ack "$WORK/boot-server.out"
check "4011: unicast back from the boot-server port" grep -qx "from=$SRV_IP:4011" "$WORK/boot-server.out"
check "4011: no address in it" grep -qx yiaddr=0.0.0.0 "$WORK/boot-server.out"
check "4011: the UEFI loader, over TFTP from us" bash -c \
    "grep -qx 'file=$UEFI_LOADER' '$WORK/boot-server.out' && grep -qx 'siaddr=$SRV_IP' '$WORK/boot-server.out'"
check "4011: vendor class PXEClient and discovery control 8" bash -c \
    "grep -qx 'option 60=505845436c69656e74' '$WORK/boot-server.out' && grep -qx 'option 43=060108ff' '$WORK/boot-server.out'"

# --- (b), (c): network boots --------------------------------------------------------------------
# boot_path NAME FW MAC IP
boot_path() {
    local name=$1 fw=$2 mac=$3 ip=$4 serial token replies
    if qemu_boot "$name" "$fw" "$mac" tap0 "$MARKER" "$TIMEOUT"; then
        pass "$name: marker after ${QEMU_ELAPSED}s"
        echo "BOOT $name dhcpMode=proxy seconds=$QEMU_ELAPSED"
    else
        fail "$name: no $MARKER within ${TIMEOUT}s; serial console tail:"
        qemu_tail "$name" 25 >&2
        grep -a "$mac" "$WORK/sniff.log" | tail -n 20 >&2 || true
        return
    fi
    serial=$(qemu_serial "$name")
    check "$name: iPXE configured the address the LAN's server reserved ($ip)" grep -aq "$ip" "$serial"
    check "$name: the LAN's server leased it $ip" grep -q "$mac $ip" "$WORK/lan.leases"
    token=$(grep -ao 'provisioner\.token=[0-9a-f]*' "$serial" | head -n 1)
    check "$name: it booted the imaging script, with a token (${#token} characters)" [ "${#token}" = 82 ]
    replies=$(our_replies | grep "chaddr=$mac" || true)
    check "$name: netboot answered it by ProxyDHCP" grep -q "offer chaddr=$mac" <<<"$replies"
    check "$name: the script URL went to its iPXE" grep -q "file=http://$SRV_IP:$BOOT_HTTP_PORT/ipxe/${mac//:/-}" <<<"$replies"
    check "$name: no reply of netboot carries an address" bash -c '! grep -v "yiaddr=0.0.0.0 " <<<"$1" | grep -q .' _ "$replies"
    if grep -q ":4011 " <<<"$(grep "chaddr=$mac" "$WORK/sniff.log")"; then
        log "$name: the firmware asked the boot-server port (4011):"$'\n'"$(grep "chaddr=$mac" "$WORK/sniff.log" | grep 4011)"
    else
        log "$name: the firmware took the boot file from the ProxyDHCP offer (no request to 4011)"
    fi
}

# uefi_got_loader: netboot named the UEFI loader to the OVMF machine (offer, or ACK on 4011)
uefi_got_loader() { our_replies | grep "chaddr=$MAC_UEFI" | grep -q "vc=PXEClient file=$UEFI_LOADER\$"; }
# http_got_loader: netboot named ipxe.efi's URL to the HTTP Boot machine, as an HTTPClient offer
http_got_loader() {
    our_replies | grep "chaddr=$MAC_HTTP" |
        grep -q "vc=HTTPClient file=http://$SRV_IP:$BOOT_HTTP_PORT/boot/ipxe.efi\$"
}

for p in $PATHS; do
    case "$p" in
        seabios) boot_path seabios-ipxe-rom seabios "$MAC_BIOS" "$IP_BIOS" ;;
        ovmf)
            boot_path ovmf-pxe-snponly ovmf "$MAC_UEFI" "$IP_UEFI"
            check "ovmf-pxe-snponly: the firmware got $UEFI_LOADER by ProxyDHCP" uefi_got_loader ;;
        httpboot)
            boot_path ovmf-http ovmf-http "$MAC_HTTP" "$IP_HTTP"
            check "ovmf-http: the firmware got the HTTPClient offer of /boot/ipxe.efi" http_got_loader ;;
        *) fail "unknown path $p" ;;
    esac
done

# Another host asking for a booted machine's script (its window is open) is refused.
if [[ " $PATHS " == *" seabios "* ]]; then
    code=$(ip netns exec "$PLAIN_NS" curl -s -o /dev/null -w '%{http_code}' \
        "http://$SRV_IP:$BOOT_HTTP_PORT/ipxe/${MAC_BIOS//:/-}" || true)
    check "a booted machine's script, asked for from another address, is refused (got $code)" [ "$code" = 403 ]
fi

# --- over the whole run ----------------------------------------------------------------------
check "netboot never sent an address" bash -c \
    "! grep -E '^[0-9.]+ $SRV_IP:(67|4011)->' '$WORK/sniff.log' | grep -qv 'yiaddr=0.0.0.0 '"
check "netboot never sent a NAK" bash -c \
    "! grep -E '^[0-9.]+ $SRV_IP:(67|4011)->' '$WORK/sniff.log' | grep -q ' nak '"
check "netboot still runs" alive "$NETBOOT_PID"
log "netboot's replies: $(our_replies | wc -l) (sniff log: $WORK/sniff.log)"
finish

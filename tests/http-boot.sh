#!/bin/bash
# UEFI HTTP Boot, for real: OVMF with only its IPv4 HTTP Boot (its PXE turned off, and netboot's
# TFTP listening on loopback only, out of the VM's reach) boots from `provisioner netboot` with
# the iPXE folder of Debian's ipxe package used as installed (/usr/lib/ipxe, whose ipxe.efi is
# a symlink to /boot/ipxe.efi):
#   DHCP (vendor class HTTPClient) -> http://…/boot/ipxe.efi -> iPXE -> DHCP (user class iPXE)
#   -> HTTP script -> kernel + initrd that prints a marker.
# Host checks: the marker within $TIMEOUT s, the reserved address, netboot's log of the
# HTTPClient answer and of /boot/ipxe.efi served with 200, and no TFTP request at all.
#   TIMEOUT=180  KEEP_WORK=1 (keep logs and the serial console)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$REPO/tests/lib-qemu.sh"

TIMEOUT=${TIMEOUT:-180}
MARKER=PROVISIONER-HTTP-BOOT-OK
MAC=52:54:00:a0:00:03
IP=$SUBNET_PREFIX.23
IPXE_DIR=/usr/lib/ipxe

check "Debian's $IPXE_DIR/ipxe.efi is the package's symlink to /boot/ipxe.efi" \
    test "$(readlink "$IPXE_DIR/ipxe.efi")" = /boot/ipxe.efi
[ -x "$PROVISIONER" ] || { fail "$PROVISIONER is built (cargo build -p agent)"; finish; }

netns_up
add_tap tap0
boot_setup "$WORK/boot" "$MARKER"
boot_add_machine "$WORK/boot" node-http "$MAC" "$IP"
# TFTP on the namespace's loopback: netboot runs as usual, but the VM cannot reach it.
boot_write_config "$WORK/boot" \
    "listen: {dhcp: \"0.0.0.0:67\", tftp: \"127.0.0.1:69\", http: \"$SRV_IP:$BOOT_HTTP_PORT\"}"
NETBOOT_LOG=$WORK/netboot.log
pid=$(start_in_srv netboot env RUST_LOG=info,netboot=debug "$PROVISIONER" netboot \
    --config "$WORK/boot/provisioner.yaml")
http_up() { in_srv bash -c "exec 3<>/dev/tcp/$SRV_IP/$BOOT_HTTP_PORT"; }
if ! wait_for -p "$pid" 15 http_up; then
    fail "netboot starts with ipxeDir $IPXE_DIR"
    tail -n 20 "$NETBOOT_LOG" >&2
    finish
fi
pass "netboot starts with ipxeDir $IPXE_DIR as installed"

if qemu_boot ovmf-http ovmf-http "$MAC" tap0 "$MARKER" "$TIMEOUT"; then
    pass "OVMF HTTP Boot: marker after ${QEMU_ELAPSED}s"
    echo "BOOT ovmf-http seconds=$QEMU_ELAPSED"
else
    fail "OVMF HTTP Boot: no $MARKER within ${TIMEOUT}s; serial console tail:"
    qemu_tail ovmf-http 25 >&2
fi
check "the VM had its reserved address $IP" grep -aq "$IP" "$(qemu_serial ovmf-http)"
stop_pid "$pid"

# What netboot saw: the firmware's HTTPClient request, the loader over HTTP, and no TFTP.
check "netboot answered the firmware as a UEFI HTTP Boot client" grep -q "UefiHttp" "$NETBOOT_LOG"
check "netboot served /boot/ipxe.efi (through the package's symlink) with 200" \
    grep -qE '"?/boot/ipxe.efi"?.*status=200|status=200.*"?/boot/ipxe.efi' "$NETBOOT_LOG"
check "then iPXE fetched the machine's script" grep -q "/ipxe/${MAC//:/-}" "$NETBOOT_LOG"
# (netboot logs every TFTP request, served or refused, at info or debug: "TFTP read request",
# "TFTP request refused", "malformed TFTP …")
check "no TFTP request reached netboot" \
    bash -c "! grep -qE 'TFTP (read |write )?request|malformed TFTP|TFTP file served' '$NETBOOT_LOG'"
finish

#!/bin/bash
# Real-firmware boot chain: a QEMU guest network-boots the Debian kernel and a busybox initrd
# whose /init prints a marker, served by our netboot servers (or the dnsmasq reference).
#   (a) SeaBIOS + QEMU's iPXE NIC ROM: DHCP (user class iPXE) -> HTTP script -> kernel + initrd
#   (b) OVMF's own PXE (NIC ROM disabled): DHCP (arch 7) -> TFTP snponly.efi -> DHCP (iPXE)
#       -> HTTP script -> kernel + initrd
# Each must print the marker on the serial console within $TIMEOUT seconds.
#
#   BACKEND=provisioner|dnsmasq   server under test (default provisioner)
#   PATHS="seabios ovmf"          which boot paths to run
#   TIMEOUT=120  KEEP_WORK=1 (keep logs and serial consoles)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$REPO/tests/lib-qemu.sh"

BACKEND=${BACKEND:-provisioner}
PATHS=${PATHS:-seabios ovmf}
TIMEOUT=${TIMEOUT:-120}
MARKER=PROVISIONER-BOOT-OK
MAC_SEABIOS=52:54:00:a0:00:01
MAC_OVMF=52:54:00:a0:00:02

netns_up
add_tap tap0
boot_setup "$WORK/boot" "$MARKER"
boot_add_machine "$WORK/boot" node-bios "$MAC_SEABIOS" "$SUBNET_PREFIX.21"
boot_add_machine "$WORK/boot" node-uefi "$MAC_OVMF" "$SUBNET_PREFIX.22"
if ! backend_start "$BACKEND" "$WORK/boot"; then
    fail "$BACKEND servers start"
    tail -n 30 "$WORK"/*.log >&2 || true
    finish
fi

# boot_path NAME FW MAC IP
boot_path() {
    local name=$1 fw=$2 mac=$3 ip=$4
    if qemu_boot "$name" "$fw" "$mac" tap0 "$MARKER" "$TIMEOUT"; then
        pass "$name ($BACKEND): marker after ${QEMU_ELAPSED}s"
        echo "BOOT $name backend=$BACKEND seconds=$QEMU_ELAPSED"
        # iPXE's "Configuring" waits ~16 s when no IPv6 router advertisement comes (informational)
        local span
        if span=$(qemu_line_span "$name" 'Configuring \(net0') && [ -n "$span" ]; then
            log "$name: iPXE network configuration took $(awk '{printf "%.1f", $2-$1}' <<<"$span")s"
        fi
        # the marker line comes from the initrd we built, booted by the address we reserved
        check "$name got its reserved address $ip" grep -aq "$ip" "$(qemu_serial "$name")"
    else
        fail "$name ($BACKEND): no $MARKER within ${TIMEOUT}s; serial console tail:"
        qemu_tail "$name" 25 >&2
    fi
}

for p in $PATHS; do
    case "$p" in
        seabios) boot_path seabios-ipxe-rom seabios "$MAC_SEABIOS" "$SUBNET_PREFIX.21" ;;
        ovmf) boot_path ovmf-pxe-snponly ovmf "$MAC_OVMF" "$SUBNET_PREFIX.22" ;;
        *) fail "unknown path $p" ;;
    esac
done
backend_stop
finish

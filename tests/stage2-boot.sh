#!/bin/bash
# stage2 as PID 1: builds the static stage2 binary and an initrd for the installed Debian kernel
# (`stage2 build-initrd`), boots them in QEMU (TCG, -kernel/-initrd) with a virtio NIC on a tap
# in the test's namespace and an empty virtio disk, with `provisioner netboot` as DHCP server
# holding a reservation for the VM's MAC. From the serial console it checks that stage2 loaded
# virtio_net and virtio_blk from the initrd, saw the disk, got the reserved address by DHCP,
# and rebooted (QEMU runs with -no-reboot, so that ends it) instead of exiting or panicking.
# Prints the initrd size and the time from QEMU start to "DHCP bound".
#
#   TIMEOUT=120  KEEP_WORK=1 (keep logs and the serial console)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$REPO/tests/lib-qemu.sh"

TIMEOUT=${TIMEOUT:-120}
MAC=52:54:00:5e:00:20
IP=$SUBNET_PREFIX.20
STATIC_TARGET_DIR=${STATIC_TARGET_DIR:-$REPO/target/static}
STAGE2=$STATIC_TARGET_DIR/x86_64-unknown-linux-gnu/debug/stage2
MAX_INITRD=$((16 * 1024 * 1024))

log "building static stage2"
build_static_stage2 "$STATIC_TARGET_DIR"
check "stage2 is statically linked (no ELF interpreter)" \
    bash -c "! readelf -l '$STAGE2' | grep -q 'program interpreter'"

KERNEL=$(qemu_kernel)
KVER=${KERNEL#/boot/vmlinuz-}
t0=$(date +%s.%N)
"$STAGE2" build-initrd --kernel-release "$KVER" --out "$WORK/initrd.img" | tee "$WORK/build-initrd.out"
build_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
size=$(stat -c %s "$WORK/initrd.img")
echo "INITRD kernel=$KVER bytes=$size mib=$(awk -v s="$size" 'BEGIN{printf "%.2f", s/1048576}') build_seconds=$build_s"
check "initrd under 16 MiB ($size bytes)" test "$size" -lt "$MAX_INITRD"
"$STAGE2" build-initrd --kernel-release "$KVER" --out "$WORK/initrd2.img" >/dev/null
check "two initrd builds are byte-identical" cmp -s "$WORK/initrd.img" "$WORK/initrd2.img"

netns_up
add_tap tap0
mkdir -p "$WORK/boot/assets" "$WORK/boot/machines"
# QEMU boots the kernel and initrd directly (-kernel): netboot only answers DHCP here, but it
# refuses to start without the boot files its configuration names.
stub_boot_files "$WORK/boot/assets" vmlinuz initrd.img
: > "$WORK/boot/machines.list"
boot_add_machine "$WORK/boot" stage2-vm "$MAC" "$IP"
if ! backend_start provisioner "$WORK/boot"; then
    fail "provisioner netboot starts"
    tail -n 30 "$WORK"/*.log >&2 || true
    finish
fi

truncate -s 256M "$WORK/disk.raw"
# The NIC keeps qemu_start's bootindex=1, but -kernel's linuxboot ROM boots first.
qemu_start stage2 seabios "$MAC" tap0 \
    -kernel "$KERNEL" -initrd "$WORK/initrd.img" \
    -append "console=ttyS0 quiet stage2.reboot_delay=1" \
    -drive "file=$WORK/disk.raw,if=virtio,format=raw"
serial=$(qemu_serial stage2)
if qemu_wait stage2 'DHCP bound' "$TIMEOUT"; then
    pass "DHCP bound after ${QEMU_ELAPSED}s"
    echo "STAGE2 dhcp_bound_seconds=$QEMU_ELAPSED initrd_bytes=$size"
else
    fail "no 'DHCP bound' within ${TIMEOUT}s; serial console tail:"
    qemu_tail stage2 40 >&2
fi
# After DHCP stage2 has nothing to image (no orders in this test): it says so and reboots,
# which -no-reboot turns into QEMU exiting.
qemu_wait stage2 'stage2 stops; rebooting' 60 || true
check "QEMU exited after stage2's reboot" wait_for 60 not alive "$QEMU_PID"
qemu_stop stage2

check "virtio_net loaded from the initrd" grep -aq -E 'module loaded module="?virtio_net([" ]|$)' "$serial"
check "virtio_blk loaded from the initrd" grep -aq -E 'module loaded module="?virtio_blk([" ]|$)' "$serial"
check "ext4 loaded (always)" grep -aq -E 'module loaded module="?ext4([" ]|$)' "$serial"
check "disk vda seen (256 MiB)" grep -aqE "disk found disk=\"?vda\"? bytes=$((256 * 1024 * 1024))" "$serial"
check "reserved address $IP by DHCP" grep -aqE "DHCP bound .*ip=$IP/24" "$serial"
check "netboot logged the lease" grep -aqiE "$IP" "$WORK/provisioner.log"
check "no kernel panic (PID 1 never exited)" bash -c "! grep -aq 'Kernel panic' '$serial'"
check "no module load failures" bash -c "! grep -aq 'WARN module not loaded' '$serial'"
for phase in 'stage2 starting' 'module index loaded' 'drivers loaded' 'DHCP bound'; do
    t=$(qemu_time_of stage2 "$phase" || echo "?")
    log "at ${t}s: $phase"
done
[ "$FAILURES" -eq 0 ] || qemu_tail stage2 60 >&2
backend_stop
finish

#!/bin/bash
# End to end, under each firmware of $FIRMWARES (default: SeaBIOS + QEMU's iPXE NIC ROM, then
# OVMF + snponly.efi; TCG): a VM with an empty virtio disk PXE-boots from `provisioner netboot`,
# gets the imaging script, boots stage2, which writes a bootable test image served by
# `provisioner imageserver`, adds the cloud-init drop-in and reboots (QEMU runs with
# -no-reboot, so that ends the first VM). A second VM from the same disk, network still first
# in the boot order, gets netboot's local-boot script (`sanboot --drive 0x80` on BIOS, `exit`
# on UEFI), and the firmware boots the disk: syslinux (BIOS) or systemd-boot (UEFI) from the
# image's ESP boots a kernel whose initrd prints a marker. One machine (MAC, disk) per firmware.
#
# The test image (tests/lib-image.sh) is the same bytes for both firmwares, built without loop
# mounts: GPT, an ESP with systemd-boot and syslinux (gptmbr.bin, legacy-BIOS-bootable
# attribute), an ext4 root.
#
# Host checks: the disk outside the root partition is byte-identical to the image; the root
# partition holds the drop-in (mode 0600, seedfrom netboot's NoCloud URL); netboot logged
# PXEBooting → Imaging → Imaged; the state file says Imaged. Prints the time of each phase.
#
#   FIRMWARES="seabios ovmf"  TIMEOUT=240 (per VM)  KEEP_WORK=1 (keep logs, consoles, disks)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$REPO/tests/lib-qemu.sh"
. "$REPO/tests/lib-image.sh"

TIMEOUT=${TIMEOUT:-240}
FIRMWARES=${FIRMWARES:-seabios ovmf}
MARKER=E2E-IMAGED-SYSTEM-BOOTED
STATIC_TARGET_DIR=${STATIC_TARGET_DIR:-$REPO/target/static}
STAGE2=$STATIC_TARGET_DIR/x86_64-unknown-linux-gnu/debug/stage2
MIB=$((1024 * 1024))

image_tools_present || { fail "the image tools are installed (tests/install-deps.sh)"; finish; }

log "building static stage2"
build_static_stage2 "$STATIC_TARGET_DIR"
KERNEL=$(qemu_kernel)
KVER=${KERNEL#/boot/vmlinuz-}
mkdir -p "$WORK/boot/assets" "$WORK/boot/machines" "$WORK/images"
: > "$WORK/boot/machines.list"
cp "$KERNEL" "$WORK/boot/assets/vmlinuz"
"$STAGE2" build-initrd --kernel-release "$KVER" --out "$WORK/boot/assets/stage2.img" >/dev/null

B=$WORK/build
mk_test_image "$B" "$MARKER"
zstd -q -3 -f "$IMAGE" -o "$WORK/images/node.img.zst"
log "image: $IMAGE_BYTES bytes, $(stat -c %s "$WORK/images/node.img.zst") zstd, sha256 $IMAGE_SHA256"

# --- servers ----------------------------------------------------------------------------------
netns_up
add_tap tap0
declare -A MACS=([seabios]=52:54:00:5e:00:31 [ovmf]=52:54:00:5e:00:30)
declare -A IPS=([seabios]=$SUBNET_PREFIX.31 [ovmf]=$SUBNET_PREFIX.30)
for fw in $FIRMWARES; do
    [ -n "${MACS[$fw]:-}" ] || { fail "unknown firmware $fw (seabios, ovmf)"; finish; }
    boot_add_machine "$WORK/boot" "e2e-$fw" "${MACS[$fw]}" "${IPS[$fw]}"
done
UEFI_LOADER=snponly.efi BOOT_INITRD=stage2.img BOOT_CMDLINE="console=ttyS0 stage2.reboot_delay=2" \
    boot_write_config "$WORK/boot" \
    "image: {url: \"http://$SRV_IP:8081/node.img.zst\", sha256: $IMAGE_SHA256, size: $IMAGE_BYTES}" \
    "stateFile: $WORK/state.yaml"
start_in_srv netboot env RUST_LOG=info "$PROVISIONER" netboot --config "$WORK/boot/provisioner.yaml" >/dev/null
start_in_srv imageserver "$PROVISIONER" imageserver --dir "$WORK/images" --listen "$SRV_IP:8081" >/dev/null
check "netboot is ready" wait_for 10 grep -q 'netboot ready' "$WORK/netboot.log"
check "imageserver is ready" wait_for 10 grep -q 'imageserver ready' "$WORK/imageserver.log"
phase() { sed -n "/^  $1:/,/^  [^ ]/p" "$WORK/state.yaml" 2>/dev/null | sed -n 's/^    phase: //p'; }
phase_is() { [ "$(phase "$1")" = "$2" ]; }

# provision FW: both VMs of one firmware, the host checks, the figures
provision() {
    local fw=$1 name=e2e-$1 mac=${MACS[$1]} disk=$WORK/disk-$1.raw serial
    truncate -s 64M "$disk"
    local disk_args=(-drive "file=$disk,if=none,id=d0,format=raw" -device virtio-blk-pci,drive=d0,bootindex=2)

    # VM 1: PXE → stage2 writes the disk → reboot (ends QEMU)
    QEMU_MEM=768 qemu_start "imaging-$fw" "$fw" "$mac" tap0 "${disk_args[@]}"
    if qemu_wait "imaging-$fw" 'imaged; rebooting' "$TIMEOUT"; then
        pass "$fw: stage2 imaged the disk (${QEMU_ELAPSED}s after QEMU start)"
    else
        fail "$fw: stage2 did not finish imaging within ${TIMEOUT}s"
        qemu_tail "imaging-$fw" 40 >&2
    fi
    check "$fw: QEMU exited on stage2's reboot" wait_for 60 not alive "$QEMU_PID"
    qemu_stop "imaging-$fw"
    serial=$(qemu_serial "imaging-$fw")
    check "$fw: progress lines on the console (bytes, rate, percent)" grep -aqE 'imaging: [0-9.]+ MiB of [0-9.]+ MiB written \([0-9]+%\), [0-9.]+ MiB/s' "$serial"
    check "$fw: stage2 verified the sha256" grep -aq 'sha256 verified' "$serial"
    check "$fw: stage2 wrote the cloud-init drop-in" grep -aq 'cloud-init drop-in written on /dev/vda2' "$serial"
    check "$fw: no kernel panic" bash -c "! grep -aq 'Kernel panic' '$serial'"
    check "$fw: state file: Imaged" wait_for 10 phase_is "$name" Imaged
    check "$fw: phases logged in order PXEBooting → Imaging → Imaged" bash -c \
        "grep -o '$name [A-Za-z]* -> [A-Za-z]*' '$WORK/netboot.log' | tr '\n' ' ' | grep -q '$name Pending -> PXEBooting $name PXEBooting -> Imaging $name Imaging -> Imaged'"

    # host checks on the disk
    check "$fw: disk outside the root partition is the image, sha256" [ \
        "$(image_outside_root_sha256 "$disk")" = "$(image_outside_root_sha256 "$IMAGE")" ]
    dd if="$disk" of="$B/root-$fw.out" bs=1M skip=$IMAGE_ROOT_START_MIB count=$IMAGE_ROOT_MIB status=none
    debugfs -R "cat /etc/cloud/cloud.cfg.d/90-provisioner.cfg" "$B/root-$fw.out" > "$B/drop-in-$fw" 2>/dev/null || true
    check "$fw: drop-in seeds NoCloud from netboot" grep -qE "seedfrom: http://$SRV_IP:$BOOT_HTTP_PORT/nocloud/[0-9a-f]{64}/" "$B/drop-in-$fw"
    check "$fw: drop-in limits cloud-init to NoCloud" grep -qx 'datasource_list: \[NoCloud\]' "$B/drop-in-$fw"
    check "$fw: drop-in is mode 0600" bash -c "debugfs -R 'stat /etc/cloud/cloud.cfg.d/90-provisioner.cfg' '$B/root-$fw.out' 2>/dev/null | grep -q 'Mode:  0600'"
    check "$fw: the image's own files are intact" bash -c "debugfs -R 'cat /etc/e2e-image' '$B/root-$fw.out' 2>/dev/null | grep -qx 'e2e test image'"

    # VM 2: same disk, network first: netboot says boot locally; the firmware boots the disk.
    # OVMF tries every network boot option of the NIC before the disk: PXEv4 (netboot's script
    # says `exit 1`), then HTTP Boot v4 (a few seconds), then the disk; qemu_start turns the
    # firmware's IPv6 off, which removes PXEv6 and HTTP Boot v6 (about a minute each waiting for
    # DHCPv6). Disk first would skip them but not test local boot.
    QEMU_MEM=512 qemu_start "localboot-$fw" "$fw" "$mac" tap0 "${disk_args[@]}"
    if qemu_wait "localboot-$fw" "$MARKER" "$TIMEOUT"; then
        pass "$fw: the imaged system booted from its disk and printed the marker (${QEMU_ELAPSED}s)"
    else
        fail "$fw: no marker from the imaged system within ${TIMEOUT}s"
        qemu_tail "localboot-$fw" 40 >&2
    fi
    qemu_stop "localboot-$fw"
    if [ "$fw" = seabios ]; then
        check "$fw: the disk's syslinux booted it" grep -aq 'SYSLINUX' "$(qemu_serial "localboot-$fw")"
    else
        check "$fw: no syslinux on the UEFI path" bash -c "! grep -aq 'SYSLINUX' '$(qemu_serial "localboot-$fw")'"
    fi
    check "$fw: still Imaged after the local boot" [ "$(phase "$name")" = Imaged ]
    check "$fw: netboot served the imaging script, then the local-boot script" bash -c \
        "grep -a 'machine=$name' '$WORK/netboot.log' | grep -o 'reason=\"[a-z -]*script\"' | uniq | tr '\n' ' ' | grep -q 'reason=\"imaging script\" reason=\"local boot script\"'"

    # Phase changes as netboot recorded them (wall clock), whatever module logs them. A log that
    # has none must not end the script here (pipefail): the checks above judge the phases.
    { grep -aE "::status[a-z_:]*: $name [A-Za-z]+ -> " "$WORK/netboot.log" || true; } \
        | sed -E "s/^([0-9T:.-]+)Z .*($name [A-Za-z]+ -> [A-Za-z]+).*/\1 \2/" | while read -r when change; do
            log "phase at $when: $change"
        done
    for what in 'stage2 starting' 'DHCP bound' 'imaging: disk' 'sha256 verified' 'cloud-init drop-in written' 'imaged; rebooting'; do
        log "$fw imaging VM at $(qemu_time_of "imaging-$fw" "$what" || echo '?')s: $what"
    done
    log "$fw local-boot VM at $(qemu_time_of "localboot-$fw" "$MARKER" || echo '?')s: $MARKER"
    echo "E2E firmware=$fw image_bytes=$IMAGE_BYTES imaged_seconds=$(qemu_time_of "imaging-$fw" 'imaged; rebooting' || echo '?') marker_seconds=$(qemu_time_of "localboot-$fw" "$MARKER" || echo '?')"
}

for fw in $FIRMWARES; do provision "$fw"; done
finish

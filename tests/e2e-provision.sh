#!/bin/bash
# End to end: a UEFI VM (OVMF + snponly.efi, TCG) with an empty virtio disk PXE-boots from
# `provisioner netboot`, gets the imaging script, boots stage2, which writes a bootable test
# image served by `provisioner imageserver`, adds the cloud-init drop-in and reboots (QEMU runs
# with -no-reboot, so that ends the first VM). A second VM from the same disk, network still
# first in the boot order, gets netboot's local-boot script (`exit` on UEFI), falls through to
# the disk, and systemd-boot from the image's ESP boots a kernel whose initrd prints a marker.
#
# The test image is built without loop mounts: a GPT (sfdisk) with an ESP (mkfs.vfat + mtools:
# systemd-boot as \EFI\BOOT\BOOTX64.EFI, a loader entry, the host kernel and a marker initrd)
# and an ext4 root ("Linux root (x86-64)" type, made by mke2fs -d).
#
# Host checks: the disk outside the root partition is byte-identical to the image; the root
# partition holds the drop-in (mode 0600, seedfrom netboot's NoCloud URL); netboot logged
# PXEBooting → Imaging → Imaged; the state file says Imaged. Prints the time of each phase.
#
#   TIMEOUT=240 (per VM)  KEEP_WORK=1 (keep logs, serial consoles and the disk)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$REPO/tests/lib-qemu.sh"

TIMEOUT=${TIMEOUT:-240}
MAC=52:54:00:5e:00:30
IP=$SUBNET_PREFIX.30
NAME=e2e-vm
MARKER=E2E-IMAGED-SYSTEM-BOOTED
STATIC_TARGET_DIR=${STATIC_TARGET_DIR:-$REPO/target/static}
STAGE2=$STATIC_TARGET_DIR/x86_64-unknown-linux-gnu/debug/stage2
SYSTEMD_BOOT=/usr/lib/systemd/boot/efi/systemd-bootx64.efi
MIB=$((1024 * 1024))
ROOT_START_MIB=25 # 1 MiB GPT area + 24 MiB ESP
ROOT_MIB=8

for tool in sfdisk mkfs.vfat mmd mcopy mke2fs debugfs zstd; do
    command -v "$tool" >/dev/null || { fail "$tool is installed (tests/install-deps.sh)"; finish; }
done
[ -f "$SYSTEMD_BOOT" ] || { fail "$SYSTEMD_BOOT exists (systemd-boot-efi)"; finish; }

log "building static stage2"
(cd "$REPO" && RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_DEV_DEBUG=0 \
    CARGO_PROFILE_DEV_STRIP=true cargo build -q -p stage2 --bin stage2 \
    --target x86_64-unknown-linux-gnu --target-dir "$STATIC_TARGET_DIR" \
    --config 'profile.dev.package.zstd-sys.opt-level=3' \
    --config 'profile.dev.package.liblzma-sys.opt-level=3')
KERNEL=$(qemu_kernel)
KVER=${KERNEL#/boot/vmlinuz-}
mkdir -p "$WORK/boot/assets" "$WORK/boot/machines" "$WORK/images" "$WORK/build"
cp "$KERNEL" "$WORK/boot/assets/vmlinuz"
"$STAGE2" build-initrd --kernel-release "$KVER" --out "$WORK/boot/assets/stage2.img" >/dev/null

# --- the test image ---------------------------------------------------------------------------
B=$WORK/build
qemu_mk_initrd "$B/marker-initrd.img" "$MARKER"
truncate -s 24M "$B/esp.fat"
mkfs.vfat -F 16 -n ESP "$B/esp.fat" >/dev/null
mmd -i "$B/esp.fat" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
printf 'timeout 0\ndefault e2e.conf\n' > "$B/loader.conf"
printf 'title e2e\nlinux /vmlinuz\ninitrd /initrd.img\noptions console=ttyS0 quiet\n' > "$B/e2e.conf"
mcopy -i "$B/esp.fat" "$SYSTEMD_BOOT" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$B/esp.fat" "$KERNEL" ::/vmlinuz
mcopy -i "$B/esp.fat" "$B/marker-initrd.img" ::/initrd.img
mcopy -i "$B/esp.fat" "$B/loader.conf" ::/loader/loader.conf
mcopy -i "$B/esp.fat" "$B/e2e.conf" ::/loader/entries/e2e.conf
mkdir -p "$B/root/etc"
echo "e2e test image" > "$B/root/etc/e2e-image"
mke2fs -q -t ext4 -L root -d "$B/root" "$B/root.ext4" "${ROOT_MIB}M"
IMAGE=$B/node.img
truncate -s $(((ROOT_START_MIB + ROOT_MIB + 1) * MIB)) "$IMAGE"
sfdisk -q "$IMAGE" <<EOF
label: gpt
start=2048, size=24MiB, type=uefi, name=esp
size=${ROOT_MIB}MiB, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root
EOF
dd if="$B/esp.fat" of="$IMAGE" bs=1M seek=1 conv=notrunc status=none
dd if="$B/root.ext4" of="$IMAGE" bs=1M seek=$ROOT_START_MIB conv=notrunc status=none
zstd -q -3 -f "$IMAGE" -o "$WORK/images/node.img.zst"
SHA=$(sha256sum "$IMAGE" | cut -d' ' -f1)
IMAGE_BYTES=$(stat -c %s "$IMAGE")
log "image: $IMAGE_BYTES bytes, $(stat -c %s "$WORK/images/node.img.zst") zstd, sha256 $SHA"

# --- servers ----------------------------------------------------------------------------------
netns_up
add_tap tap0
boot_add_machine "$WORK/boot" "$NAME" "$MAC" "$IP"
UEFI_LOADER=snponly.efi BOOT_INITRD=stage2.img BOOT_CMDLINE="console=ttyS0 stage2.reboot_delay=2" \
    BOOT_CONFIG_EXTRA="image: {url: \"http://$SRV_IP:8081/node.img.zst\", sha256: $SHA, size: $IMAGE_BYTES}
stateFile: $WORK/state.yaml" \
    boot_write_config "$WORK/boot"
start_in_srv netboot env RUST_LOG=info "$PROVISIONER" netboot --config "$WORK/boot/provisioner.yaml" >/dev/null
start_in_srv imageserver "$PROVISIONER" imageserver --dir "$WORK/images" --listen "$SRV_IP:8081" >/dev/null
for _ in $(seq 1 100); do
    grep -q "netboot ready" "$WORK/netboot.log" 2>/dev/null \
        && grep -q "imageserver ready" "$WORK/imageserver.log" 2>/dev/null && break
    sleep 0.1
done
check "netboot and imageserver are ready" bash -c "grep -q 'netboot ready' '$WORK/netboot.log' && grep -q 'imageserver ready' '$WORK/imageserver.log'"
phase() { sed -n "/^  $NAME:/,/^  [^ ]/p" "$WORK/state.yaml" 2>/dev/null | sed -n 's/^    phase: //p'; }

# --- VM 1: PXE → stage2 writes the disk → reboot (ends QEMU) ----------------------------------
truncate -s 64M "$WORK/disk.raw"
DISK_ARGS=(-drive "file=$WORK/disk.raw,if=none,id=d0,format=raw" -device virtio-blk-pci,drive=d0,bootindex=2)
QEMU_MEM=768 qemu_start imaging ovmf "$MAC" tap0 "${DISK_ARGS[@]}"
if qemu_wait imaging 'imaged; rebooting' "$TIMEOUT"; then
    pass "stage2 imaged the disk (${QEMU_ELAPSED}s after QEMU start)"
else
    fail "stage2 did not finish imaging within ${TIMEOUT}s"
    qemu_tail imaging 40 >&2
fi
for _ in $(seq 1 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.2; done
check "QEMU exited on stage2's reboot" bash -c "! kill -0 $QEMU_PID 2>/dev/null"
qemu_stop imaging
serial=$(qemu_serial imaging)
check "progress lines on the console (bytes, rate, percent)" grep -aqE 'imaging: [0-9.]+ MiB of [0-9.]+ MiB written \([0-9]+%\), [0-9.]+ MiB/s' "$serial"
check "stage2 verified the sha256" grep -aq 'sha256 verified' "$serial"
check "stage2 wrote the cloud-init drop-in" grep -aq 'cloud-init drop-in written on /dev/vda2' "$serial"
check "no kernel panic" bash -c "! grep -aq 'Kernel panic' '$serial'"
check "state file: Imaged" [ "$(phase)" = Imaged ]
check "phases logged in order PXEBooting → Imaging → Imaged" bash -c \
    "grep -o '$NAME [A-Za-z]* -> [A-Za-z]*' '$WORK/netboot.log' | tr '\n' ' ' | grep -q '$NAME Pending -> PXEBooting $NAME PXEBooting -> Imaging $NAME Imaging -> Imaged'"

# --- host checks on the disk ------------------------------------------------------------------
head_bytes=$((ROOT_START_MIB * MIB))
check "disk before the root partition (GPT, ESP) is the image, sha256" [ \
    "$(head -c "$head_bytes" "$WORK/disk.raw" | sha256sum)" = "$(head -c "$head_bytes" "$IMAGE" | sha256sum)" ]
check "backup GPT of the image is on the disk" cmp -s \
    <(tail -c "$MIB" "$IMAGE") <(dd if="$WORK/disk.raw" bs=1M skip=$((ROOT_START_MIB + ROOT_MIB)) count=1 status=none)
dd if="$WORK/disk.raw" of="$B/root.out" bs=1M skip=$ROOT_START_MIB count=$ROOT_MIB status=none
debugfs -R "cat /etc/cloud/cloud.cfg.d/90-provisioner.cfg" "$B/root.out" > "$B/drop-in" 2>/dev/null || true
check "drop-in seeds NoCloud from netboot" grep -qE "seedfrom: http://$SRV_IP:$BOOT_HTTP_PORT/nocloud/[0-9a-f]{64}/" "$B/drop-in"
check "drop-in limits cloud-init to NoCloud" grep -qx 'datasource_list: \[NoCloud\]' "$B/drop-in"
check "drop-in is mode 0600" bash -c "debugfs -R 'stat /etc/cloud/cloud.cfg.d/90-provisioner.cfg' '$B/root.out' 2>/dev/null | grep -q 'Mode:  0600'"
check "the image's own files are intact" bash -c "debugfs -R 'cat /etc/e2e-image' '$B/root.out' 2>/dev/null | grep -qx 'e2e test image'"

# --- VM 2: same disk, network first: netboot says boot locally; firmware boots the disk -----
# OVMF tries every network boot option of the NIC before the disk: PXEv4 (netboot's script
# says `exit`), then PXEv6 and HTTP Boot v4/v6, which wait about a minute each here (netboot
# answers neither DHCPv6 nor HTTP Boot). IPv6PXESupport=no removes PXEv6 (about 68 s); OVMF
# has no such knob for HTTP Boot, so HTTP Boot v6 still costs about 64 s (the same with QEMU's
# iPXE ROM instead of EDK2's PXE). Disk first would skip it but not test local boot.
QEMU_MEM=512 qemu_start localboot ovmf "$MAC" tap0 "${DISK_ARGS[@]}" \
    -fw_cfg name=opt/org.tianocore/IPv6PXESupport,string=no
if qemu_wait localboot "$MARKER" "$TIMEOUT"; then
    pass "the imaged system booted from its disk and printed the marker (${QEMU_ELAPSED}s)"
else
    fail "no marker from the imaged system within ${TIMEOUT}s"
    qemu_tail localboot 40 >&2
fi
qemu_stop localboot
check "still Imaged after the local boot" [ "$(phase)" = Imaged ]
check "netboot served the imaging script, then the local-boot script" bash -c \
    "grep -a 'machine=$NAME' '$WORK/netboot.log' | grep -o 'reason=\"[a-z -]*script\"' | uniq | tr '\n' ' ' | grep -q 'reason=\"imaging script\" reason=\"local boot script\"'"

# Phase changes as netboot recorded them (wall clock).
grep -a "provisioner::status: $NAME [A-Za-z]* -> " "$WORK/netboot.log" \
    | sed -E "s/^([0-9T:.-]+)Z .*($NAME [A-Za-z]+ -> [A-Za-z]+).*/\1 \2/" | while read -r when change; do
        log "phase at $when: $change"
    done
for what in 'stage2 starting' 'DHCP bound' 'imaging: disk' 'sha256 verified' 'cloud-init drop-in written' 'imaged; rebooting'; do
    log "imaging VM at $(qemu_time_of imaging "$what" || echo '?')s: $what"
done
log "local-boot VM at $(qemu_time_of localboot "$MARKER" || echo '?')s: $MARKER"
echo "E2E image_bytes=$IMAGE_BYTES imaged_seconds=$(qemu_time_of imaging 'imaged; rebooting' || echo '?') marker_seconds=$(qemu_time_of localboot "$MARKER" || echo '?')"
finish

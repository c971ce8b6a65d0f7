#!/bin/bash
# stage2 under faults, in QEMU (TCG) against `provisioner netboot` and `provisioner imageserver`
# in the test's namespace. Each fault is checked by its outcome on the host and at netboot:
#
# 1. resume: the imageserver is SIGKILLed mid-download (the VM's link is throttled to 40 Mbit/s
#    so the download lasts) and restarted on the same port a few seconds later; stage2 resumes
#    with a Range request at the byte where it stopped and completes: the disk outside the root
#    partition has the image's sha256, netboot says Imaged. Prints the resume offset.
# 2. two equal disks, no hint: stage2 refuses with the candidate list on the console, writes
#    nothing (both disks still all zero), netboot records Failed with that reason.
# 3. a Machine's own spec.image and a rootDevice hint (the serial of the second of two equal
#    disks): the orders name that image and disk; stage2 writes the Machine's image (its own
#    sha256, not the configured one's) onto the second disk, the first stays all zero, netboot
#    says Imaged.
# 4. wrong sha256 in the orders (PXE, SeaBIOS + iPXE ROM): the disk held a bootable system
#    before; after the failed write its first MiB and the backup GPT are zero (nothing to boot),
#    netboot records Failed with the reason, and the machine, rebooting, PXE-boots again and
#    netboot hands it a new imaging script (Failed → PXEBooting → Imaging).
#
# 1 to 3 boot stage2 directly (-kernel/-initrd) with the command line of the imaging script
# netboot serves for the machine (fetched as iPXE would; it carries the machine's token); 4
# uses PXE, since the next network boot is the point.
#
#   TIMEOUT=180 (per VM)  KEEP_WORK=1 (keep logs, consoles and disks)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$REPO/tests/lib-qemu.sh"
. "$REPO/tests/lib-image.sh"

TIMEOUT=${TIMEOUT:-180}
STATIC_TARGET_DIR=${STATIC_TARGET_DIR:-$REPO/target/static}
STAGE2=$STATIC_TARGET_DIR/x86_64-unknown-linux-gnu/debug/stage2
MIB=$((1024 * 1024))
DATA_MIB=48 # random, incompressible: ~80 MiB to fetch, ~17 s at 40 Mbit/s
MAC_RESUME=52:54:00:5e:00:40
MAC_DISKS=52:54:00:5e:00:41
MAC_SHA=52:54:00:5e:00:42
MAC_HINT=52:54:00:5e:00:43

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
mk_test_image "$B" FAULTS-MARKER "$DATA_MIB"
zstd -q -1 -f "$IMAGE" -o "$WORK/images/node.img.zst"
ZST_BYTES=$(stat -c %s "$WORK/images/node.img.zst")
log "image: $IMAGE_BYTES bytes, $ZST_BYTES zstd, sha256 $IMAGE_SHA256"
# The image of case 3's Machine (spec.image): another test image, without the random partition.
G_IMAGE=$IMAGE G_SHA256=$IMAGE_SHA256 G_BYTES=$IMAGE_BYTES
mk_test_image "$WORK/build-own" OWN-IMAGE-MARKER
OWN_IMAGE=$IMAGE OWN_SHA256=$IMAGE_SHA256 OWN_BYTES=$IMAGE_BYTES
IMAGE=$G_IMAGE IMAGE_SHA256=$G_SHA256 IMAGE_BYTES=$G_BYTES
zstd -q -1 -f "$OWN_IMAGE" -o "$WORK/images/own.img.zst"
log "the Machine's own image: $OWN_BYTES bytes, sha256 $OWN_SHA256"

netns_up
add_tap tap0
boot_add_machine "$WORK/boot" fault-resume "$MAC_RESUME" "$SUBNET_PREFIX.40"
boot_add_machine "$WORK/boot" fault-disks "$MAC_DISKS" "$SUBNET_PREFIX.41"
boot_add_machine "$WORK/boot" fault-sha "$MAC_SHA" "$SUBNET_PREFIX.42"
boot_add_machine "$WORK/boot" fault-hint "$MAC_HINT" "$SUBNET_PREFIX.43" \
    "image: {url: \"http://$SRV_IP:8081/own.img.zst\", sha256: $OWN_SHA256, size: $OWN_BYTES}" \
    "rootDevice: {serial: PV-DISK-B}"

# netboot_start SHA256 REBOOT_DELAY: (re)starts netboot with these orders (the state file stays);
# its log is $NETBOOT_LOG (one per start)
NETBOOT_PID=""
NETBOOT_STARTS=0
netboot_start() {
    [ -n "$NETBOOT_PID" ] && stop_pid "$NETBOOT_PID"
    UEFI_LOADER=snponly.efi BOOT_INITRD=stage2.img BOOT_CMDLINE="console=ttyS0 stage2.reboot_delay=$2" \
        boot_write_config "$WORK/boot" \
        "image: {url: \"http://$SRV_IP:8081/node.img.zst\", sha256: $1, size: $IMAGE_BYTES}" \
        "stateFile: $WORK/state.yaml"
    NETBOOT_STARTS=$((NETBOOT_STARTS + 1))
    NETBOOT_LOG=$WORK/netboot$NETBOOT_STARTS.log
    NETBOOT_PID=$(start_in_srv "netboot$NETBOOT_STARTS" env RUST_LOG=info "$PROVISIONER" netboot --config "$WORK/boot/provisioner.yaml")
    wait_for -p "$NETBOOT_PID" 10 grep -q "netboot ready" "$NETBOOT_LOG"
}
# imageserver_start LOGNAME: on the same address every time; sets IMAGESERVER_PID
imageserver_start() {
    IMAGESERVER_PID=$(start_in_srv "$1" "$PROVISIONER" imageserver --dir "$WORK/images" --listen "$SRV_IP:8081")
    wait_for -p "$IMAGESERVER_PID" 10 grep -q "imageserver ready" "$WORK/$1.log"
}
phase() { sed -n "/^  $1:/,/^  [^ ]/p" "$WORK/state.yaml" 2>/dev/null | sed -n 's/^    phase: //p'; }
phase_is() { [ "$(phase "$1")" = "$2" ]; }
# message NAME: the machine's message in the state file (a YAML block scalar when multi-line)
message() {
    sed -n "/^  $1:/,/^  [^ ]/p" "$WORK/state.yaml" 2>/dev/null \
        | sed -n '/^    message:/,/^    [a-zA-Z]/p' | sed '$d; s/^    message: //; s/^|-$//; s/^ *//' | tr '\n' ' '
}
# orders_cmdline MAC: the kernel command line of the machine's imaging script, fetched as iPXE
# does: netboot gives it only to the machine's reserved address after a DHCP ACK, so a client
# namespace with the machine's MAC takes the lease and asks; it is gone before the VM with the
# same MAC starts.
orders_cmdline() {
    local name="ord${1##*:}" ns="pv-cord${1##*:}-$$"
    add_client "$name" "$1" >/dev/null
    udhcpc_bind "$ns" && ip netns exec "$ns" curl -sf "http://$SRV_IP:$BOOT_HTTP_PORT/ipxe/${1//:/-}" \
        | sed -n 's/^kernel [^ ]* initrd=[^ ]* //p'
    ip netns del "$ns"
}
all_zero() { [ "$(tr -d '\0' < "$1" | head -c 1 | wc -c)" = 0 ]; }
seconds_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

check "netboot is ready" netboot_start "$IMAGE_SHA256" 1
check "imageserver is ready" imageserver_start imageserver

# --- 1. imageserver killed mid-download, restarted: stage2 resumes with Range ------------------
args=$(orders_cmdline "$MAC_RESUME")
check "resume: netboot serves imaging orders" grep -q 'provisioner.token=' <<< "$args"
truncate -s 128M "$WORK/disk-resume.raw"
# Only the VM's direction is throttled (tap0's egress in the server namespace).
in_srv tc qdisc add dev tap0 root tbf rate 40mbit burst 64kb latency 400ms
qemu_start resume seabios "$MAC_RESUME" tap0 -kernel "$KERNEL" -initrd "$WORK/boot/assets/stage2.img" \
    -append "$args" -drive "file=$WORK/disk-resume.raw,if=virtio,format=raw"
if qemu_wait resume 'imaging: [0-9.]+ MiB of [0-9.]+ MiB written \(([1-9]|[1-5][0-9])%\)' "$TIMEOUT"; then
    killed_at=$(grep -aoE 'imaging: [0-9.]+ MiB of [0-9.]+ MiB written \([0-9]+%\)' "$(qemu_serial resume)" | tail -n 1)
    kill -9 "$IMAGESERVER_PID"
    log "imageserver (pid $IMAGESERVER_PID) killed at '${killed_at}' (${QEMU_ELAPSED}s)"
    # Restarted once stage2 has seen the break (else it might not notice before the restart).
    qemu_wait resume 'image download interrupted' 60 || true
    check "resume: imageserver restarted on the same port" imageserver_start imageserver2
else
    fail "resume: no progress line between 1% and 59% within ${TIMEOUT}s"
    qemu_tail resume 30 >&2
fi
if qemu_wait resume 'imaged; rebooting' "$TIMEOUT"; then
    pass "resume: stage2 imaged the disk (${QEMU_ELAPSED}s after QEMU start)"
else
    fail "resume: stage2 did not finish imaging within ${TIMEOUT}s"
    qemu_tail resume 40 >&2
fi
qemu_stop resume
in_srv tc qdisc del dev tap0 root
serial=$(qemu_serial resume)
offset=$(grep -a 'image download resumed' "$serial" | grep -oE 'offset=[0-9]+' | head -n 1 | cut -d= -f2)
check "resume: stage2 saw the download break and retried" grep -aq 'image download interrupted' "$serial"
check "resume: stage2 resumed with a Range request inside the file (offset ${offset:-none} of $ZST_BYTES)" \
    bash -c "[ -n '$offset' ] && [ '$offset' -gt 0 ] && [ '$offset' -lt $ZST_BYTES ]"
check "resume: one resume only (no restart from byte 0)" [ "$(grep -ac 'image download resumed' "$serial")" = 1 ]
check "resume: stage2 verified the sha256" grep -aq 'sha256 verified' "$serial"
check "resume: disk outside the root partition has the image's sha256" [ \
    "$(image_outside_root_sha256 "$WORK/disk-resume.raw")" = "$(image_outside_root_sha256 "$IMAGE")" ]
check "resume: netboot says Imaged" wait_for 10 phase_is fault-resume Imaged
echo "FAULT resume killed_at=\"${killed_at:-}\" resume_offset=${offset:-?} source_bytes=$ZST_BYTES imaged_seconds=$(qemu_time_of resume 'imaged; rebooting' || echo '?')"

# --- 2. two equal disks, no hint: refuse, write nothing ----------------------------------------
args=$(orders_cmdline "$MAC_DISKS")
truncate -s 128M "$WORK/disk-a.raw" "$WORK/disk-b.raw"
qemu_start disks seabios "$MAC_DISKS" tap0 -kernel "$KERNEL" -initrd "$WORK/boot/assets/stage2.img" \
    -append "$args" -drive "file=$WORK/disk-a.raw,if=virtio,format=raw" \
    -drive "file=$WORK/disk-b.raw,if=virtio,format=raw"
qemu_wait disks 'stage2 stops; rebooting' "$TIMEOUT" || qemu_tail disks 30 >&2
wait_for 60 not alive "$QEMU_PID" || true
qemu_stop disks
serial=$(qemu_serial disks)
check "disks: stage2 refuses to guess" grep -aq 'several disks qualify, refusing to guess' "$serial"
check "disks: the console lists both candidates" bash -c \
    "grep -aq '/dev/vda (134217728 bytes.*: candidate' '$serial' && grep -aq '/dev/vdb (134217728 bytes.*: candidate' '$serial'"
check "disks: nothing was written to the first disk (all zero)" all_zero "$WORK/disk-a.raw"
check "disks: nothing was written to the second disk (all zero)" all_zero "$WORK/disk-b.raw"
check "disks: netboot records Failed" wait_for 10 phase_is fault-disks Failed
check "disks: with the reason" bash -c "grep -q 'several disks qualify' <<< \"\$(sed -n '/^  fault-disks:/,/^  [^ ]/p' '$WORK/state.yaml')\""
log "disks: netboot message: $(message fault-disks | head -c 400)"
echo "FAULT disks refused_seconds=$(qemu_time_of disks 'several disks qualify' || echo '?')"

# --- 3. the Machine's own image onto the disk its rootDevice hint names ----------------------
args=$(orders_cmdline "$MAC_HINT")
check "hint: the orders name the Machine's own image and sha256" \
    grep -q "provisioner.image=http://$SRV_IP:8081/own.img.zst provisioner.sha256=$OWN_SHA256 provisioner.image_size=$OWN_BYTES" <<< "$args"
check "hint: and its disk hint" grep -q 'provisioner.disk.serial=PV-DISK-B' <<< "$args"
truncate -s 128M "$WORK/disk-ha.raw" "$WORK/disk-hb.raw"
qemu_start hint seabios "$MAC_HINT" tap0 -kernel "$KERNEL" -initrd "$WORK/boot/assets/stage2.img" \
    -append "$args" \
    -drive "file=$WORK/disk-ha.raw,if=none,id=ha,format=raw" -device virtio-blk-pci,drive=ha,serial=PV-DISK-A \
    -drive "file=$WORK/disk-hb.raw,if=none,id=hb,format=raw" -device virtio-blk-pci,drive=hb,serial=PV-DISK-B
if qemu_wait hint 'imaged; rebooting' "$TIMEOUT"; then
    pass "hint: stage2 imaged a disk (${QEMU_ELAPSED}s after QEMU start)"
else
    fail "hint: stage2 did not finish imaging within ${TIMEOUT}s"
    qemu_tail hint 40 >&2
fi
wait_for 60 not alive "$QEMU_PID" || true
qemu_stop hint
serial=$(qemu_serial hint)
check "hint: stage2 chose the second disk, by its serial" grep -aq 'imaging: disk /dev/vdb (134217728 bytes.*PV-DISK-B' "$serial"
check "hint: stage2 verified the sha256" grep -aq 'sha256 verified' "$serial"
check "hint: the first disk is untouched (all zero)" all_zero "$WORK/disk-ha.raw"
check "hint: the second disk outside the root partition is the Machine's own image, sha256" [ \
    "$(IMAGE_BYTES=$OWN_BYTES image_outside_root_sha256 "$WORK/disk-hb.raw")" = "$(IMAGE_BYTES=$OWN_BYTES image_outside_root_sha256 "$OWN_IMAGE")" ]
check "hint: and not the configured image" [ "$OWN_SHA256" != "$IMAGE_SHA256" ]
check "hint: netboot says Imaged" wait_for 10 phase_is fault-hint Imaged
echo "FAULT hint imaged_seconds=$(qemu_time_of hint 'imaged; rebooting' || echo '?') own_image_bytes=$OWN_BYTES"

# --- 4. wrong sha256 (PXE): disk left unbootable, Failed, the next PXE boot images again -------
WRONG_SHA=$(printf 'not the image' | sha256sum | cut -d' ' -f1)
check "sha: netboot restarted with a wrong sha256 in the orders" netboot_start "$WRONG_SHA" 8
cp "$IMAGE" "$WORK/disk-sha.raw" # a bootable system from before
truncate -s 128M "$WORK/disk-sha.raw"
check "sha: the disk starts out with a partition table" bash -c "sfdisk -d '$WORK/disk-sha.raw' | grep -q LegacyBIOSBootable"
# QEMU reboots this VM (the later -action overrides qemu_start's -no-reboot): a real second PXE boot.
qemu_start sha seabios "$MAC_SHA" tap0 -drive "file=$WORK/disk-sha.raw,if=none,id=d0,format=raw" \
    -device virtio-blk-pci,drive=d0,bootindex=2 -action reboot=reset
t0=$QEMU_T0
if qemu_wait sha 'imaging failed' "$TIMEOUT"; then
    pass "sha: stage2 reports the failure (${QEMU_ELAPSED}s)"
    wait_for 10 phase_is fault-sha Failed || true
    failed_s=$(seconds_since "$t0")
    # stage2 now waits stage2.reboot_delay (8 s) before rebooting: check the disk meanwhile.
    check "sha: first MiB of the disk is zero (no MBR, no GPT)" all_zero <(head -c "$MIB" "$WORK/disk-sha.raw")
    check "sha: backup GPT at the end of the disk is zero" all_zero <(tail -c "$MIB" "$WORK/disk-sha.raw")
    check "sha: sfdisk finds no partition table" bash -c "! sfdisk -d '$WORK/disk-sha.raw' >/dev/null 2>&1"
    check "sha: netboot records Failed" [ "$(phase fault-sha)" = Failed ]
    check "sha: with the sha256 mismatch as reason" bash -c "sed -n '/^  fault-sha:/,/^  [^ ]/p' '$WORK/state.yaml' | grep -q 'sha256 is [0-9a-f]*, expected $WRONG_SHA'"
    log "sha: netboot message: $(message fault-sha | head -c 200)"
else
    fail "sha: no 'imaging failed' within ${TIMEOUT}s"
    qemu_tail sha 40 >&2
fi
# The reboot: PXE again, netboot moves Failed → PXEBooting and serves imaging orders again.
imaging_again() {
    grep -aq 'fault-sha Failed -> PXEBooting' "$NETBOOT_LOG" &&
        [ "$(grep -ac 'fault-sha PXEBooting -> Imaging' "$NETBOOT_LOG")" -ge 2 ]
}
retried=0
wait_for -p "$QEMU_PID" "$TIMEOUT" imaging_again && retried=1
retry_s=$(seconds_since "$t0")
qemu_stop sha
check "sha: the machine rebooted and PXE-booted again (Failed → PXEBooting)" grep -aq 'fault-sha Failed -> PXEBooting' "$NETBOOT_LOG"
check "sha: and imaging started over (a second PXEBooting → Imaging)" [ "$retried" = 1 ]
check "sha: two stage2 boots on the console" [ "$(grep -ac 'stage2 starting' "$(qemu_serial sha)")" -ge 2 ]
echo "FAULT sha failed_seconds=${failed_s:-?} reimaging_seconds=$retry_s"
finish

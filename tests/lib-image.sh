# The test disk image of the end-to-end tests (sourced after tests/lib.sh and lib-qemu.sh), built
# without loop mounts, bootable by both firmwares from the same bytes:
#
#   partition 1  ESP, FAT16, 24 MiB, legacy-BIOS-bootable attribute set:
#                UEFI: systemd-boot as \EFI\BOOT\BOOTX64.EFI with a loader entry
#                BIOS: syslinux (gptmbr.bin in the first 440 bytes, ldlinux in the FAT) with a
#                      syslinux.cfg
#                both boot /vmlinuz (the host kernel) with /initrd.img printing MARKER
#   partition 2  ext4 root, "Linux root (x86-64)" type, label root, 8 MiB (stage2 writes its
#                cloud-init drop-in here)
#   partition 3  (only with DATA_MIB > 0) random bytes: makes the image large and incompressible
#                for tests that need a download that lasts
#
#   mk_test_image DIR MARKER [DATA_MIB]   writes DIR/node.img; sets IMAGE, IMAGE_SHA256,
#                                         IMAGE_BYTES, IMAGE_ROOT_START_MIB, IMAGE_ROOT_MIB
#   image_outside_root_sha256 FILE        sha256 of FILE's first IMAGE_BYTES without the root
#                                         partition (what stays byte-identical after stage2 adds
#                                         its drop-in)
#
# The product's debian-kubeadm image, for the tests that boot it (cluster-flow.sh,
# libvirt-lab.sh):
#
#   kubeadm_image BUNDLE                  sets IMG to the build output (manifest.json,
#                                         image.raw.zst, vmlinuz, stage2.img): $CLUSTER_IMAGE_DIR
#                                         as it is when set, else the build cached in $IMAGE_CACHE
#                                         for this set of inputs (build.sh, kubernetes.sh, the
#                                         profile, units, the bundle's SHA256SUMS, $PROVISIONER and
#                                         $STAGE2), built when missing; on failure says why (FAIL
#                                         line) and returns 1

SYSTEMD_BOOT=${SYSTEMD_BOOT:-/usr/lib/systemd/boot/efi/systemd-bootx64.efi}
SYSLINUX_GPTMBR=${SYSLINUX_GPTMBR:-/usr/lib/SYSLINUX/gptmbr.bin}
IMAGE_CACHE=${IMAGE_CACHE:-/var/tmp/provisioner-test-cache}
STATIC_TARGET_DIR=${STATIC_TARGET_DIR:-$REPO/target/static}
STAGE2=${STAGE2:-$STATIC_TARGET_DIR/x86_64-unknown-linux-gnu/debug/stage2}
IMAGE_ROOT_START_MIB=25 # 1 MiB GPT area + 24 MiB ESP
IMAGE_ROOT_MIB=8

# image_tools_present: 0 if every tool the image needs is installed (else says which is not)
image_tools_present() {
    local tool
    for tool in sfdisk mkfs.vfat mmd mcopy mke2fs debugfs zstd syslinux; do
        command -v "$tool" >/dev/null || { log "$tool is missing (tests/install-deps.sh)"; return 1; }
    done
    for tool in "$SYSTEMD_BOOT" "$SYSLINUX_GPTMBR"; do
        [ -f "$tool" ] || { log "$tool is missing (tests/install-deps.sh)"; return 1; }
    done
}

mk_test_image() {
    local b=$1 marker=$2 data_mib=${3:-0} mib=$((1024 * 1024)) kernel total_mib
    kernel=$(qemu_kernel)
    mkdir -p "$b"
    qemu_mk_initrd "$b/marker-initrd.img" "$marker"
    # -h 2048: the FAT's hidden-sectors field says where the partition starts, which syslinux's
    # boot sector needs to find ldlinux.sys on the disk.
    rm -f "$b/esp.fat"
    truncate -s 24M "$b/esp.fat"
    mkfs.vfat -F 16 -h 2048 -n ESP "$b/esp.fat" >/dev/null
    mmd -i "$b/esp.fat" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
    printf 'timeout 0\ndefault e2e.conf\n' > "$b/loader.conf"
    printf 'title e2e\nlinux /vmlinuz\ninitrd /initrd.img\noptions console=ttyS0 quiet\n' > "$b/e2e.conf"
    printf 'DEFAULT e2e\nPROMPT 0\nTIMEOUT 0\nLABEL e2e\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND console=ttyS0 quiet\n' \
        > "$b/syslinux.cfg"
    mcopy -i "$b/esp.fat" "$SYSTEMD_BOOT" ::/EFI/BOOT/BOOTX64.EFI
    mcopy -i "$b/esp.fat" "$kernel" ::/vmlinuz
    mcopy -i "$b/esp.fat" "$b/marker-initrd.img" ::/initrd.img
    mcopy -i "$b/esp.fat" "$b/loader.conf" ::/loader/loader.conf
    mcopy -i "$b/esp.fat" "$b/e2e.conf" ::/loader/entries/e2e.conf
    mcopy -i "$b/esp.fat" "$b/syslinux.cfg" ::/syslinux.cfg
    # syslinux (the mtools installer, no mount): boot sector + ldlinux.sys/ldlinux.c32
    syslinux --install "$b/esp.fat"
    rm -rf "$b/root"
    mkdir -p "$b/root/etc"
    echo "e2e test image" > "$b/root/etc/e2e-image"
    rm -f "$b/root.ext4"
    mke2fs -q -t ext4 -L root -d "$b/root" "$b/root.ext4" "${IMAGE_ROOT_MIB}M"
    IMAGE=$b/node.img
    total_mib=$((IMAGE_ROOT_START_MIB + IMAGE_ROOT_MIB + data_mib + 1))
    rm -f "$IMAGE"
    truncate -s $((total_mib * mib)) "$IMAGE"
    {
        echo "label: gpt"
        echo "start=2048, size=24MiB, type=uefi, name=esp, attrs=\"LegacyBIOSBootable\""
        echo "size=${IMAGE_ROOT_MIB}MiB, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root"
        if [ "$data_mib" -gt 0 ]; then echo "size=${data_mib}MiB, type=linux, name=data"; fi
    } | sfdisk -q "$IMAGE"
    # gptmbr.bin: the BIOS boot code that loads the legacy-bootable partition's boot sector
    dd if="$SYSLINUX_GPTMBR" of="$IMAGE" bs=440 count=1 conv=notrunc status=none
    dd if="$b/esp.fat" of="$IMAGE" bs=1M seek=1 conv=notrunc status=none
    dd if="$b/root.ext4" of="$IMAGE" bs=1M seek=$IMAGE_ROOT_START_MIB conv=notrunc status=none
    if [ "$data_mib" -gt 0 ]; then
        head -c $((data_mib * mib)) /dev/urandom \
            | dd of="$IMAGE" bs=1M seek=$((IMAGE_ROOT_START_MIB + IMAGE_ROOT_MIB)) conv=notrunc status=none iflag=fullblock
    fi
    IMAGE_SHA256=$(sha256sum "$IMAGE" | cut -d' ' -f1)
    IMAGE_BYTES=$(stat -c %s "$IMAGE")
}

image_outside_root_sha256() {
    local file=$1 mib=$((1024 * 1024))
    {
        head -c $((IMAGE_ROOT_START_MIB * mib)) "$file"
        head -c "$IMAGE_BYTES" "$file" | tail -c +$(((IMAGE_ROOT_START_MIB + IMAGE_ROOT_MIB) * mib + 1))
    } | sha256sum | cut -d' ' -f1
}

kubeadm_image() {
    local bundle=$1 key tmp f
    if [ -n "${CLUSTER_IMAGE_DIR:-}" ]; then
        IMG=$CLUSTER_IMAGE_DIR
        log "image: using $IMG as it is (CLUSTER_IMAGE_DIR)"
    else
        key=$( (cd "$REPO" && cat image-builder/build.sh image-builder/apt-sources.py \
            image-builder/kubernetes.sh image-builder/kubernetes/* image-builder/profiles/debian-kubeadm.conf \
            image-builder/provisioner.yaml units/*.* "$bundle/SHA256SUMS"; \
            sha256sum "$PROVISIONER" "$STAGE2" | cut -d' ' -f1) | sha256sum | cut -c1-16)
        IMG=$IMAGE_CACHE/kubeadm-image-$key
        if [ -f "$IMG/manifest.json" ]; then
            log "image: cached build $IMG"
        else
            mkdir -p "$IMAGE_CACHE"
            # Older builds take 600 MB and more each: keep only the one being made.
            rm -rf --one-file-system "$IMAGE_CACHE"/kubeadm-image-*
            tmp=$(mktemp -d "$IMAGE_CACHE/kubeadm-image-tmp.XXXXXX")
            log "image: building debian-kubeadm into $IMG (build log $WORK/image-build.log)"
            if ! "$REPO/image-builder/build.sh" --profile debian-kubeadm --kubernetes "$bundle" \
                --out "$tmp" --apt-cache "$IMAGE_CACHE/apt" --provisioner "$PROVISIONER" --stage2 "$STAGE2" \
                > "$WORK/image-build.log" 2>&1; then
                tail -n 30 "$WORK/image-build.log" >&2
                rm -rf --one-file-system "$tmp"
                fail "image-builder/build.sh --profile debian-kubeadm"
                return 1
            fi
            grep -E '^\[image [^]]*\] (done|stage|disk)' "$WORK/image-build.log" >&2 || true
            rm -rf --one-file-system "$tmp/rootfs"
            mv "$tmp" "$IMG"
        fi
    fi
    for f in manifest.json image.raw.zst vmlinuz stage2.img; do
        [ -f "$IMG/$f" ] || { fail "the image build has $f"; return 1; }
    done
}

#!/bin/bash
# The image builder: builds a profile (PROFILE, default debian-kubeadm with the Kubernetes bundle
# of tests/lib-kube.sh; image-builder/build.sh, mmdebstrap with the host's apt sources, no loop
# mounts) and checks the result without mounting anything:
#   - the apt sources: only the profile's suite, also from a host that lists newer suites
#   - GPT layout (sfdisk -J): ESP + "Linux root (x86-64)" partition, BIOS-bootable ESP
#   - ESP (mtools): systemd-boot, loader entry with root=PARTUUID of the root partition, the
#     kernel identical to the artifact, the initramfs, syslinux
#   - root ext4 (debugfs): our binaries identical to the rootfs, units and D-Bus files
#     installed, netboot.path (or the sockets) and imageserver.socket enabled, empty machine-id
#   - manifest.json: every sha256 and size matches its file (and the decompressed image)
#   - stage2 initrd: /init and the virtio modules of the image's own kernel
#   - debian-kubeadm: kubeadm, kubelet and kubectl are the bundle's; the kubelet unit and its
#     kubeadm drop-in; containerd's configuration; every image `kubeadm config images list`
#     names (CoreDNS aside) in containerd's store (listed by the image's own containerd, run
#     on a copy of the store); the units enabled
# Then boots the image in QEMU (-snapshot, TCG, disk first, a tap in the test's namespace where
# provisioner netboot answers its DHCP): OVMF (systemd-boot) until netboot.path has started and
# the image's network has its lease (OVMF_LOGIN=1: to the serial login prompt), and SeaBIOS (syslinux) to the image's systemd greeting.
# Prints the build time, the sizes and the boot time.
#
#   IMAGE_APT_CACHE=/var/tmp/pv-image-apt-cache (downloaded .debs kept between runs)
#   BOOT=ovmf|bios|0 (one firmware, or no QEMU boot; default both)  TIMEOUT=900  KEEP_WORK=1  IMAGE_OUT=DIR (check DIR, no build)
#   IMAGE_BUILD_OUT=DIR (build into DIR and keep it: run-all.sh hands it to nspawn.sh and cluster-flow.sh)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$REPO/tests/lib-qemu.sh"
. "$REPO/tests/lib-kube.sh"

PROFILE=${PROFILE:-debian-kubeadm}
TIMEOUT=${TIMEOUT:-900}
BOOT=${BOOT:-1}
APT_CACHE=${IMAGE_APT_CACHE:-/var/tmp/pv-image-apt-cache}
OUT=$WORK/out
MAC=52:54:00:5e:00:40
QEMU_MEM=1024
for tool in mmdebstrap sfdisk mdir mtype mcopy debugfs zstd cpio python3; do
    command -v "$tool" >/dev/null || { fail "$tool is installed (tests/install-deps.sh)"; finish; }
done
KUBE_ARGS=()
if [ "$PROFILE" = debian-kubeadm ]; then
    BUNDLE=$(kube_bundle_dir) || { fail "the Kubernetes bundle is found (KUBERNETES_BUNDLE)"; finish; }
    KUBE_ARGS=(--kubernetes "$BUNDLE")
fi

# --- apt sources --------------------------------------------------------------------------------
# A host that also lists bookworm-backports and trixie (pinned down by its own preferences, which
# the image would not have): only bookworm, bookworm-updates and bookworm-security reach the build.
mkdir -p "$WORK/apt/sources.list.d"
cat > "$WORK/apt/sources.list" <<'SOURCES'
deb http://archive.example/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://archive.example/debian bookworm-backports main
deb http://archive.example/debian trixie main
SOURCES
cat > "$WORK/apt/sources.list.d/debian.sources" <<'SOURCES'
Types: deb
URIs: http://archive.example/debian
Suites: bookworm-updates trixie-updates
Components: main

Types: deb
URIs: http://archive.example/debian-security
Suites: trixie-security bookworm-security
Components: main
SOURCES
APT_ETC=$WORK/apt "$REPO/image-builder/build.sh" --profile "$PROFILE" --out "$WORK/apt-out" --print-apt-sources \
    > "$WORK/apt.sources" 2>"$WORK/apt.err" || true
suites=$(sed -n 's/^Suites: //p' "$WORK/apt.sources" | tr ' ' '\n' | sort | tr '\n' ' ')
check "apt sources: only bookworm's suites of a host that also lists backports and trixie ($suites)" \
    [ "$suites" = "bookworm bookworm-security bookworm-updates " ]

# --- build --------------------------------------------------------------------------------------
if [ -n "${IMAGE_OUT:-}" ]; then
    # Checks only, on an earlier build's output directory (built with --keep-raw).
    OUT=$IMAGE_OUT
    build_s='?'
else
    [ -n "${IMAGE_BUILD_OUT:-}" ] && OUT=$IMAGE_BUILD_OUT
    args=(--profile "$PROFILE" --out "$OUT" --apt-cache "$APT_CACHE" --keep-raw "${KUBE_ARGS[@]}")
    # run-all.sh has built the workspace already; reuse its provisioner.
    [ -x "$PROVISIONER" ] && args+=(--provisioner "$PROVISIONER")
    t0=$(date +%s.%N)
    if ! "$REPO/image-builder/build.sh" "${args[@]}" 2>&1 | tee "$WORK/build.log" >&2; then
        fail "image-builder/build.sh --profile $PROFILE"
        finish
    fi
    build_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    pass "image-builder/build.sh --profile $PROFILE (${build_s}s)"
fi
ROOTFS=$OUT/rootfs
RAW=$OUT/image.raw

# --- GPT layout ---------------------------------------------------------------------------------
sfdisk -J "$RAW" > "$WORK/layout.json"
# field NAME INDEX: a field of partition INDEX (0-based) from sfdisk -J
part() { python3 -c 'import json,sys; p=json.load(open(sys.argv[1]))["partitiontable"]; print(p["partitions"][int(sys.argv[3])].get(sys.argv[2],"") if sys.argv[3]!="-" else p.get(sys.argv[2],""))' "$WORK/layout.json" "$1" "$2"; }
check "GPT partition table" [ "$(part label -)" = gpt ]
check "two partitions" [ "$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["partitiontable"]["partitions"]))' "$WORK/layout.json")" = 2 ]
check "partition 1 is the ESP" [ "$(part type 0)" = C12A7328-F81F-11D2-BA4B-00A0C93EC93B ]
check "partition 2 is Linux root (x86-64), named root" \
    [ "$(part type 1)/$(part name 1)" = 4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709/root ]
check "ESP is LegacyBIOSBootable (syslinux)" bash -c "[ '$(part attrs 0)' = LegacyBIOSBootable ]"
SECTOR=512
esp_start=$(part start 0); esp_size=$(part size 0)
root_start=$(part start 1); root_size=$(part size 1)
root_uuid=$(part uuid 1)
dd if="$RAW" of="$WORK/esp.fat" bs=$SECTOR skip="$esp_start" count="$esp_size" status=none
dd if="$RAW" of="$WORK/root.ext4" bs=1M skip=$((root_start * SECTOR / 1048576)) count=$((root_size * SECTOR / 1048576)) status=none
check "the protective MBR carries syslinux's gptmbr.bin" cmp -s -n 440 "$RAW" /usr/lib/syslinux/mbr/gptmbr.bin

# --- ESP ----------------------------------------------------------------------------------------
check "ESP: EFI/BOOT/BOOTX64.EFI is systemd-boot" bash -c \
    "mtype -i '$WORK/esp.fat' ::/EFI/BOOT/BOOTX64.EFI | cmp -s - '$ROOTFS/usr/lib/systemd/boot/efi/systemd-bootx64.efi'"
mtype -i "$WORK/esp.fat" ::/loader/entries/provisioner.conf > "$WORK/entry.conf" 2>/dev/null || true
check "ESP: loader entry boots /vmlinuz with root=PARTUUID=$root_uuid" bash -c \
    "grep -qx 'linux /vmlinuz' '$WORK/entry.conf' && grep -qx 'initrd /initrd.img' '$WORK/entry.conf' \
     && grep -qi 'options root=PARTUUID=$root_uuid ' '$WORK/entry.conf'"
check "ESP: loader.conf selects the entry" bash -c \
    "mtype -i '$WORK/esp.fat' ::/loader/loader.conf | grep -q 'default provisioner.conf'"
check "ESP: /vmlinuz is the artifact kernel" bash -c "mtype -i '$WORK/esp.fat' ::/vmlinuz | cmp -s - '$OUT/vmlinuz'"
KVER=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["kernelRelease"])' "$OUT/manifest.json")
check "ESP: /initrd.img is the image's Debian initramfs for $KVER" bash -c \
    "mtype -i '$WORK/esp.fat' ::/initrd.img | cmp -s - '$ROOTFS/boot/initrd.img-$KVER'"
# ldlinux.sys is hidden and system: mattrib finds it where mdir -b does not.
check "ESP: syslinux (ldlinux.sys, ldlinux.c32, syslinux.cfg with the same root)" bash -c \
    "mattrib -i '$WORK/esp.fat' ::/syslinux/ldlinux.sys >/dev/null && mattrib -i '$WORK/esp.fat' ::/syslinux/ldlinux.c32 >/dev/null \
     && mtype -i '$WORK/esp.fat' ::/syslinux/syslinux.cfg | grep -qi 'root=PARTUUID=$root_uuid'"

# --- root filesystem (debugfs, no mount) --------------------------------------------------------
rootfs_cat() { debugfs -R "cat $1" "$WORK/root.ext4" 2>/dev/null; }
rootfs_stat() { debugfs -R "stat $1" "$WORK/root.ext4" 2>/dev/null | grep -q '^Inode:'; }
check "root fs: ext4 labelled root" bash -c "dumpe2fs -h '$WORK/root.ext4' 2>/dev/null | grep -q 'volume name:.*root$'"
check "root fs: /usr/bin/provisioner is the built binary" bash -c \
    "debugfs -R 'cat /usr/bin/provisioner' '$WORK/root.ext4' 2>/dev/null | cmp -s - '$ROOTFS/usr/bin/provisioner'"
check "root fs: provisioner runs (--version)" "$ROOTFS/usr/bin/provisioner" --version
for f in /usr/lib/systemd/system/netboot.service /usr/lib/systemd/system/netboot-dhcp.socket \
    /usr/lib/systemd/system/imageserver.socket /usr/share/dbus-1/system.d/dev.provisioner.Netboot1.conf \
    /usr/share/dbus-1/system-services/dev.provisioner.Netboot1.service /usr/lib/sysusers.d/provisioner.conf \
    /etc/provisioner/provisioner.yaml /usr/share/provisioner/ipxe/snponly.efi \
    /usr/share/provisioner/assets/vmlinuz /usr/share/provisioner/assets/stage2.img; do
    check "root fs: $f" rootfs_stat "$f"
done
if [ -f "$REPO/units/netboot.path" ]; then
    check "root fs: netboot.path enabled (multi-user.target.wants)" bash -c \
        "debugfs -R 'stat /etc/systemd/system/multi-user.target.wants/netboot.path' '$WORK/root.ext4' 2>/dev/null | grep -q 'Fast link dest: \"/lib/systemd/system/netboot.path\"'"
else
    check "root fs: netboot sockets enabled" rootfs_stat /etc/systemd/system/sockets.target.wants/netboot-dhcp.socket
fi
check "root fs: imageserver.socket enabled" rootfs_stat /etc/systemd/system/sockets.target.wants/imageserver.socket
check "root fs: systemd-networkd enabled" rootfs_stat /etc/systemd/system/multi-user.target.wants/systemd-networkd.service
check "root fs: /etc/machine-id empty (first boot)" bash -c \
    "debugfs -R 'stat /etc/machine-id' '$WORK/root.ext4' 2>/dev/null | grep -q 'Size: 0\$'"
check "root fs: fstab mounts / by the root PARTUUID" bash -c \
    "debugfs -R 'cat /etc/fstab' '$WORK/root.ext4' 2>/dev/null | grep -qi '^PARTUUID=$root_uuid[[:space:]]*/[[:space:]]'"
if [ "$PROFILE" = debian-test ]; then
    check "root fs: root has no password (serial console login for debugging)" bash -c \
        "debugfs -R 'cat /etc/shadow' '$WORK/root.ext4' 2>/dev/null | grep -q '^root::'"
else
    check "root fs: root cannot log in without a password" bash -c \
        "! debugfs -R 'cat /etc/shadow' '$WORK/root.ext4' 2>/dev/null | grep -q '^root::'"
fi
check "root fs: apt lists only bookworm's suites" bash -c \
    "! grep -rhsE '^(Suites:|deb )' '$ROOTFS/etc/apt/sources.list' '$ROOTFS/etc/apt/sources.list.d' | grep -vE 'bookworm(-updates|-security)?( |\$)' >&2"
check "root fs: stage2.img is the artifact initrd" bash -c \
    "debugfs -R 'cat /usr/share/provisioner/assets/stage2.img' '$WORK/root.ext4' 2>/dev/null | cmp -s - '$OUT/stage2.img'"
mkdir -p "$WORK/cfg/machines"
# The image's paths, looked up in the root fs: check-config also checks the loaders, kernel and
# initrd it names.
sed -e "s|/etc/provisioner/machines|$WORK/cfg/machines|" -e "s|/usr/share/provisioner/|$ROOTFS/usr/share/provisioner/|" \
    "$ROOTFS/etc/provisioner/provisioner.yaml" > "$WORK/cfg/provisioner.yaml"
check "the image's provisioner.yaml passes check-config (with the image's loaders, kernel and initrd)" "$ROOTFS/usr/bin/provisioner" check-config --config "$WORK/cfg/provisioner.yaml"

# --- manifest -----------------------------------------------------------------------------------
check "manifest.json: sizes and sha256 of image, kernel and initrd match the files" python3 - "$OUT" "$PROFILE" <<'EOF'
import hashlib, json, os, subprocess, sys
out = sys.argv[1]
m = json.load(open(os.path.join(out, "manifest.json")))
ok = m["profile"] == sys.argv[2] and m["kernelRelease"] and m["buildTime"]
for key in ("image", "kernel", "initrd"):
    e = m[key]
    h = hashlib.sha256()
    with open(os.path.join(out, e["file"]), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != e["sha256"] or os.path.getsize(os.path.join(out, e["file"])) != e["size"]:
        print(f"manifest {key}: mismatch", file=sys.stderr); ok = False
# The decompressed image, streamed (it is larger than what should be held in memory).
zstd = subprocess.Popen(["zstd", "-dc", os.path.join(out, m["image"]["file"])], stdout=subprocess.PIPE)
h, n = hashlib.sha256(), 0
for chunk in iter(lambda: zstd.stdout.read(1 << 20), b""):
    h.update(chunk); n += len(chunk)
if zstd.wait() != 0 or h.hexdigest() != m["image"]["rawSha256"] or n != m["image"]["rawSize"]:
    print("manifest image raw: mismatch", file=sys.stderr); ok = False
sys.exit(0 if ok else 1)
EOF

# --- stage2 initrd ------------------------------------------------------------------------------
zstd -dc "$OUT/stage2.img" | cpio -t --quiet > "$WORK/initrd.list"
check "initrd: /init" grep -qx 'init' "$WORK/initrd.list"
for m in virtio_net virtio_blk virtio_pci; do
    check "initrd: $m.ko of $KVER" grep -Eq "^lib/modules/$KVER/.*/$m\.ko(\.[a-z]+)?\$" "$WORK/initrd.list"
done

# --- Kubernetes ---------------------------------------------------------------------------------
if [ "$PROFILE" = debian-kubeadm ]; then
    KBIN=$(kube_unpack) || { fail "the Kubernetes bundle unpacks"; finish; }
    for b in kubeadm kubelet kubectl; do
        check "root fs: /usr/bin/$b is the bundle's" bash -c \
            "debugfs -R 'cat /usr/bin/$b' '$WORK/root.ext4' 2>/dev/null | cmp -s - '$KBIN/$b'"
    done
    for f in /usr/lib/systemd/system/kubelet.service /usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf \
        /usr/lib/systemd/system/provisioner-pod-network.path /usr/share/provisioner/kubernetes/images.txt \
        /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/portmap /usr/sbin/runc /usr/sbin/conntrack; do
        check "root fs: $f" rootfs_stat "$f"
    done
    check "root fs: the kubeadm drop-in runs the kubelet with KUBELET_KUBEADM_ARGS" bash -c \
        "debugfs -R 'cat /usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf' '$WORK/root.ext4' 2>/dev/null \
         | grep -q '^ExecStart=/usr/bin/kubelet .*KUBELET_KUBEADM_ARGS'"
    rootfs_cat /etc/containerd/config.toml > "$WORK/containerd.toml"
    check "root fs: containerd uses the systemd cgroup driver and the bundle's pause image" bash -c \
        "grep -q 'SystemdCgroup = true' '$WORK/containerd.toml' && grep -q 'sandbox_image = \"registry.k8s.io/pause:' '$WORK/containerd.toml'"
    for unit in multi-user.target.wants/kubelet.service multi-user.target.wants/containerd.service \
        multi-user.target.wants/provisioner-kubernetes-images.service multi-user.target.wants/provisioner-pod-network.path; do
        check "root fs: $unit enabled" rootfs_stat "/etc/systemd/system/$unit"
    done
    # The images kubeadm asks for, as containerd itself lists them: the image's own containerd
    # on a copy of the store (private mount namespace; nothing of the host's is touched).
    "$KBIN/kubeadm" config images list --kubernetes-version "$("$KBIN/kubeadm" version -o short)" 2>/dev/null \
        | grep -v '/coredns' | sort > "$WORK/images.wanted"
    cp -a "$ROOTFS/var/lib/containerd" "$WORK/containerd-store"
    unshare --mount --propagation private bash -c '
        root=$1 store=$2 out=$3
        mount -t proc proc "$root/proc"; mount -t tmpfs tmpfs "$root/run"; mount -t tmpfs tmpfs "$root/tmp"
        mount --bind "$store" "$root/var/lib/containerd"
        chroot "$root" /usr/bin/containerd > "$out.log" 2>&1 & pid=$!
        for _ in $(seq 1 300); do [ -S "$root/run/containerd/containerd.sock" ] && break; sleep 0.1; done
        chroot "$root" ctr -n k8s.io images ls -q > "$out"
        kill "$pid"; wait "$pid" || true
    ' list "$ROOTFS" "$WORK/containerd-store" "$WORK/images.present" || true
    check "containerd's store holds every image kubeadm asks for ($(wc -l < "$WORK/images.wanted"), CoreDNS aside)" \
        bash -c "[ -s '$WORK/images.wanted' ] && [ -z \"\$(comm -23 '$WORK/images.wanted' <(grep -v '^sha256:' '$WORK/images.present' | sort))\" ]"
    rm -rf "$WORK/containerd-store"
fi

image_zst=$(stat -c %s "$OUT/image.raw.zst"); image_raw=$(stat -c %s "$RAW"); initrd=$(stat -c %s "$OUT/stage2.img")
echo "IMAGE profile=$PROFILE build_seconds=$build_s raw_bytes=$image_raw zstd_bytes=$image_zst initrd_bytes=$initrd kernel=$KVER rootfs=$(du -sh "$ROOTFS" | cut -f1)"

# --- boot in QEMU (OVMF, TCG) -------------------------------------------------------------------
case $BOOT in 1|all) BOOT="ovmf bios" ;; 0) BOOT= ;; esac
if [ -n "$BOOT" ]; then
    netns_up
    add_tap tap0
    # provisioner netboot holds the VM's DHCP reservation: the image's systemd-networkd gets its
    # address and network-online.target (which cloud-init waits for) is reached at once.
    mkdir -p "$WORK/boot/assets" "$WORK/boot/machines"
    # The VM boots its own disk: netboot only answers DHCP, but it refuses to start without the
    # boot files its configuration names.
    stub_boot_files "$WORK/boot/assets" vmlinuz initrd.img
    : > "$WORK/boot/machines.list"
    boot_add_machine "$WORK/boot" image-vm "$MAC" "$SUBNET_PREFIX.40"
    if ! backend_start provisioner "$WORK/boot"; then
        fail "provisioner netboot starts"
        finish
    fi
fi
# netboot's DHCPACK to the VM (its startup lines name the reservation too).
lease_logged() { grep -a 'DHCP reply sent' "$WORK/provisioner.log" 2>/dev/null | grep -a 'Ack' | grep -q "$SUBNET_PREFIX\.40"; }
if [[ " $BOOT " == *" ovmf "* ]]; then
    # The disk is booted first; -snapshot keeps the image itself untouched. One vCPU: with two,
    # TCG on a loaded 2-core host stalls the guest kernel (soft lockups).
    qemu_start image ovmf "$MAC" tap0 -snapshot \
        -drive "file=$RAW,if=none,id=d0,format=raw" -device virtio-blk-pci,drive=d0,bootindex=0
    # Until the image's units are up and its network has a lease from netboot; the login prompt
    # comes minutes later under TCG (cloud-init's Python), so only OVMF_LOGIN=1 waits for it
    # (tests/cluster-flow.sh boots the image through cloud-init anyway).
    if [ "${OVMF_LOGIN:-0}" = 1 ]; then target='login:'; else target='Started netboot\.path'; fi
    if qemu_wait image "$target" "$TIMEOUT"; then
        pass "the image boots under OVMF to '$target' (${QEMU_ELAPSED}s)"
        # sockets.target comes after paths.target; the lease after both (systemd-networkd).
        qemu_wait image 'Listening on imageserver\.s' 300 || true
        wait_for 300 lease_logged || true
    else
        fail "no '$target' on the console within ${TIMEOUT}s"
        qemu_tail image 30 >&2
    fi
    booted_s=${QEMU_ELAPSED:-?}
    qemu_stop image
    check "systemd of the image started (Welcome to Debian)" grep -aq 'Welcome to .*Debian' "$(qemu_serial image)"
    # systemd shortens unit descriptions on an 80-column console: match the start of the line.
    check "imageserver.socket listening at boot" grep -aq 'Listening on imageserver\.s' "$(qemu_serial image)"
    if [ -f "$REPO/units/netboot.path" ]; then
        check "netboot.path started at boot" grep -aq 'Started netboot\.path' "$(qemu_serial image)"
    fi
    check "no failed units on the console" bash -c "! grep -a 'FAILED' '$(qemu_serial image)' >&2"
    check "netboot logged the image's lease" lease_logged
    echo "IMAGE_BOOT firmware=ovmf welcome_seconds=$(qemu_time_of image 'Welcome to' || echo '?') booted_seconds=$booted_s"
fi
if [[ " $BOOT " == *" bios "* ]]; then
    # BIOS: SeaBIOS runs gptmbr.bin, which chains syslinux on the LegacyBIOSBootable ESP; the
    # image's systemd greeting shows kernel, initramfs and root were found.
    qemu_start image-bios seabios "$MAC" tap0 -snapshot \
        -drive "file=$RAW,if=none,id=d0,format=raw" -device virtio-blk-pci,drive=d0,bootindex=0
    if qemu_wait image-bios 'Welcome to .*Debian' "$TIMEOUT"; then
        pass "the image boots under SeaBIOS (syslinux) into its systemd (${QEMU_ELAPSED}s)"
    else
        fail "no systemd greeting under SeaBIOS within ${TIMEOUT}s"
        qemu_tail image-bios 30 >&2
    fi
    qemu_stop image-bios
    check "SeaBIOS: the kernel got the root PARTUUID from syslinux.cfg" \
        grep -aqi "Command line: .*root=PARTUUID=$root_uuid" "$(qemu_serial image-bios)"
    echo "IMAGE_BOOT firmware=seabios welcome_seconds=${QEMU_ELAPSED:-?}"
fi
finish

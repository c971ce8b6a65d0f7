#!/bin/bash
# Builds a provisioner disk image without a VM and without mounting anything:
#   1. rootfs     mmdebstrap (apt sources from this host, or --sources FILE) + our binaries,
#                 units, D-Bus files, config placeholder, iPXE binaries, netboot assets → OUT/rootfs/
#   2. disk       GPT raw image: ESP (FAT, mtools: systemd-boot + syslinux for BIOS, the image's
#                 kernel and Debian initramfs) + ext4 root (mke2fs -d) → OUT/image.raw.zst
#   3. artifacts  kernel, stage2 initrd built from the rootfs's own modules, manifest.json
#
# Usage (as root):
#   image-builder/build.sh --profile debian-test --out DIR            all stages
#   image-builder/build.sh --profile debian-test --rootfs-only --out DIR
#   image-builder/build.sh --profile debian-test --stage disk --out DIR   (reuses DIR/rootfs)
# Options:
#   --stage rootfs|disk|artifacts|all   one stage (the later ones reuse what is in OUT)
#   --sources FILE      apt sources (one-line or deb822) instead of the host's
#   --apt-cache DIR     keep downloaded .debs there between builds
#   --keep-raw          keep OUT/image.raw beside the .zst
#   --stage2 FILE / --provisioner FILE   use these binaries instead of building them
#   --kubernetes DIR    Kubernetes bundle (kubeadm profiles; format in image-builder/README.md)
#   --print-apt-sources print the apt sources the build would use, and exit
# Environment: CARGO_TARGET_DIR (default <repo>/target), STATIC_TARGET_DIR (static stage2).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PROFILE=
OUT=
STAGE=all
SOURCES=
APT_CACHE=
KEEP_RAW=0
STAGE2_BIN=
PROVISIONER_BIN=
KUBERNETES_BUNDLE=${KUBERNETES_BUNDLE:-}
PRINT_SOURCES=0
APT_ETC=${APT_ETC:-/etc/apt}

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --profile) PROFILE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --stage) STAGE=$2; shift 2 ;;
        --rootfs-only) STAGE=rootfs; shift ;;
        --sources) SOURCES=$2; shift 2 ;;
        --apt-cache) APT_CACHE=$2; shift 2 ;;
        --keep-raw) KEEP_RAW=1; shift ;;
        --stage2) STAGE2_BIN=$2; shift 2 ;;
        --provisioner) PROVISIONER_BIN=$2; shift 2 ;;
        --kubernetes) KUBERNETES_BUNDLE=$2; shift 2 ;;
        --print-apt-sources) PRINT_SOURCES=1; shift ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[ -n "$PROFILE" ] && [ -n "$OUT" ] || usage
case $STAGE in rootfs|disk|artifacts|all) ;; *) echo "--stage: rootfs, disk, artifacts or all" >&2; exit 2 ;; esac
[ "$PRINT_SOURCES" = 1 ] || [ "$(id -u)" = 0 ] || { echo "run as root (mmdebstrap root mode, device nodes, file ownership)" >&2; exit 1; }
PROFILE_FILE=$HERE/profiles/$PROFILE.conf
[ -f "$PROFILE_FILE" ] || { echo "no profile $PROFILE ($(ls "$HERE/profiles" | sed 's/\.conf$//' | tr '\n' ' '))" >&2; exit 2; }

# Profile defaults; the profile file overrides them.
SOURCES_MUST_MATCH=
VARIANT=minbase
ROOT_SERIAL_LOGIN=0
KERNEL_CMDLINE="console=tty0 console=ttyS0,115200 rw"
HOSTNAME_DEFAULT=provisioner
EXTRA_SOURCES_REQUIRED=0
profile_preflight() { :; }   # checks before anything is built
profile_customize() { :; }   # runs with the rootfs path after our files are in
# shellcheck source=profiles/debian-test.conf
. "$PROFILE_FILE"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$OUT/rootfs
BUILD_T0=$(date +%s.%N)
STEP_T0=$BUILD_T0
STEP_NAME=
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
step() {
    [ -n "$STEP_NAME" ] && printf '[image %s] done: %s (%ss)\n' "$PROFILE" "$STEP_NAME" "$(elapsed "$STEP_T0")" >&2
    STEP_NAME=$*
    STEP_T0=$(date +%s.%N)
    [ -n "$STEP_NAME" ] && printf '[image %s] %s …\n' "$PROFILE" "$STEP_NAME" >&2
    return 0
}
die() { echo "[image $PROFILE] error: $*" >&2; exit 1; }
MIB=$((1024 * 1024))

# GPT type of the root partition ("Linux root (x86-64)", Discoverable Partitions): stage2 finds
# the root partition by it (or the label) to add the cloud-init drop-in.
ROOT_TYPE=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709
ESP_TYPE=C12A7328-F81F-11D2-BA4B-00A0C93EC93B

kernel_release() {
    local k
    k=$(cd "$ROOT/boot" && ls vmlinuz-* 2>/dev/null | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
    [ -n "$k" ] || die "no kernel in $ROOT/boot"
    echo "$k"
}

# --- binaries from the workspace ---------------------------------------------------------------
build_binaries() {
    local target_dir=${CARGO_TARGET_DIR:-$REPO/target}
    local static_dir=${STATIC_TARGET_DIR:-$REPO/target/static}
    if [ -z "$PROVISIONER_BIN" ]; then
        step "cargo build provisioner (debug, shared target dir)"
        (cd "$REPO" && cargo build -q -p agent --bin provisioner --target-dir "$target_dir")
        PROVISIONER_BIN=$target_dir/debug/provisioner
    fi
    if [ -z "$STAGE2_BIN" ]; then
        # The same static build as tests/stage2-boot.sh: no libc needed in the initrd.
        step "cargo build stage2 (static)"
        (cd "$REPO" && RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_DEV_DEBUG=0 \
            CARGO_PROFILE_DEV_STRIP=true cargo build -q -p stage2 --bin stage2 \
            --target x86_64-unknown-linux-gnu --target-dir "$static_dir" \
            --config 'profile.dev.package.zstd-sys.opt-level=3' \
            --config 'profile.dev.package.liblzma-sys.opt-level=3')
        STAGE2_BIN=$static_dir/x86_64-unknown-linux-gnu/debug/stage2
    fi
    [ -x "$PROVISIONER_BIN" ] || die "no provisioner binary at $PROVISIONER_BIN"
    [ -x "$STAGE2_BIN" ] || die "no stage2 binary at $STAGE2_BIN"
}

# --- stage 1: rootfs ----------------------------------------------------------------------------
# The apt sources: --sources FILE as given, else the host's own (sources.list and
# sources.list.d/*.list, *.sources under $APT_ETC, default /etc/apt) restricted to the profile's
# suite and its -updates/-security (apt-sources.py): other suites the host lists, pinned down by
# its own preferences, must not reach the image, whose apt would not have those pins. No mirror
# is named here. The file is handed to mmdebstrap as a MIRROR argument (an existing file is
# pasted into the chroot's sources).
apt_source_files() {
    if [ -n "$SOURCES" ]; then
        [ -f "$SOURCES" ] || die "--sources $SOURCES: no such file"
        echo "$SOURCES"
        return
    fi
    local f host=()
    for f in "$APT_ETC"/sources.list "$APT_ETC"/sources.list.d/*.list "$APT_ETC"/sources.list.d/*.sources; do
        [ -f "$f" ] && grep -qv '^\s*\(#\|$\)' "$f" && host+=("$f")
    done
    [ ${#host[@]} -gt 0 ] || return 0
    mkdir -p "$OUT"
    python3 "$HERE/apt-sources.py" "$SUITE" "${host[@]}" > "$OUT/apt-sources.sources" \
        || die "the host's apt sources (${host[*]}) carry no $SUITE suite; give --sources FILE"
    echo "$OUT/apt-sources.sources"
}

stage_rootfs() {
    # The sources first: a profile that cannot be built here stops before any compiling.
    [ "$EXTRA_SOURCES_REQUIRED" = 1 ] && [ -z "$SOURCES" ] && die "profile $PROFILE needs --sources FILE (see the profile)"
    local sources=()
    mapfile -t sources < <(apt_source_files)
    [ ${#sources[@]} -gt 0 ] || die "no apt sources found (give --sources FILE)"
    if [ -n "$SOURCES_MUST_MATCH" ] && ! grep -qw -- "$SOURCES_MUST_MATCH" "${sources[@]}"; then
        die "the apt sources (${sources[*]}) do not carry $SOURCES_MUST_MATCH; give --sources FILE"
    fi
    profile_preflight
    build_binaries

    step "mmdebstrap $SUITE ($VARIANT + ${#PACKAGES[@]} packages) from ${sources[*]}"
    # A build killed in the middle leaves mmdebstrap's /proc, /sys and /dev/pts mounted in the
    # old root: let go of them first, and never let rm cross into a mounted file system.
    if [ -d "$ROOT" ]; then
        findmnt -rn -o TARGET | awk -v r="$ROOT/" 'index($0, r) == 1' | sort -r \
            | while read -r m; do umount -l "$m"; done
    fi
    rm -rf --one-file-system "$ROOT"
    local cache_hooks=()
    if [ -n "$APT_CACHE" ]; then
        mkdir -p "$APT_CACHE"
        APT_CACHE=$(cd "$APT_CACHE" && pwd)
        cache_hooks=(--skip=essential/unlink
            --setup-hook='mkdir -p "$1"/var/cache/apt/archives/'
            --setup-hook="sync-in $APT_CACHE /var/cache/apt/archives/"
            --customize-hook="sync-out /var/cache/apt/archives $APT_CACHE")
    fi
    # dpkg without fsync (mmdebstrap's own eatmydata hook, removed again at the end): the tree
    # is written to an image afterwards, a crash means starting over anyway.
    local eatmydata=()
    [ -d /usr/share/mmdebstrap/hooks/eatmydata ] && eatmydata=(--hook-dir=/usr/share/mmdebstrap/hooks/eatmydata)
    local pkgs
    pkgs=$(IFS=,; echo "${PACKAGES[*]}")
    # No recommends: the package list is the image's whole content. The host's network is used
    # only by apt, to reach the package archive.
    mmdebstrap --mode=root --variant="$VARIANT" --include="$pkgs" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        "${eatmydata[@]}" "${cache_hooks[@]}" \
        "$SUITE" "$ROOT" "${sources[@]}" 2>"$OUT/mmdebstrap.log" \
        || { tail -n 30 "$OUT/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $OUT/mmdebstrap.log)"; }

    step "installing provisioner, stage2, units, D-Bus files, config"
    install -D -m 0755 "$PROVISIONER_BIN" "$ROOT/usr/bin/provisioner"
    # Debug builds carry debug info (hundreds of MB); the image needs none of it.
    strip --strip-debug "$ROOT/usr/bin/provisioner"
    install -D -m 0755 "$STAGE2_BIN" "$ROOT/usr/lib/provisioner/stage2"
    local unit
    for unit in "$REPO"/units/*.service "$REPO"/units/*.socket "$REPO"/units/*.path; do
        [ -f "$unit" ] || continue
        case $(basename "$unit") in dev.provisioner.*) continue ;; esac
        install -m 0644 "$unit" "$ROOT/usr/lib/systemd/system/"
    done
    install -D -m 0644 "$REPO/units/dev.provisioner.Netboot1.conf" "$ROOT/usr/share/dbus-1/system.d/dev.provisioner.Netboot1.conf"
    install -D -m 0644 "$REPO/units/dev.provisioner.Netboot1.service" "$ROOT/usr/share/dbus-1/system-services/dev.provisioner.Netboot1.service"
    install -D -m 0644 "$REPO/units/provisioner.sysusers.conf" "$ROOT/usr/lib/sysusers.d/provisioner.conf"
    [ -f "$REPO/units/provisioner.tmpfiles.conf" ] \
        && install -D -m 0644 "$REPO/units/provisioner.tmpfiles.conf" "$ROOT/usr/lib/tmpfiles.d/provisioner.conf"
    install -D -m 0644 "$REPO/README.md" "$ROOT/usr/share/doc/provisioner/README.md"
    install -D -m 0644 "$HERE/provisioner.yaml" "$ROOT/etc/provisioner/provisioner.yaml"
    # The iPXE binaries netboot serves, as regular files (Debian's ipxe.efi is a symlink into
    # /boot, which netboot's confinement refuses).
    mkdir -p "$ROOT/usr/share/provisioner/ipxe" "$ROOT/usr/share/provisioner/assets"
    local f target
    for f in "$ROOT"/usr/lib/ipxe/*.efi "$ROOT"/usr/lib/ipxe/*.kpxe "$ROOT"/usr/lib/ipxe/*.pxe; do
        # An absolute symlink points into the image, not into this host.
        target=$f
        if [ -L "$f" ]; then
            target=$(readlink "$f")
            case $target in /*) target=$ROOT$target ;; *) target=$(dirname "$f")/$target ;; esac
        fi
        [ -f "$target" ] || continue
        cp "$target" "$ROOT/usr/share/provisioner/ipxe/$(basename "$f")"
    done
    [ -f "$ROOT/usr/share/provisioner/ipxe/snponly.efi" ] || die "no snponly.efi from the ipxe package"

    step "enabling units"
    local enable=()
    if [ -f "$ROOT/usr/lib/systemd/system/netboot.path" ]; then
        # netboot starts once the cluster exists (admin.conf); its sockets come with it.
        enable+=(netboot.path)
    else
        enable+=(netboot-dhcp.socket netboot-tftp.socket netboot-http.socket)
    fi
    enable+=(imageserver.socket)
    # Networking without cloud-init's help (nothing renders a config when no datasource gives
    # one): systemd-networkd, DHCP on every wired interface.
    enable+=(systemd-networkd.service)
    printf '# image-builder: DHCP on every wired interface (cloud-init may add more specific files)\n[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' \
        > "$ROOT/etc/systemd/network/90-provisioner-dhcp.network"
    # The image's own systemctl (offline, no running manager needed).
    chroot "$ROOT" systemctl enable "${enable[@]}" 2>&1 | sed 's/^/    /' >&2
    ENABLED_UNITS="${enable[*]}"

    step "first-boot settings (machine-id, hostname, console login, fstab)"
    # Empty machine-id: systemd generates one on first boot and runs first-boot presets.
    : > "$ROOT/etc/machine-id"
    rm -f "$ROOT/var/lib/dbus/machine-id"
    echo "$HOSTNAME_DEFAULT" > "$ROOT/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$HOSTNAME_DEFAULT" > "$ROOT/etc/hosts"
    if [ "$ROOT_SERIAL_LOGIN" = 1 ]; then
        chroot "$ROOT" passwd -d root >/dev/null
    fi
    # The host's resolver must not stay in the image.
    rm -f "$ROOT/etc/resolv.conf"
    # cloud-init: NoCloud (stage2's drop-in, or a seed) and nothing that probes the network for
    # cloud metadata services.
    mkdir -p "$ROOT/etc/cloud/cloud.cfg.d"
    printf '# image-builder: NoCloud only (stage2 writes the drop-in that points at netboot)\ndatasource_list: [NoCloud, None]\n' \
        > "$ROOT/etc/cloud/cloud.cfg.d/90-provisioner-datasource.cfg"
    # The image has no locales: cloud-init's locale module would generate nothing and fail.
    printf 'locale: false\n' > "$ROOT/etc/cloud/cloud.cfg.d/91-provisioner-no-locale.cfg"
    # Without an SSH server cloud-init's host key generation only fails noisily.
    [ -x "$ROOT/usr/sbin/sshd" ] || printf 'ssh_genkeytypes: []\n' > "$ROOT/etc/cloud/cloud.cfg.d/91-provisioner-no-sshd.cfg"
    profile_customize "$ROOT"

    step "netboot assets: kernel and stage2 initrd from this rootfs's modules"
    local kver
    kver=$(kernel_release)
    cp "$ROOT/boot/vmlinuz-$kver" "$ROOT/usr/share/provisioner/assets/vmlinuz"
    "$STAGE2_BIN" build-initrd --kernel-release "$kver" --modules-dir "$ROOT/lib/modules/$kver" \
        --init "$STAGE2_BIN" --out "$ROOT/usr/share/provisioner/assets/stage2.img" | sed 's/^/    /' >&2
    echo "$kver" > "$ROOT/usr/share/provisioner/assets/kernel-release"
    step ""
    printf '[image %s] rootfs: %s, kernel %s, units enabled: %s\n' "$PROFILE" \
        "$(du -sh "$ROOT" | cut -f1)" "$kver" "$ENABLED_UNITS" >&2
}

# --- stage 2: disk ------------------------------------------------------------------------------
stage_disk() {
    [ -d "$ROOT/usr/lib/systemd" ] || die "no rootfs in $ROOT (run the rootfs stage first)"
    local kver b esp_uuid root_uuid esp_mib root_mib root_start_mib total_mib
    kver=$(kernel_release)
    [ -f "$ROOT/boot/initrd.img-$kver" ] || die "no initramfs for $kver in the rootfs"
    b=$OUT/disk.build
    rm -rf "$b"; mkdir -p "$b"
    esp_uuid=$(cat /proc/sys/kernel/random/uuid)
    root_uuid=$(cat /proc/sys/kernel/random/uuid)

    step "ESP: systemd-boot, syslinux (BIOS), kernel $kver and its initramfs"
    local kbytes ibytes
    kbytes=$(stat -c %s "$ROOT/boot/vmlinuz-$kver")
    ibytes=$(stat -c %s "$ROOT/boot/initrd.img-$kver")
    # Room for the files plus one more kernel/initrd pair (an update), at least 64 MiB.
    esp_mib=$(( (2 * (kbytes + ibytes)) / MIB + 16 ))
    [ "$esp_mib" -lt 64 ] && esp_mib=64
    mkfs.vfat -F 32 -n ESP -C "$b/esp.fat" $((esp_mib * 1024)) >/dev/null
    mmd -i "$b/esp.fat" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/loader ::/loader/entries ::/syslinux
    local sdboot=$ROOT/usr/lib/systemd/boot/efi/systemd-bootx64.efi
    [ -f "$sdboot" ] || die "no systemd-boot EFI binary in the rootfs (systemd-boot-efi)"
    mcopy -i "$b/esp.fat" "$sdboot" ::/EFI/BOOT/BOOTX64.EFI
    mcopy -i "$b/esp.fat" "$sdboot" ::/EFI/systemd/systemd-bootx64.efi
    mcopy -i "$b/esp.fat" "$ROOT/boot/vmlinuz-$kver" ::/vmlinuz
    mcopy -i "$b/esp.fat" "$ROOT/boot/initrd.img-$kver" ::/initrd.img
    local options="root=PARTUUID=$root_uuid $KERNEL_CMDLINE"
    printf 'timeout 0\ndefault provisioner.conf\n' > "$b/loader.conf"
    printf 'title %s (%s)\nlinux /vmlinuz\ninitrd /initrd.img\noptions %s\n' \
        "$PROFILE_DESCRIPTION" "$kver" "$options" > "$b/entry.conf"
    mcopy -i "$b/esp.fat" "$b/loader.conf" ::/loader/loader.conf
    mcopy -i "$b/esp.fat" "$b/entry.conf" ::/loader/entries/provisioner.conf
    # BIOS: syslinux installs itself into the FAT through mtools (no mount); gptmbr.bin in the
    # protective MBR boots the partition marked LegacyBIOSBootable.
    local bios=0
    if command -v syslinux >/dev/null && [ -f /usr/lib/syslinux/mbr/gptmbr.bin ]; then
        printf 'DEFAULT provisioner\nPROMPT 0\nTIMEOUT 0\nSERIAL 0 115200\nLABEL provisioner\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND %s\n' \
            "$options" > "$b/syslinux.cfg"
        mcopy -i "$b/esp.fat" "$b/syslinux.cfg" ::/syslinux/syslinux.cfg
        syslinux --install --directory /syslinux "$b/esp.fat"
        bios=1
    else
        echo "    syslinux not installed: UEFI only" >&2
    fi

    step "root filesystem: ext4 from the rootfs (mke2fs -d)"
    local used_mib
    used_mib=$(du -s -m "$ROOT" | cut -f1)
    # 30% + 256 MiB free for first boot (journal, cloud-init); growpart/resize2fs enlarge it to
    # the disk on the machine.
    root_mib=$(( used_mib * 13 / 10 + 256 ))
    printf 'PARTUUID=%s\t/\text4\tdefaults,errors=remount-ro\t0\t1\nPARTUUID=%s\t/boot/efi\tvfat\tumask=0077,nofail\t0\t2\n' \
        "$root_uuid" "$esp_uuid" > "$ROOT/etc/fstab"
    mkdir -p "$ROOT/boot/efi"
    mke2fs -q -t ext4 -L root -U random -E root_owner=0:0 -d "$ROOT" "$b/root.ext4" "${root_mib}M" >/dev/null

    step "GPT image: ESP ${esp_mib} MiB + root ${root_mib} MiB"
    root_start_mib=$((1 + esp_mib))
    total_mib=$((root_start_mib + root_mib + 1))
    local raw=$OUT/image.raw
    rm -f "$raw"
    truncate -s $((total_mib * MIB)) "$raw"
    local attrs=
    [ "$bios" = 1 ] && attrs=', attrs="LegacyBIOSBootable"'
    sfdisk -q "$raw" <<EOF
label: gpt
start=1MiB, size=${esp_mib}MiB, type=$ESP_TYPE, uuid=$esp_uuid, name="ESP"$attrs
start=${root_start_mib}MiB, size=${root_mib}MiB, type=$ROOT_TYPE, uuid=$root_uuid, name="root"
EOF
    dd if="$b/esp.fat" of="$raw" bs=1M seek=1 conv=notrunc status=none
    dd if="$b/root.ext4" of="$raw" bs=1M seek="$root_start_mib" conv=notrunc status=none
    [ "$bios" = 1 ] && dd if=/usr/lib/syslinux/mbr/gptmbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none

    step "zstd"
    zstd -q -T0 -3 -f "$raw" -o "$OUT/image.raw.zst"
    sha256sum "$raw" | cut -d' ' -f1 > "$OUT/image.raw.sha256"
    stat -c %s "$raw" > "$OUT/image.raw.size"
    [ "$KEEP_RAW" = 1 ] || rm -f "$raw"
    rm -rf "$b"
    step ""
    printf '[image %s] disk: %s bytes raw, %s bytes zstd, root PARTUUID %s, BIOS boot %s\n' "$PROFILE" \
        "$(cat "$OUT/image.raw.size")" "$(stat -c %s "$OUT/image.raw.zst")" "$root_uuid" \
        "$([ "$bios" = 1 ] && echo yes || echo no)" >&2
}

# --- stage 3: artifacts -------------------------------------------------------------------------
stage_artifacts() {
    local assets=$ROOT/usr/share/provisioner/assets
    [ -f "$assets/stage2.img" ] || die "no stage2 initrd in the rootfs (run the rootfs stage first)"
    [ -f "$OUT/image.raw.zst" ] || die "no $OUT/image.raw.zst (run the disk stage first)"
    step "artifacts: vmlinuz, stage2.img, manifest.json"
    cp "$assets/vmlinuz" "$OUT/vmlinuz"
    cp "$assets/stage2.img" "$OUT/stage2.img"
    local kver
    kver=$(cat "$assets/kernel-release")
    python3 - "$OUT" "$PROFILE" "$kver" "$SUITE" <<'EOF'
import datetime, hashlib, json, os, sys
out, profile, kver, suite = sys.argv[1:5]
def describe(name):
    path = os.path.join(out, name)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"file": name, "size": os.path.getsize(path), "sha256": h.hexdigest()}
def read(name):
    with open(os.path.join(out, name)) as f:
        return f.read().strip()
image = describe("image.raw.zst")
# netboot's `image: {sha256, size}` and stage2 check the decompressed image.
image["compression"] = "zstd"
image["rawSize"] = int(read("image.raw.size"))
image["rawSha256"] = read("image.raw.sha256")
manifest = {
    "profile": profile,
    "suite": suite,
    "kernelRelease": kver,
    "buildTime": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "image": image,
    "kernel": describe("vmlinuz"),
    "initrd": describe("stage2.img"),
}
with open(os.path.join(out, "manifest.json.tmp"), "w") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")
os.replace(os.path.join(out, "manifest.json.tmp"), os.path.join(out, "manifest.json"))
EOF
    step ""
}

if [ "$PRINT_SOURCES" = 1 ]; then
    for f in $(apt_source_files); do cat "$f"; done
    exit 0
fi
case $STAGE in
    rootfs) stage_rootfs ;;
    disk) stage_disk ;;
    artifacts) stage_artifacts ;;
    all) stage_rootfs; stage_disk; stage_artifacts ;;
esac
printf '[image %s] stage %s finished in %ss → %s\n' "$PROFILE" "$STAGE" "$(elapsed "$BUILD_T0")" "$OUT" >&2

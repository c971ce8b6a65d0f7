#!/bin/bash
# The seed's whole flow with two VMs (QEMU TCG, SeaBIOS) on one virtual L2: a bridge in a
# network namespace this test creates, taps for the VMs, no user networking. The namespace's
# own side of the bridge ($SRV_IP) plays the operator's host.
#
#  operator's host  `provisioner imageserver --bootstrap SEED --dir ARTIFACTS` on $SRV_IP:8000:
#                   the debian-test artifacts (image-builder/build.sh) and the laptop's NoCloud
#                   seed at /nocloud/laptop/{meta-data,user-data}; dnsmasq stands in for the
#                   operator LAN's DHCP server and answers the laptop's MAC only (the image
#                   configures its network by DHCP until its cloud-config has run).
#  laptop VM        boots a copy of the debian-test image from its disk (syslinux), gets
#                   `ds=nocloud-net;s=http://$SRV_IP:8000/nocloud/laptop/` through SMBIOS (the
#                   image is not touched); its cloud-config gives it a static address, writes
#                   /etc/provisioner/provisioner.yaml and node2's Machine manifest, points its
#                   imageserver at the host's (pull-through cache) and, in place of `kubeadm
#                   init`, creates /etc/kubernetes/admin.conf: netboot.path starts netboot.
#                   tests/seed-flow-watch.py (started by the cloud-config) reports systemctl,
#                   busctl and journalctl on the serial console.
#  node2 VM         empty disk, PXE (iPXE ROM) from the laptop's netboot, stage2 writes the image
#                   served by the laptop's imageserver, reboots (QEMU ends: -no-reboot); started
#                   again from the same disk (network first: netboot's local-boot script), the
#                   image's cloud-init fetches user-data from the laptop's netboot with its
#                   one-time token and prints a marker.
#
# Checks: the laptop's seed came from the bootstrap imageserver; netboot was inactive before the
# trigger and active after it; node2's phases in order on D-Bus, in the journal (MESSAGE_IDs)
# and in `systemctl status` (STATUS=); the image went host → laptop cache → node2; node2's
# marker; the user-data was served once. Prints the time of each step and the total.
#
# The image is built once per set of inputs (build.sh, the profile, units, the provisioner and
# stage2 binaries) and cached in $SEED_CACHE; SEED_IMAGE_DIR=DIR uses an earlier build output
# as it is.
#
#   LAPTOP_TIMEOUT=900 NODE_TIMEOUT=900 (seconds per wait)  KEEP_WORK=1  SEED_IMAGE_DIR=DIR
#   SKIP_BUILD=1 (no cargo build: PROVISIONER and STATIC_TARGET_DIR's stage2 are used as they are)
#   Run by hand: flock /tmp/pv-qemu.lock tests/seed-flow.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$REPO/tests/lib-qemu.sh"

LAPTOP_TIMEOUT=${LAPTOP_TIMEOUT:-900}
NODE_TIMEOUT=${NODE_TIMEOUT:-900}
SEED_CACHE=${SEED_CACHE:-/var/tmp/provisioner-test-cache}
STATIC_TARGET_DIR=${STATIC_TARGET_DIR:-$REPO/target/static}
STAGE2=$STATIC_TARGET_DIR/x86_64-unknown-linux-gnu/debug/stage2
LAPTOP_MAC=52:54:00:5e:00:50
LAPTOP_IP=$SUBNET_PREFIX.2
NODE_MAC=52:54:00:5e:00:52
NODE_IP=$SUBNET_PREFIX.20
BOOTSTRAP_PORT=8000
NODE_MARKER='provisioner: cloud-init user-data applied on node2'
TEST_T0=$(date +%s.%N)
since() { awk -v a="$TEST_T0" -v b="${1:-$(date +%s.%N)}" 'BEGIN{printf "%.1f", b-a}'; }
STEP_T0=$TEST_T0
# wait_for NAME T0 REGEX SECONDS: qemu_wait on VM NAME (started at T0) for up to SECONDS more
wait_for() {
    local elapsed
    elapsed=$(awk -v a="$2" -v b="$(date +%s.%N)" 'BEGIN{print int(b-a)}')
    QEMU_T0=$2 qemu_wait "$1" "$3" $((elapsed + $4))
}
step_done() { # step_done WHAT: logs WHAT with its duration and the test's elapsed time
    log "step: $1 ($(awk -v a="$STEP_T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s, at $(since)s)"
    STEP_T0=$(date +%s.%N)
}

for tool in qemu-system-x86_64 dnsmasq zstd python3 mmdebstrap; do
    command -v "$tool" >/dev/null || { fail "$tool is installed (tests/install-deps.sh)"; finish; }
done

# --- binaries and the image ---------------------------------------------------------------------
[ "${SKIP_BUILD:-0}" = 1 ] || (cd "$REPO" && cargo build -q -p agent --bin provisioner)
[ "${SKIP_BUILD:-0}" = 1 ] || build_static_stage2 "$STATIC_TARGET_DIR"
step_done "cargo build provisioner and static stage2"

if [ -n "${SEED_IMAGE_DIR:-}" ]; then
    IMG=$SEED_IMAGE_DIR
    log "image: using $IMG as it is (SEED_IMAGE_DIR)"
else
    # Everything the image is made of from this repository; the Debian packages are whatever
    # the archive has (a cached image keeps the versions of its build day).
    key=$( (cd "$REPO" && cat image-builder/build.sh image-builder/profiles/debian-test.conf \
        image-builder/provisioner.yaml units/*.* 2>/dev/null; sha256sum "$PROVISIONER" "$STAGE2" | cut -d' ' -f1) \
        | sha256sum | cut -c1-16)
    IMG=$SEED_CACHE/seed-image-$key
    if [ -f "$IMG/manifest.json" ]; then
        log "image: cached build $IMG"
    else
        mkdir -p "$SEED_CACHE"
        # Older builds of this test take 300 MB and more each: keep only the one being made.
        rm -rf "$SEED_CACHE"/seed-image-* "$SEED_CACHE"/seed-image-tmp.*
        tmp=$(mktemp -d "$SEED_CACHE/seed-image-tmp.XXXXXX")
        log "image: building debian-test into $IMG (build log $WORK/image-build.log)"
        if ! "$REPO/image-builder/build.sh" --profile debian-test --out "$tmp" \
            --apt-cache "$SEED_CACHE/apt" --provisioner "$PROVISIONER" --stage2 "$STAGE2" \
            > "$WORK/image-build.log" 2>&1; then
            tail -n 30 "$WORK/image-build.log" >&2
            rm -rf "$tmp"
            fail "image-builder/build.sh --profile debian-test"
            finish
        fi
        grep -E '^\[image [^]]*\] (done|stage|disk)' "$WORK/image-build.log" >&2 || true
        rm -rf "$tmp/rootfs" "$tmp/disk.build"
        mv "$tmp" "$IMG"
    fi
fi
for f in manifest.json image.raw.zst vmlinuz stage2.img; do
    [ -f "$IMG/$f" ] || { fail "the image build has $f"; finish; }
done
manifest() { python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(eval("m"+sys.argv[2]))' "$IMG/manifest.json" "$1"; }
RAW_SHA256=$(manifest '["image"]["rawSha256"]')
RAW_SIZE=$(manifest '["image"]["rawSize"]')
ZST_SIZE=$(manifest '["image"]["size"]')
log "image: $RAW_SIZE bytes raw, $ZST_SIZE zstd, kernel $(manifest '["kernelRelease"]')"
step_done "debian-test image"

# The host's artifacts directory (hard links into the cache: nothing is copied) and the laptop's
# disk, a full copy of the image.
ART=$WORK/artifacts
mkdir -p "$ART"
for f in manifest.json image.raw.zst vmlinuz stage2.img; do ln "$IMG/$f" "$ART/$f" 2>/dev/null || cp "$IMG/$f" "$ART/$f"; done
zstd -q -d "$IMG/image.raw.zst" -o "$WORK/laptop.raw"
truncate -s 2G "$WORK/node2.raw"
step_done "laptop disk (copy of the image) and node2's empty disk"

# --- what the operator's host serves -----------------------------------------------------------
# The pull-through cache (--upstream) and the bootstrap seed (--bootstrap) are used when the
# binaries have them; otherwise the laptop downloads the artifacts itself and the seed is served
# as plain files from the artifacts directory.
HOST_HAS_BOOTSTRAP=0
"$PROVISIONER" imageserver --help | grep -q -- '--bootstrap' && HOST_HAS_BOOTSTRAP=1
LAPTOP_HAS_UPSTREAM=0
"$PROVISIONER" imageserver --help | grep -q -- '--upstream' && LAPTOP_HAS_UPSTREAM=1
if [ "$HOST_HAS_BOOTSTRAP" = 1 ]; then SEED=$WORK/seed; else SEED=$ART/nocloud; fi
mkdir -p "$SEED/laptop"
BOOTSTRAP_URL=http://$SRV_IP:$BOOTSTRAP_PORT

cat > "$SEED/laptop/meta-data" <<EOF
instance-id: seed-flow-$$
local-hostname: seed
EOF

# The laptop's user-data. `provisioner cloud-config laptop` renders the product's (kubeadm init,
# network-config); this one has the same parts for the debian-test image, which has no kubeadm:
# the trigger file is created instead, and the static address is a networkd file (NoCloud over
# HTTP does not fetch network-config in cloud-init 22.4).
indent() { sed 's/^/      /' "$@"; }
{
    cat <<EOF
#cloud-config
hostname: seed
preserve_hostname: false
write_files:
  - path: /etc/systemd/network/05-provisioning.network
    content: |
      [Match]
      MACAddress=$LAPTOP_MAC
      [Network]
      Address=$LAPTOP_IP/24
      DHCP=no
      LinkLocalAddressing=ipv6
  - path: /etc/provisioner/provisioner.yaml
    content: |
      interface: ens3
      serverAddress: $LAPTOP_IP
      subnet: $SUBNET_PREFIX.0/24
      bootFiles:
        # the image's /usr/lib/ipxe, copied as regular files (ipxe.efi is a symlink there)
        ipxeDir: /usr/share/provisioner/ipxe
        assetsDir: /usr/share/provisioner/assets
      boot:
        kernel: vmlinuz
        initrd: stage2.img
        cmdline: "console=ttyS0 stage2.reboot_delay=2"
      image:
        url: "http://$LAPTOP_IP:8080/image.raw.zst"
        sha256: $RAW_SHA256
        size: $RAW_SIZE
      inventory:
        directory: /etc/provisioner/machines
  - path: /etc/provisioner/machines/node2.yaml
    content: |
      apiVersion: provisioner.dev/v1alpha1
      kind: Machine
      metadata: {name: node2}
      spec: {macAddress: "$NODE_MAC", ipAddress: $NODE_IP, hostname: node2}
  - path: /etc/systemd/system/imageserver.service.d/seed.conf
    content: |
      [Service]
      ExecStart=
EOF
    if [ "$LAPTOP_HAS_UPSTREAM" = 1 ]; then
        echo "      ExecStart=/usr/bin/provisioner imageserver --dir /var/cache/provisioner-images --upstream $BOOTSTRAP_URL/"
    else
        echo "      ExecStart=/usr/bin/provisioner imageserver --dir /var/cache/provisioner-images"
    fi
    cat <<EOF
      CacheDirectory=provisioner-images
  - path: /usr/local/sbin/pv-watch
    permissions: "0755"
    content: |
EOF
    indent "$REPO/tests/seed-flow-watch.py"
    cat <<EOF
  - path: /etc/systemd/system/pv-watch.service
    content: |
      [Unit]
      Description=seed-flow test: report netboot on the serial console
      [Service]
      ExecStart=/usr/local/sbin/pv-watch /dev/ttyS0 node2
runcmd:
  - [sh, -c, 'echo "PV-SEED user-data running t=\$(date +%s.%N)" > /dev/ttyS0']
  - [networkctl, reload]
  - [systemctl, daemon-reload]
EOF
    if [ "$LAPTOP_HAS_UPSTREAM" = 0 ]; then
        cat <<EOF
  - [sh, -c, 'mkdir -p /var/cache/provisioner-images && cd /var/cache/provisioner-images && for f in image.raw.zst manifest.json; do python3 -c "import sys,urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" $BOOTSTRAP_URL/\$f \$f; done']
EOF
    fi
    cat <<EOF
  - [systemctl, start, --no-block, pv-watch.service]
  - [sh, -c, 'for i in \$(seq 1 120); do [ -e /run/pv-watch.started ] && break; sleep 0.5; done']
  # in place of kubeadm init (no kubeadm in debian-test): the file netboot.path waits for
  - [sh, -c, 'mkdir -p /etc/kubernetes && install -m 0600 /dev/null /etc/kubernetes/admin.conf']
  - [sh, -c, 'ip -br addr > /dev/ttyS0']
  - [sh, -c, 'echo "PV-SEED trigger created t=\$(date +%s.%N)" > /dev/ttyS0']
EOF
} > "$SEED/laptop/user-data"
if command -v cloud-init >/dev/null; then
    check "the laptop's user-data is valid (cloud-init schema)" \
        cloud-init schema --config-file "$SEED/laptop/user-data"
fi

netns_up
add_tap tap0
add_tap tap1
# The operator LAN's DHCP server: the laptop's MAC only (node2's requests are the laptop's).
cat > "$WORK/lan-dnsmasq.conf" <<EOF
port=0
interface=br0
bind-interfaces
no-ping
dhcp-range=$SUBNET_PREFIX.0,static,255.255.255.0,1h
dhcp-host=$LAPTOP_MAC,$LAPTOP_IP,seed
dhcp-leasefile=$WORK/lan-dnsmasq.leases
EOF
start_in_srv lan-dhcp dnsmasq -C "$WORK/lan-dnsmasq.conf" --keep-in-foreground \
    --user=root --group=root --log-dhcp --log-facility=- >/dev/null
bootstrap_args=(--dir "$ART" --listen "$SRV_IP:$BOOTSTRAP_PORT")
[ "$HOST_HAS_BOOTSTRAP" = 1 ] && bootstrap_args+=(--bootstrap "$SEED")
start_in_srv bootstrap env RUST_LOG=info,netboot=debug "$PROVISIONER" imageserver "${bootstrap_args[@]}" >/dev/null
for _ in $(seq 1 100); do grep -q "imageserver ready" "$WORK/bootstrap.log" 2>/dev/null && break; sleep 0.1; done
check "bootstrap imageserver is ready on $BOOTSTRAP_URL" grep -q "imageserver ready" "$WORK/bootstrap.log"
check "bootstrap imageserver serves the laptop's user-data" bash -c \
    "ip netns exec '$NS_SRV' curl -fsS '$BOOTSTRAP_URL/nocloud/laptop/user-data' | cmp -s - '$SEED/laptop/user-data'"
log "host: bootstrap imageserver ($([ "$HOST_HAS_BOOTSTRAP" = 1 ] && echo "--bootstrap" || echo "stand-in: seed as plain files")), laptop imageserver $([ "$LAPTOP_HAS_UPSTREAM" = 1 ] && echo "--upstream (pull-through)" || echo "stand-in: artifacts downloaded by the cloud-config")"
step_done "namespace, LAN DHCP and bootstrap imageserver"

# --- the laptop ---------------------------------------------------------------------------------
# No floppy drive: the guests' block probes (cloud-init looks for a seed filesystem) otherwise
# spend seconds on fd0 read errors.
NO_FLOPPY=(-global isa-fdc.fdtypeA=none -global isa-fdc.fdtypeB=none)
QEMU_MEM=1536 qemu_start laptop seabios "$LAPTOP_MAC" tap0 -smp 2 "${NO_FLOPPY[@]}" \
    -drive "file=$WORK/laptop.raw,if=none,id=d0,format=raw" -device virtio-blk-pci,drive=d0,bootindex=0 \
    -smbios "type=1,serial=ds=nocloud-net;s=$BOOTSTRAP_URL/nocloud/laptop/"
LAPTOP_T0=$QEMU_T0
if qemu_wait laptop 'PV-SEED trigger created' "$LAPTOP_TIMEOUT"; then
    pass "laptop: cloud-init ran the seed's user-data, trigger created (${QEMU_ELAPSED}s after power-on)"
else
    fail "laptop: the seed's user-data did not run within ${LAPTOP_TIMEOUT}s"
    qemu_tail laptop 60 >&2
    finish
fi
step_done "laptop: power-on to trigger file"
check "laptop: the seed came from the bootstrap imageserver" grep -q 'nocloud/laptop/user-data' "$WORK/bootstrap.log"
if wait_for laptop "$LAPTOP_T0" 'PV-UNIT .* netboot=active' 300; then
    pass "laptop: netboot.path started netboot (${QEMU_ELAPSED}s after power-on)"
else
    fail "laptop: netboot did not become active"
    qemu_tail laptop 60 >&2
    finish
fi
LAPTOP_SERIAL=$(qemu_serial laptop)
check "laptop: netboot was not running before the trigger" bash -c \
    "grep -a -m1 'PV-UNIT' '$LAPTOP_SERIAL' | grep -q 'netboot=inactive'"
wait_for laptop "$LAPTOP_T0" 'PV-STATUS' 120 || true
check "laptop: systemctl status shows netboot's STATUS= (1 machine)" bash -c \
    "grep -a 'PV-STATUS' '$LAPTOP_SERIAL' | grep -q 'serving 1 machine'"
step_done "laptop: netboot started by the path unit"

# --- node2: PXE, imaging, reboot from its disk --------------------------------------------------
disk_args=(-drive "file=$WORK/node2.raw,if=none,id=d0,format=raw" -device virtio-blk-pci,drive=d0,bootindex=2)
QEMU_MEM=1024 qemu_start node2-imaging seabios "$NODE_MAC" tap1 -smp 2 "${NO_FLOPPY[@]}" "${disk_args[@]}"
NODE_T0=$QEMU_T0
if qemu_wait node2-imaging 'imaged; rebooting' "$NODE_TIMEOUT"; then
    pass "node2: stage2 imaged the disk (${QEMU_ELAPSED}s after power-on)"
else
    fail "node2: stage2 did not finish imaging within ${NODE_TIMEOUT}s"
    qemu_tail node2-imaging 40 >&2
    qemu_tail laptop 40 >&2
    finish
fi
for _ in $(seq 1 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.2; done
qemu_stop node2-imaging
NODE_SERIAL=$(qemu_serial node2-imaging)
check "node2: stage2 verified the sha256" grep -aq 'sha256 verified' "$NODE_SERIAL"
check "node2: stage2 wrote the cloud-init drop-in" grep -aq 'cloud-init drop-in written' "$NODE_SERIAL"
step_done "node2: PXE boot and imaging"

QEMU_MEM=1024 qemu_start node2 seabios "$NODE_MAC" tap1 -smp 2 "${NO_FLOPPY[@]}" "${disk_args[@]}"
NODE2_T0=$QEMU_T0
if qemu_wait node2 "$NODE_MARKER" "$NODE_TIMEOUT"; then
    pass "node2: booted its disk, cloud-init got its user-data from the laptop: marker (${QEMU_ELAPSED}s after power-on)"
else
    fail "node2: no cloud-init marker within ${NODE_TIMEOUT}s"
    qemu_tail node2 60 >&2
fi
check "node2: booted through netboot's local-boot script and the disk's syslinux" \
    grep -aq 'SYSLINUX' "$(qemu_serial node2)"
step_done "node2: boot from disk to the cloud-init marker"

# The laptop reports the user-data fetch (D-Bus message, journal) and dumps `systemctl status`.
wait_for laptop "$LAPTOP_T0" 'PV-SYSTEMCTL' 120 || true
sleep 3
qemu_stop node2
qemu_stop laptop

# --- what the laptop said ------------------------------------------------------------------------
seq_of() { # the phases of node2's PV-DBUS or PV-JOURNAL lines, repeats folded
    grep -a "PV-$1 " "$LAPTOP_SERIAL" \
        | sed -nE "s/.*PV-$1 t=[0-9.]+ machine=node2 phase=([A-Za-z]+) .*/\\1/p" | uniq | tr '\n' ' '
}
DBUS_SEQ=$(seq_of DBUS)
JOURNAL_SEQ=$(seq_of JOURNAL)
log "D-Bus phases of node2: $DBUS_SEQ"
log "journal phases of node2: $JOURNAL_SEQ"
check "D-Bus: node2 went PXEBooting → Imaging → Imaged, in order" bash -c \
    "echo '$DBUS_SEQ' | grep -qE '(^| )PXEBooting Imaging Imaged( |$)'"
check "journal: node2's records PXEBooting → Imaging → Imaged, in order" bash -c \
    "echo '$JOURNAL_SEQ' | grep -qE '(^| )PXEBooting Imaging Imaged( |$)'"
for id in PXEBooting:826dbd54d3004b2b81ecf7e0233863f1 Imaging:cf1806acef0c4efe9281dc71f7075c63 Imaged:0caafb0aa69743209fe440c2d1d2bbef; do
    check "journal: ${id%%:*} record has MESSAGE_ID ${id#*:}" \
        grep -aqE "PV-JOURNAL .*machine=node2 phase=${id%%:*} .*message_id=${id#*:}" "$LAPTOP_SERIAL"
done
check "D-Bus: node2's progress was reported while imaging" \
    grep -aqE 'PV-DBUS .*machine=node2 phase=Imaging progress=([1-9][0-9]?) ' "$LAPTOP_SERIAL"
check "D-Bus/journal: the user-data was served to node2" \
    grep -aqE 'PV-(DBUS|JOURNAL) .*machine=node2.*user-data served' "$LAPTOP_SERIAL"
check "systemctl status: netboot active with a STATUS= summary" bash -c \
    "grep -a 'PV-SYSTEMCTL' '$LAPTOP_SERIAL' | grep -q 'Active: active (running)' && grep -a 'PV-SYSTEMCTL' '$LAPTOP_SERIAL' | grep -q 'Status: \"serving 1 machine'"
grep -a 'PV-SYSTEMCTL' "$LAPTOP_SERIAL" | sed 's/^\[[^]]*\] PV-SYSTEMCTL /    /' >&2 || true
check "the laptop fetched the image from the bootstrap imageserver" \
    grep -aqE "peer=$LAPTOP_IP:[0-9]+ method=GET path=/image\\.raw\\.zst status=200" "$WORK/bootstrap.log"
if [ "$LAPTOP_HAS_UPSTREAM" = 1 ]; then
    check "the laptop's imageserver filled its cache from the bootstrap imageserver (pull-through)" \
        grep -aqE 'PV-IMAGESERVER .*fetched from upstream.*path=image\.raw\.zst' "$LAPTOP_SERIAL"
fi
grep -a 'PV-IMAGESERVER' "$LAPTOP_SERIAL" | sed 's/^\[[^]]*\] /    /' >&2 || true

# --- times -------------------------------------------------------------------------------------
# Serial lines carry "[secs since that VM's QEMU start]"; the watcher's lines also carry the
# guest's epoch time. Both are printed as seconds since this test started.
at() { # at VM_T0 NAME REGEX: test-relative time of the first serial line matching REGEX
    local t
    t=$(qemu_time_of "$2" "$3") || { echo '?'; return; }
    awk -v a="$TEST_T0" -v b="$1" -v c="$t" 'BEGIN{printf "%.1f", b+c-a}'
}
log "times (seconds since the test started; the image step included):"
log "  $(since "$LAPTOP_T0")  laptop powered on"
log "  $(at "$LAPTOP_T0" laptop 'PV-SEED user-data running')  laptop: cloud-init runs the seed's user-data"
log "  $(at "$LAPTOP_T0" laptop 'PV-SEED trigger created')  laptop: trigger file created"
log "  $(at "$LAPTOP_T0" laptop 'PV-UNIT .*netboot=active')  laptop: netboot active"
log "  $(since "$NODE_T0")  node2 powered on (PXE)"
for phase in PXEBooting Imaging Imaged; do
    log "  $(at "$LAPTOP_T0" laptop "PV-DBUS .*machine=node2 phase=$phase ")  laptop D-Bus: node2 $phase"
done
log "  $(at "$NODE_T0" node2-imaging 'imaged; rebooting')  node2: stage2 done, rebooting"
log "  $(since "$NODE2_T0")  node2 powered on again (disk)"
log "  $(at "$LAPTOP_T0" laptop 'PV-(DBUS|JOURNAL) .*machine=node2.*user-data served')  laptop: node2's user-data served"
log "  $(at "$NODE2_T0" node2 "$NODE_MARKER")  node2: cloud-init marker"
echo "SEED-FLOW total_seconds=$(since) image_raw_bytes=$RAW_SIZE image_zstd_bytes=$ZST_SIZE"
[ "$(since | cut -d. -f1)" -gt 600 ] && log "note: the test took more than 10 minutes"
finish

#!/bin/bash
# Runs every test, in three tiers, each timed:
#   unit     cargo fmt --check, cargo clippy -D warnings, cargo test: no root, no network
#            namespace, minutes; runs first
#   network  as root: real clients and servers in network namespaces, the Kubernetes live tests,
#            the fuzz targets for 20 s each
#   qemu     as root: QEMU boots (TCG) and the image build
# Usage: tests/run-all.sh [--unit | --quick | --network | --qemu]
#   (none)     all three tiers (what CI runs: .ci/run)
#   --unit     the unit tier only (needs no root)
#   --quick    unit and network: everything but the QEMU boots and the image build
#   --network, --qemu   that tier only
# After the privileged tiers, tests/leftovers.sh fails the run if any process a test started is
# still running (PIDs and work directories recorded by tests/lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# The scripts of each privileged tier, in order; one per line.
NETWORK_TESTS=(
    tests/check-config.sh
    tests/dhcp.sh
    tests/tftp.sh
    tests/http.sh
    tests/activation.sh
    tests/journald.sh
    tests/dbus.sh
    tests/units.sh
    tests/imaging-api.sh
    tests/imageserver-cache.sh
    tests/cloud-init.sh
    tests/stage2-writer.sh
    # The denial-of-service attacks, then tests/attack-hijack.sh (run only through attack.sh).
    tests/attack.sh
    # The controller against real etcd + kube-apiserver from the Kubernetes bundle (no QEMU).
    tests/kube-live.sh
)
QEMU_TESTS=(
    tests/boot-chain.sh
    tests/http-boot.sh
    tests/proxydhcp.sh
    tests/stage2-boot.sh
    tests/e2e-provision.sh
    tests/stage2-faults.sh
    # image-build.sh, nspawn.sh, cluster-flow.sh and libvirt-lab.sh run after these (they share
    # the image it builds).
)

tiers=(unit network qemu)
case "${1:-}" in
    "") ;;
    --unit) tiers=(unit) ;;
    --quick) tiers=(unit network) ;;
    --network) tiers=(network) ;;
    --qemu) tiers=(qemu) ;;
    *) echo "usage: $0 [--unit | --quick | --network | --qemu]" >&2; exit 2 ;;
esac
privileged=0
for tier in "${tiers[@]}"; do [ "$tier" = unit ] || privileged=1; done
if [ "$privileged" = 1 ] && [ "$(id -u)" != 0 ]; then
    echo "run as root: the network and qemu tiers create network namespaces" >&2
    exit 1
fi

started=$(date +%s)
temp_dirs=()
trap 'rm -rf --one-file-system "${temp_dirs[@]}"' EXIT
step() { printf '\n=== %s (%ss)\n' "$*" $(( $(date +%s) - started )); }
failed=()
declare -A tier_seconds=()

# run TEST [VAR=value…]: the test script with extra environment
run() {
    local t=$1
    shift
    step "$t"
    if ! env "$@" bash "$t"; then failed+=("$t"); fi
}

tier_unit() {
    step "cargo fmt --check"
    cargo fmt --all -- --check || failed+=("cargo fmt")
    step "cargo clippy"
    cargo clippy --workspace --all-targets --locked -- -D warnings || failed+=("cargo clippy")
    step "cargo test (unit tests, loopback servers, mock scenarios)"
    cargo test --workspace --locked || failed+=("cargo test")
}

tier_network() {
    local t
    step "cargo build"
    cargo build --workspace --all-targets --locked
    for t in "${NETWORK_TESTS[@]}"; do run "$t"; done
    # The fuzz targets, 20 s each (nightly toolchain and cargo-fuzz, installed when missing).
    run tests/fuzz.sh FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
}

tier_qemu() {
    local t image_dir
    step "cargo build"
    cargo build --workspace --all-targets --locked
    for t in "${QEMU_TESTS[@]}"; do run "$t"; done
    # The debian-kubeadm image is built once (mmdebstrap takes minutes) and shared: nspawn.sh
    # boots its rootfs, cluster-flow.sh (two VMs, kubeadm init and join) provisions with it.
    image_dir=$(mktemp -d /var/tmp/provisioner-ci-image.XXXXXX)
    temp_dirs+=("$image_dir")
    # UEFI boot here; cluster-flow.sh boots the same image with SeaBIOS.
    run tests/image-build.sh IMAGE_BUILD_OUT="$image_dir/out" BOOT=ovmf
    if [ -x "$image_dir/out/rootfs/usr/lib/systemd/systemd" ]; then
        run tests/nspawn.sh ROOTFS_DIR="$image_dir/out/rootfs"
    else
        run tests/nspawn.sh
    fi
    # The libvirt lab boots the same image as the laptop of a libvirtd the test starts.
    if [ -f "$image_dir/out/manifest.json" ]; then
        run tests/cluster-flow.sh CLUSTER_IMAGE_DIR="$image_dir/out"
        run tests/libvirt-lab.sh CLUSTER_IMAGE_DIR="$image_dir/out"
    else
        run tests/cluster-flow.sh
        run tests/libvirt-lab.sh
    fi
}

if [ "$privileged" = 1 ]; then
    step "installing dependencies"
    tests/install-deps.sh
    # Where tests/lib.sh records what each test starts, for the check at the end.
    PV_TRACK_DIR=$(mktemp -d /var/tmp/pv-track.XXXXXX)
    export PV_TRACK_DIR
    temp_dirs+=("$PV_TRACK_DIR")
fi

for tier in "${tiers[@]}"; do
    tier_started=$(date +%s)
    step "tier $tier"
    "tier_$tier"
    tier_seconds[$tier]=$(( $(date +%s) - tier_started ))
done

if [ "$privileged" = 1 ]; then
    step "processes left running by the tests"
    if tests/leftovers.sh "$PV_TRACK_DIR"; then
        echo "none"
    else
        failed+=("processes left running")
    fi
fi

step "done"
for tier in "${tiers[@]}"; do echo "tier $tier: ${tier_seconds[$tier]} s"; done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all tests passed in $(( $(date +%s) - started )) s"

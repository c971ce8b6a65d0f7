#!/bin/bash
# Runs every test: installs what is missing, then unit and integration tests (cargo), lints, and
# the privileged tests (network namespaces, real clients, QEMU boots). Must run as root.
# Usage: sudo tests/run-all.sh [--quick]   (--quick skips the QEMU boots and the image build)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the tests create network namespaces" >&2; exit 1; }

quick=0
case "${1:-}" in
    --quick) quick=1 ;;
    "") ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac
started=$(date +%s)
step() { printf '\n=== %s (%ss)\n' "$*" $(( $(date +%s) - started )); }

step "installing dependencies"
tests/install-deps.sh

step "cargo build"
cargo build --workspace --all-targets --locked

step "cargo test (unprivileged: unit tests, loopback servers, mock scenarios)"
cargo test --workspace --locked

step "cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

failed=()
run() { # run TEST [VAR=value…]: the test script with extra environment
    local t=$1
    shift
    step "$t"
    if ! env "$@" bash "$t"; then failed+=("$t"); fi
}
for t in tests/check-config.sh tests/dhcp.sh tests/tftp.sh tests/http.sh tests/activation.sh tests/journald.sh tests/dbus.sh tests/units.sh tests/imaging-api.sh tests/attack-hijack.sh tests/imageserver-cache.sh tests/cloud-init.sh tests/stage2-writer.sh; do
    [ -f "$t" ] && run "$t"
done
# The controller against real etcd + kube-apiserver from the Kubernetes bundle (no QEMU).
run tests/kube-live.sh
if [ "$quick" = 0 ]; then
    run tests/boot-chain.sh
    run tests/stage2-boot.sh
    run tests/e2e-provision.sh
    run tests/stage2-faults.sh
    # The debian-kubeadm image is built once (mmdebstrap takes minutes) and shared: nspawn.sh
    # boots its rootfs, cluster-flow.sh (two VMs, kubeadm init and join) provisions with it.
    image_dir=$(mktemp -d /var/tmp/provisioner-ci-image.XXXXXX)
    trap 'rm -rf --one-file-system "$image_dir"' EXIT
    # UEFI boot here; cluster-flow.sh boots the same image with SeaBIOS.
    run tests/image-build.sh IMAGE_BUILD_OUT="$image_dir/out" BOOT=ovmf
    if [ -x "$image_dir/out/rootfs/usr/lib/systemd/systemd" ]; then
        run tests/nspawn.sh ROOTFS_DIR="$image_dir/out/rootfs"
    else
        run tests/nspawn.sh
    fi
    if [ -f "$image_dir/out/manifest.json" ]; then
        run tests/cluster-flow.sh CLUSTER_IMAGE_DIR="$image_dir/out"
    else
        run tests/cluster-flow.sh
    fi
fi

step "done"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all tests passed in $(( $(date +%s) - started ))s"

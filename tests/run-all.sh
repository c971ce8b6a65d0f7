#!/bin/bash
# Runs every test: installs what is missing, then unit and integration tests (cargo), lints, and
# the privileged tests (network namespaces, real clients, QEMU boots). Must run as root.
# Usage: sudo tests/run-all.sh [--quick]   (--quick skips the QEMU boots)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the tests create network namespaces" >&2; exit 1; }

quick=0
[ "${1:-}" = --quick ] && quick=1
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
run() {
    step "$1"
    if ! bash "$1"; then failed+=("$1"); fi
}
for t in tests/dhcp.sh tests/tftp.sh tests/http.sh tests/activation.sh tests/journald.sh tests/dbus.sh tests/units.sh tests/imaging-api.sh tests/cloud-init.sh tests/stage2-writer.sh; do
    [ -f "$t" ] && run "$t"
done
if [ "$quick" = 0 ]; then
    run tests/boot-chain.sh
    run tests/stage2-boot.sh
    run tests/e2e-provision.sh
    run tests/image-build.sh
    run tests/nspawn.sh
    run tests/stage2-faults.sh
    run tests/seed-flow.sh
fi

step "done"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all tests passed in $(( $(date +%s) - started ))s"

#!/bin/bash
# Runs every benchmark and prints its figures (bounded in time; a few minutes in all).
# Builds release binaries first: figures are meant for the build we ship.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "run as root: benchmarks use network namespaces" >&2; exit 1; }
tests/install-deps.sh
cargo build --release --locked -p agent -p netboot --examples --bins
export PROVISIONER=$PWD/target/release/provisioner
export TFTP_SERVER=$PWD/target/release/examples/tftp_server
# Where tests/lib.sh records what each benchmark starts, for the check at the end.
PV_TRACK_DIR=$(mktemp -d /var/tmp/pv-track.XXXXXX)
export PV_TRACK_DIR
trap 'rm -rf "$PV_TRACK_DIR"' EXIT
for b in netboot-memory dbus-status status-patch status-apiserver boot-storm dhcp-perfdhcp tftp http pxe-chain stage2-write; do
    printf '\n=== %s\n' "$b"
    bash "tests/bench/$b.sh" || echo "benchmark $b failed"
done
printf '\n=== processes left running by the benchmarks\n'
if tests/leftovers.sh "$PV_TRACK_DIR"; then echo none; else exit 1; fi

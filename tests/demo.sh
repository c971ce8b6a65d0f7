#!/bin/bash
# The main job on this one machine, no cluster needed: builds provisioner, starts
# `provisioner netboot` with the embedded (YAML folder) inventory inside a private network
# namespace, and PXE-boots VMs from it with real firmware (SeaBIOS + iPXE ROM, and OVMF whose own
# PXE fetches snponly.efi over TFTP). Each VM boots our kernel and initrd and prints a marker.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the demo creates network namespaces and taps" >&2; exit 1; }
tests/install-deps.sh
cargo build --locked -p agent
exec bash tests/boot-chain.sh

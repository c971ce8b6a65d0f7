#!/bin/bash
# The main job on this one machine, no cluster needed: builds provisioner and the static stage2,
# then inside a private network namespace starts `provisioner netboot` with the embedded (YAML
# folder) inventory and `provisioner imageserver`, and PXE-provisions a UEFI VM with an empty
# disk: stage2 writes a test image, the VM reboots from its disk through the firmware and prints
# a marker (tests/e2e-provision.sh). Then it network-boots a kernel and initrd with real firmware
# on both paths, SeaBIOS + iPXE ROM and OVMF PXE + snponly.efi (tests/boot-chain.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the demo creates network namespaces and taps" >&2; exit 1; }
tests/install-deps.sh
cargo build --locked -p agent
bash tests/e2e-provision.sh
bash tests/boot-chain.sh

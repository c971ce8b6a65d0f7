#!/bin/bash
# Installs what the tests and the demo need on a fresh Debian 12 (bookworm) or Ubuntu 24.04 host:
# packages from the distribution's own archive only, and for tests/fuzz.sh rustup's nightly
# toolchain (minimal profile) and cargo-fuzz (crates.io). Services shipped by these packages
# (tftpd-hpa, nginx; libvirt-daemon ships no unit, libvirtd is started by tests/libvirt-lab.sh
# itself) are kept from starting on the host: the tests run their servers inside network namespaces.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
    iproute2 procps kmod cpio curl python3 ca-certificates
    busybox-static isc-dhcp-client     # DHCP clients (udhcpc, dhclient)
    tftp-hpa atftp tftpd-hpa           # TFTP clients (atftp: windowsize), reference server
    dnsmasq-base kea-admin             # reference DHCP/TFTP server, perfdhcp
    qemu-system-x86 ipxe-qemu ipxe ovmf linux-image-amd64   # firmware, iPXE binaries, a kernel
    systemd                            # systemd-socket-activate, systemd-analyze, busctl
    dbus-daemon                        # a private system bus for the D-Bus tests
    systemd-container                  # nspawn test: systemd-nspawn (its rootfs: mmdebstrap below)
    fdisk zstd xz-utils gzip           # stage2 writer test: sfdisk makes a GPT image, compressors
    systemd-boot-efi dosfstools mtools e2fsprogs  # e2e test image: ESP without loop mounts, ext4 root
    # cloud-init's own modules (`apt-cache depends cloud-init`): tests/cloud-init.sh runs the
    # package unpacked with `dpkg-deb -x`, never installed, so none of its services exists here
    python3-yaml python3-jsonschema python3-jinja2 python3-configobj python3-requests
    python3-jsonpatch python3-netifaces python3-oauthlib python3-serial
    syslinux syslinux-common           # the same image boots under BIOS (gptmbr.bin, ldlinux via mtools)
    mmdebstrap                         # image builder (tests/image-build.sh): the rootfs from the host's apt sources
    umoci                              # image builder, kubeadm profiles: OCI archives of the control-plane images
    openssl pkg-config libssl-dev libzstd-dev   # stage2-write bench: image data; building coreos-installer
    fio                                # stage2-write bench: the device written alone, several writes in flight
    nginx-light                        # http bench: the reference static file server (its service disabled below)
    gcc g++                            # the linker cargo calls; g++: libFuzzer's C++ sources (tests/fuzz.sh)
    # tests/libvirt-lab.sh: libvirtd (QEMU driver), virsh, and iptables for the isolated network's
    # rules (in the test's namespace). Not libvirt-daemon-system: no units, users or default
    # network; the test starts libvirtd itself with a private configuration.
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients iptables
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    # policy-rc.d 101: packages may not start or enable services on this host.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    # tftpd-hpa's and nginx's units may still be enabled for the next boot: they must not serve the
    # host's links.
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl disable --now tftpd-hpa 2>/dev/null || true
        systemctl disable --now nginx 2>/dev/null || true
    fi
fi

# tests/cloud-init.sh fetches the cloud-init package with `apt-get download`: it needs the lists.
if ! apt-cache policy cloud-init 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -q
fi

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install a Rust toolchain (1.80 or newer, e.g. with rustup); Debian 12's own rustc is too old" >&2
    exit 1
fi

# tests/fuzz.sh: cargo-fuzz on the nightly toolchain (libFuzzer needs nightly's sanitizer
# coverage flags); the main workspace stays on stable.
if ! command -v rustup >/dev/null; then
    echo "rustup not found: tests/fuzz.sh needs rustup's nightly toolchain and cargo-fuzz, and will fail" >&2
else
    if ! rustup toolchain list | grep -q '^nightly'; then
        rustup toolchain install nightly --profile minimal
    fi
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        cargo install cargo-fuzz --locked
    fi
fi

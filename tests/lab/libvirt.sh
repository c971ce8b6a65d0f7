#!/bin/bash
# A libvirt lab of the whole product on one workstation: the operator's flow with VMs.
#
#   tests/lab/libvirt.sh up       define and start everything, wait for the laptop's netboot,
#                                 apply the nodes' Machines on the laptop, start the nodes
#   tests/lab/libvirt.sh status   what runs, and the laptop's `kubectl get machines,nodes`
#   tests/lab/libvirt.sh ssh [CMD...]
#                                 a shell (or CMD) on the laptop, as the operator
#   tests/lab/libvirt.sh down     destroy and undefine all of it, stop the imageserver, delete
#                                 the lab directory
#
# What `up` makes (every name starts with $LAB_NAME, every file is in $LAB_DIR):
#   network  $LAB_NAME           isolated (no <forward>), no DHCP, no DNS: a bridge
#                                ${LAB_NAME}0 with the host's address $PREFIX.1 only
#   imageserver                  `provisioner imageserver` on $PREFIX.1:8000, serving the image
#                                build's artifacts: the laptop's imageserver pulls the image
#                                through it (laptop.imageUpstream)
#   $LAB_NAME-laptop             SeaBIOS, a copy of the image (grown to 12 GiB) and a NoCloud
#                                seed disk (vfat, label CIDATA) with the product's user-data,
#                                meta-data and network-config (`provisioner cloud-config laptop`):
#                                static address $PREFIX.2, `kubeadm init`; admin.conf appears,
#                                netboot.path starts netboot
#   $LAB_NAME-node-bios          SeaBIOS + QEMU's iPXE NIC ROM, empty 8 GiB disk, network first
#   $LAB_NAME-node-uefi          OVMF (its own PXE, IPv6 off), empty 8 GiB disk, network first
# The nodes' Machines (node-bios $PREFIX.20, node-uefi $PREFIX.21) are applied with kubectl on
# the laptop over SSH (key $LAB_DIR/id_operator) once netboot runs there; the nodes then boot
# from the laptop's netboot, are imaged, reboot from their disks and join the cluster.
#
# Settings (environment; `up` writes them to $LAB_DIR/lab.env, which `status`, `ssh` and `down`
# read back):
#   LAB_IMAGE_DIR   the debian-kubeadm build (`image-builder/build.sh --profile debian-kubeadm
#                   --kubernetes BUNDLE --out DIR`: manifest.json, image.raw.zst, vmlinuz,
#                   stage2.img); required by `up`
#   LAB_DIR         /var/tmp/provisioner-lab       LAB_NAME  pvlab
#   LAB_SUBNET_PREFIX 10.77.0 (a /24)              LAB_NODES "bios uefi" (which nodes)
#   LAB_DOMAIN_TYPE kvm when libvirt can use KVM, else qemu (TCG)
#   LIBVIRT_DEFAULT_URI  as virsh takes it (qemu:///system when unset)
#   PROVISIONER     the provisioner binary run on this host (target/debug/provisioner of the
#                   repository, else `provisioner` from PATH)
#   LAB_TIMEOUT     1800: seconds `up` waits for the laptop's netboot
#   LAB_LAPTOP_MEM 3072, LAB_NODE_MEM 2048 (MiB), LAB_CPUS 2
#   LAB_KUBERNETES_VERSION   read from the image (/usr/share/provisioner/kubernetes/version)
#   OVMF_CODE, OVMF_VARS     /usr/share/OVMF/OVMF_{CODE,VARS}_4M.fd
# Needs: virsh, zstd, sfdisk, debugfs, mkfs.vfat, mcopy, ssh, ssh-keygen, python3; root (the
# imageserver binds the bridge's address; the lab directory holds the disks).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LAB_DIR=${LAB_DIR:-/var/tmp/provisioner-lab}
LAB_ENV=$LAB_DIR/lab.env

say() { printf '[lab] %s\n' "$*" >&2; }
die() { printf '[lab] error: %s\n' "$*" >&2; exit 1; }

# The settings: those `up` recorded win over the environment, so `down` undoes what `up` made.
if [ -f "$LAB_ENV" ]; then
    # shellcheck source=/dev/null
    . "$LAB_ENV"
fi
LAB_NAME=${LAB_NAME:-pvlab}
LAB_SUBNET_PREFIX=${LAB_SUBNET_PREFIX:-10.77.0}
LAB_NODES=${LAB_NODES:-bios uefi}
LAB_TIMEOUT=${LAB_TIMEOUT:-1800}
LAB_LAPTOP_MEM=${LAB_LAPTOP_MEM:-3072}
LAB_NODE_MEM=${LAB_NODE_MEM:-2048}
LAB_CPUS=${LAB_CPUS:-2}
OVMF_CODE=${OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
OVMF_VARS=${OVMF_VARS:-/usr/share/OVMF/OVMF_VARS_4M.fd}
if [ -z "${PROVISIONER:-}" ]; then
    if [ -x "$REPO/target/debug/provisioner" ]; then PROVISIONER=$REPO/target/debug/provisioner
    else PROVISIONER=$(command -v provisioner || true); fi
fi
NET=$LAB_NAME
BRIDGE=${LAB_NAME}0
HOST_IP=$LAB_SUBNET_PREFIX.1
LAPTOP=$LAB_NAME-laptop
LAPTOP_IP=$LAB_SUBNET_PREFIX.2
LAPTOP_MAC=52:54:00:77:00:02
IMAGESERVER_PORT=8000
# node KIND -> Machine name, MAC, IP
declare -A NODE_MAC=([bios]=52:54:00:77:00:20 [uefi]=52:54:00:77:00:21)
declare -A NODE_IP=([bios]=$LAB_SUBNET_PREFIX.20 [uefi]=$LAB_SUBNET_PREFIX.21)
DOMAINS=("$LAPTOP")
for kind in $LAB_NODES; do
    [ -n "${NODE_MAC[$kind]:-}" ] || die "LAB_NODES: unknown node kind '$kind' (bios, uefi)"
    DOMAINS+=("$LAB_NAME-node-$kind")
done

virsh() { command virsh -q "$@"; }
defined_domain() { virsh dominfo "$1" >/dev/null 2>&1; }
defined_network() { virsh net-info "$1" >/dev/null 2>&1; }

# laptop CMD...: CMD on the laptop over SSH as the operator (the image's default user).
laptop() {
    ssh -i "$LAB_DIR/id_operator" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o LogLevel=ERROR -o ConnectTimeout=10 -o ServerAliveInterval=15 -o BatchMode=yes \
        "debian@$LAPTOP_IP" "$@"
}

# imageserver_pid: the PID of the imageserver `up` started, if it still runs (its command line
# names the lab directory: a PID reused since is never taken for it).
imageserver_pid() {
    local pid
    pid=$(cat "$LAB_DIR/imageserver.pid" 2>/dev/null) || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$LAB_DIR/artifacts" || return 1
    echo "$pid"
}

# wait_until SECONDS INTERVAL CMD...: CMD until it succeeds (0) or SECONDS have passed (1).
wait_until() {
    local deadline=$(($(date +%s) + $1)) interval=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep "$interval"
    done
}

xml_network() {
    # No <forward>: an isolated network, the VMs reach this host's bridge address only.
    # No <dhcp>, DNS off: libvirt starts no dnsmasq; the laptop's address is static (its seed),
    # the nodes get theirs from the laptop's netboot.
    cat <<EOF
<network>
  <name>$NET</name>
  <bridge name='$BRIDGE' stp='off' delay='0'/>
  <mac address='52:54:00:77:00:01'/>
  <dns enable='no'/>
  <ip address='$HOST_IP' netmask='255.255.255.0'/>
</network>
EOF
}

# xml_domain NAME FIRMWARE MEM_MIB MAC DEVICES_XML: a domain with one NIC on the lab network
# (PCI slot 3: the guest names it ens3 on both machine types) and its serial console both on a
# pty (`virsh console NAME`) and logged to $LAB_DIR/NAME.serial.
xml_domain() {
    local name=$1 firmware=$2 mem=$3 mac=$4 devices=$5 machine os_extra="" nic_boot="" rom=""
    case "$firmware" in
        bios-disk) machine=pc ;;
        bios-net) machine=pc; nic_boot="<boot order='1'/>" ;;
        uefi-net)
            machine=q35
            nic_boot="<boot order='1'/>"
            # OVMF's own PXE (no iPXE ROM on the NIC), as on most real UEFI machines
            rom="<rom enabled='no'/>"
            os_extra="<loader readonly='yes' type='pflash'>$OVMF_CODE</loader>
    <nvram template='$OVMF_VARS'>$LAB_DIR/$name.vars.fd</nvram>"
            ;;
    esac
    cat <<EOF
<domain type='$LAB_DOMAIN_TYPE'>
  <name>$name</name>
  <memory unit='MiB'>$mem</memory>
  <vcpu>$LAB_CPUS</vcpu>
  <os>
    <type arch='x86_64' machine='$machine'>hvm</type>
    $os_extra
  </os>
EOF
    if [ "$firmware" = uefi-net ]; then
        # IPv6 off in the firmware: when netboot answers an imaged machine "boot the local disk"
        # (iPXE exits), OVMF would otherwise try PXEv6 and HTTP Boot v6 first, a minute each.
        cat <<EOF
  <sysinfo type='fwcfg'>
    <entry name='opt/org.tianocore/IPv6Support'>no</entry>
  </sysinfo>
EOF
    fi
    cat <<EOF
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
$devices
    <interface type='network'>
      <source network='$NET'/>
      <mac address='$mac'/>
      <model type='virtio'/>
      $nic_boot
      $rom
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <serial type='pty'>
      <log file='$LAB_DIR/$name.serial' append='on'/>
    </serial>
    <console type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# xml_disk FILE TARGET [BOOT_ORDER] [readonly]
xml_disk() {
    printf "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw' cache='unsafe'/>\n"
    printf "      <source file='%s'/>\n      <target dev='%s' bus='virtio'/>\n" "$1" "$2"
    [ -n "${3:-}" ] && printf "      <boot order='%s'/>\n" "$3"
    [ "${4:-}" = readonly ] && printf "      <readonly/>\n"
    printf "    </disk>\n"
}

manifest() {
    python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(eval("m"+sys.argv[2]))' \
        "$LAB_DIR/artifacts/manifest.json" "$1"
}

# kubernetes_version RAW: the image's /usr/share/provisioner/kubernetes/version, read from the
# root partition (GPT type "Linux root (x86-64)") of the raw image without mounting it.
kubernetes_version() {
    local raw=$1 start
    start=$(sfdisk -J "$raw" | python3 -c '
import json, sys
parts = json.load(sys.stdin)["partitiontable"]["partitions"]
print(next(p["start"] for p in parts if p["type"].upper() == "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"))')
    debugfs -R 'cat /usr/share/provisioner/kubernetes/version' "$raw?offset=$((start * 512))" 2>/dev/null
}

write_config() {
    local timeout=""
    # Without KVM an API server starts minutes slower than kubeadm's default wait allows.
    [ "$LAB_DOMAIN_TYPE" = kvm ] || timeout="  controlPlaneTimeout: 1800"
    cat >"$LAB_DIR/provisioner.yaml" <<EOF
# The lab's configuration (tests/lab/libvirt.sh): the laptop gets it through its seed.
interface: ens3
serverAddress: $LAPTOP_IP
subnet: $LAB_SUBNET_PREFIX.0/24
gateway: $HOST_IP
bootFiles:
  ipxeDir: /usr/share/provisioner/ipxe
  assetsDir: /usr/share/provisioner/assets
boot:
  kernel: vmlinuz
  initrd: stage2.img
  cmdline: "console=ttyS0 stage2.reboot_delay=2"
image:
  url: "http://$LAPTOP_IP:8080/image.raw.zst"
  sha256: $(manifest '["image"]["rawSha256"]')
  size: $(manifest '["image"]["rawSize"]')
inventory:
  kubernetes: true
cloudInit:
  sshAuthorizedKeys:
    - "$(cat "$LAB_DIR/id_operator.pub")"
laptop:
  hostname: laptop
  macAddress: "$LAPTOP_MAC"
  kubernetesVersion: $KUBERNETES_VERSION
  imageUpstream: "http://$HOST_IP:$IMAGESERVER_PORT/"
$timeout
EOF
}

# The NoCloud seed as a small vfat disk labelled CIDATA (mtools: no loop mount, no ISO tool).
write_seed() {
    local f
    mkdir -p "$LAB_DIR/seed"
    for f in user-data meta-data network-config; do
        "$PROVISIONER" cloud-config laptop --config "$LAB_DIR/provisioner.yaml" --file "$f" \
            >"$LAB_DIR/seed/$f"
    done
    rm -f "$LAB_DIR/seed.img"
    truncate -s 4M "$LAB_DIR/seed.img"
    mkfs.vfat -n CIDATA "$LAB_DIR/seed.img" >/dev/null
    mcopy -i "$LAB_DIR/seed.img" "$LAB_DIR/seed/user-data" "$LAB_DIR/seed/meta-data" \
        "$LAB_DIR/seed/network-config" ::/
}

machine_yaml() {
    local kind=$1
    cat <<EOF
apiVersion: provisioner.dev/v1alpha1
kind: Machine
metadata:
  name: node-$kind
spec:
  macAddress: "${NODE_MAC[$kind]}"
  ipAddress: ${NODE_IP[$kind]}
  hostname: node-$kind
EOF
}

laptop_ready() {
    laptop 'systemctl is-active --quiet netboot.service && sudo kubectl --request-timeout=20s get crd machines.provisioner.dev' \
        >/dev/null 2>&1
}

cmd_up() {
    local tool f waited=0 next_say=60 start laptop_t0 kind name
    [ -n "${LAB_IMAGE_DIR:-}" ] || die "LAB_IMAGE_DIR: name the debian-kubeadm build (image-builder/build.sh --profile debian-kubeadm --kubernetes BUNDLE --out DIR)"
    for f in manifest.json image.raw.zst vmlinuz stage2.img; do
        [ -f "$LAB_IMAGE_DIR/$f" ] || die "$LAB_IMAGE_DIR/$f is missing: not an image-builder/build.sh output"
    done
    [ -n "$PROVISIONER" ] && [ -x "$PROVISIONER" ] || die "no provisioner binary (cargo build -p agent, or PROVISIONER=)"
    for tool in virsh zstd sfdisk debugfs mkfs.vfat mcopy ssh ssh-keygen python3; do
        command -v "$tool" >/dev/null || die "$tool is missing"
    done
    [ ! -e "$LAB_ENV" ] || die "a lab is up in $LAB_DIR: run '$0 down' first"
    virsh uri >/dev/null || die "virsh cannot reach libvirt (LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-})"
    if [ -z "${LAB_DOMAIN_TYPE:-}" ]; then
        if virsh domcapabilities --virttype kvm >/dev/null 2>&1; then LAB_DOMAIN_TYPE=kvm; else LAB_DOMAIN_TYPE=qemu; fi
    fi
    ! defined_network "$NET" || die "libvirt already has a network $NET (LAB_NAME=another name)"
    for name in "${DOMAINS[@]}"; do
        ! defined_domain "$name" || die "libvirt already has a domain $name (LAB_NAME=another name)"
    done
    if [ -e "$LAB_DIR" ] && [ -n "$(ls -A "$LAB_DIR")" ]; then die "$LAB_DIR is not empty"; fi
    start=$(date +%s)

    mkdir -p "$LAB_DIR"
    trap 'say "up did not finish: \"$0 down\" removes what it made"' EXIT
    # Written first: from here on `down` knows what to remove.
    {
        printf 'LAB_NAME=%q\nLAB_SUBNET_PREFIX=%q\nLAB_NODES=%q\nLAB_DOMAIN_TYPE=%q\n' \
            "$LAB_NAME" "$LAB_SUBNET_PREFIX" "$LAB_NODES" "$LAB_DOMAIN_TYPE"
        printf 'LIBVIRT_DEFAULT_URI=%q\nPROVISIONER=%q\nexport LIBVIRT_DEFAULT_URI\n' \
            "${LIBVIRT_DEFAULT_URI:-qemu:///system}" "$PROVISIONER"
    } >"$LAB_ENV"
    export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
    say "lab $LAB_NAME in $LAB_DIR, domain type $LAB_DOMAIN_TYPE, libvirt $LIBVIRT_DEFAULT_URI"

    mkdir -p "$LAB_DIR/artifacts"
    for f in manifest.json image.raw.zst vmlinuz stage2.img; do
        ln "$LAB_IMAGE_DIR/$f" "$LAB_DIR/artifacts/$f" 2>/dev/null || cp "$LAB_IMAGE_DIR/$f" "$LAB_DIR/artifacts/$f"
    done
    zstd -q -d "$LAB_DIR/artifacts/image.raw.zst" -o "$LAB_DIR/laptop.raw"
    KUBERNETES_VERSION=${LAB_KUBERNETES_VERSION:-$(kubernetes_version "$LAB_DIR/laptop.raw")}
    [ -n "$KUBERNETES_VERSION" ] || die "the image names no Kubernetes version (not a debian-kubeadm build?)"
    # Room for containerd's copies of the images and etcd: cloud-init's growpart fills the disk.
    truncate -s 12G "$LAB_DIR/laptop.raw"
    for kind in $LAB_NODES; do truncate -s 8G "$LAB_DIR/node-$kind.raw"; done
    ssh-keygen -q -t ed25519 -N '' -C "operator@$LAB_NAME" -f "$LAB_DIR/id_operator"
    write_config
    write_seed
    say "laptop disk, seed (Kubernetes $KUBERNETES_VERSION) and node disks in $LAB_DIR"

    xml_network >"$LAB_DIR/network.xml"
    virsh net-define "$LAB_DIR/network.xml" >/dev/null
    virsh net-start "$NET" >/dev/null
    say "network $NET: bridge $BRIDGE, $HOST_IP/24, no DHCP, no forwarding"

    setsid "$PROVISIONER" imageserver --dir "$LAB_DIR/artifacts" --listen "$HOST_IP:$IMAGESERVER_PORT" \
        </dev/null >"$LAB_DIR/imageserver.log" 2>&1 &
    echo $! >"$LAB_DIR/imageserver.pid"
    wait_until 30 0.2 grep -q 'imageserver ready' "$LAB_DIR/imageserver.log" ||
        die "the imageserver did not start (see $LAB_DIR/imageserver.log)"
    say "imageserver on $HOST_IP:$IMAGESERVER_PORT (pid $(cat "$LAB_DIR/imageserver.pid"))"

    xml_domain "$LAPTOP" bios-disk "$LAB_LAPTOP_MEM" "$LAPTOP_MAC" \
        "$(xml_disk "$LAB_DIR/laptop.raw" vda 1; xml_disk "$LAB_DIR/seed.img" vdb '' readonly)" \
        >"$LAB_DIR/$LAPTOP.xml"
    virsh define "$LAB_DIR/$LAPTOP.xml" >/dev/null
    virsh start "$LAPTOP" >/dev/null
    laptop_t0=$(date +%s)
    say "$LAPTOP started ($LAPTOP_IP): kubeadm init, then netboot (serial: $LAB_DIR/$LAPTOP.serial)"

    until laptop_ready; do
        waited=$(($(date +%s) - laptop_t0))
        [ "$waited" -lt "$LAB_TIMEOUT" ] ||
            die "the laptop's netboot is not up after ${LAB_TIMEOUT}s (serial: $LAB_DIR/$LAPTOP.serial)"
        if [ "$waited" -ge "$next_say" ]; then
            say "waiting for the laptop's netboot (${waited}s): $(tail -n 1 "$LAB_DIR/$LAPTOP.serial" 2>/dev/null | tr -cd '[:print:]' | cut -c1-100)"
            next_say=$((waited + 60))
        fi
        sleep 10
    done
    say "laptop: netboot active, Machine CRD applied ($(($(date +%s) - laptop_t0))s after power-on)"

    for kind in $LAB_NODES; do
        machine_yaml "$kind" >"$LAB_DIR/node-$kind.yaml"
        laptop sudo kubectl apply -f - <"$LAB_DIR/node-$kind.yaml" >/dev/null ||
            die "kubectl apply of node-$kind's Machine on the laptop failed"
    done
    say "Machines applied on the laptop: $(for kind in $LAB_NODES; do printf 'node-%s ' "$kind"; done)"

    for kind in $LAB_NODES; do
        name=$LAB_NAME-node-$kind
        xml_domain "$name" "$kind-net" "$LAB_NODE_MEM" "${NODE_MAC[$kind]}" \
            "$(xml_disk "$LAB_DIR/node-$kind.raw" vda 2)" >"$LAB_DIR/$name.xml"
        virsh define "$LAB_DIR/$name.xml" >/dev/null
        virsh start "$name" >/dev/null
        say "$name started (${NODE_MAC[$kind]}, network boot first)"
    done
    trap - EXIT
    say "up in $(($(date +%s) - start))s. Watch: $0 status; $0 ssh sudo kubectl get machines -w; virsh console NAME"
}

cmd_status() {
    local name state rc=0 pid
    [ -f "$LAB_ENV" ] || { say "no lab in $LAB_DIR"; return 1; }
    export LIBVIRT_DEFAULT_URI
    if defined_network "$NET"; then
        echo "network $NET: $(virsh net-info "$NET" | awk '$1 == "Active:" {print ($2 == "yes" ? "active" : "inactive")}'), bridge $BRIDGE"
    else
        echo "network $NET: not defined"; rc=1
    fi
    for name in "${DOMAINS[@]}"; do
        state=$(virsh domstate "$name" 2>/dev/null) || { state="not defined"; rc=1; }
        echo "domain $name: $state"
    done
    if pid=$(imageserver_pid); then echo "imageserver: pid $pid on $HOST_IP:$IMAGESERVER_PORT"
    else echo "imageserver: not running"; rc=1; fi
    if laptop true 2>/dev/null; then
        echo "laptop $LAPTOP_IP: netboot $(laptop systemctl is-active netboot.service 2>/dev/null || true)"
        laptop sudo kubectl get machines,nodes -o wide 2>/dev/null || true
    else
        echo "laptop $LAPTOP_IP: not reachable over SSH (yet)"
    fi
    return "$rc"
}

cmd_down() {
    local name pid
    [ -f "$LAB_ENV" ] || [ ! -e "$LAB_DIR" ] ||
        die "$LAB_DIR has no lab.env: not a lab directory, left alone"
    export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
    # Unreachable, libvirt would look empty: nothing may be taken for gone.
    virsh uri >/dev/null || die "virsh cannot reach libvirt ($LIBVIRT_DEFAULT_URI): nothing removed"
    for name in "${DOMAINS[@]}"; do
        defined_domain "$name" || continue
        virsh destroy "$name" >/dev/null 2>&1 || true # not running: nothing to do
        virsh undefine --nvram "$name" >/dev/null
        say "domain $name destroyed and undefined"
    done
    if defined_network "$NET"; then
        virsh net-destroy "$NET" >/dev/null 2>&1 || true
        virsh net-undefine "$NET" >/dev/null
        say "network $NET destroyed and undefined"
    fi
    if pid=$(imageserver_pid); then
        kill "$pid" 2>/dev/null || true
        wait_until 10 0.2 test ! -e "/proc/$pid" || kill -9 "$pid" 2>/dev/null || true
        say "imageserver (pid $pid) stopped"
    fi
    for name in "${DOMAINS[@]}"; do
        # libvirt's own log of the domain, when this host's libvirtd writes it
        rm -f "/var/log/libvirt/qemu/$name.log"
    done
    if [ -e "$LAB_DIR" ]; then
        rm -rf --one-file-system "$LAB_DIR"
        say "$LAB_DIR removed"
    fi
}

case "${1:-}" in
    up) cmd_up ;;
    status) cmd_status ;;
    down) cmd_down ;;
    ssh)
        shift
        [ -f "$LAB_ENV" ] || die "no lab in $LAB_DIR"
        laptop "$@" ;;
    *) echo "usage: $0 up|status|down|ssh [CMD...]" >&2; exit 2 ;;
esac

#!/bin/bash
# The libvirt lab (tests/lab/libvirt.sh) brought up and down by a libvirtd this test starts:
# Debian's libvirtd, in a network namespace of the test's own (the lab's bridge, its taps and all
# VM traffic stay there) and in a private mount namespace whose /etc/libvirt, /run, /var/lib,
# /var/log, /var/cache, /etc/passwd and /etc/group are bind mounts of $WORK/libvirtd: its
# configuration (QEMU as root, no cgroups, no security driver, no virtlogd; the libvirt-qemu
# user its QEMU driver looks up) and every file it writes stay in the test's work directory.
# Domains are `<domain type='qemu'>` (TCG).
#
#   lab up     (LAB_NODES=bios: one node is enough here) the isolated network without DHCP, the
#              imageserver on its host side, the laptop from a copy of the debian-kubeadm image
#              with its NoCloud seed disk: kubeadm init, netboot.path starts netboot; the
#              node's Machine applied with kubectl over SSH; the BIOS node (SeaBIOS + iPXE ROM,
#              empty disk) started
# Checks: the network has no <dhcp> and no <forward> and the bridge only the host's address; no
# dnsmasq runs; QEMU runs with -accel tcg; the laptop ran kubeadm init, has its static address
# (not a DHCP lease) and netboot is active; node-bios PXE-boots from the laptop's netboot: its
# Machine reaches Imaging (or later), netboot's journal on the laptop has its PXEBooting and
# Imaging records; `lab status` works; `lab down` leaves no domain, no network, no bridge or tap,
# no lab directory, no process; libvirtd stopped by its PID leaves no process; nothing changed
# in the host's libvirt directories, links or iptables rules. If libvirtd cannot run here, the
# test says why and skips (SKIP line, exit 0).
#
# The image: as tests/cluster-flow.sh (cached in /var/tmp/provisioner-test-cache, or
# CLUSTER_IMAGE_DIR=DIR). LAB_TIMEOUT=1500 (laptop up) NODE_TIMEOUT=900 (node to Imaging)
# SKIP_BUILD=1 (no cargo build) KEEP_WORK=1
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$REPO/tests/lib-kube.sh"
. "$REPO/tests/lib-image.sh"

LAB_TIMEOUT=${LAB_TIMEOUT:-1500}
NODE_TIMEOUT=${NODE_TIMEOUT:-900}
LAB=$REPO/tests/lab/libvirt.sh
LAB_DIR=/var/tmp/pv-lab-$TEST_NAME-$$
LAB_NAME=pvl$$ # libvirt names and the bridge: unique per run
LVD=$WORK/libvirtd
URI="qemu:///system?socket=$LVD/run/libvirt/libvirt-sock"
TEST_T0=$(date +%s)
since() { echo $(($(date +%s) - TEST_T0)); }

skip() { printf 'SKIP %s: %s\n' "$TEST_NAME" "$*"; exit 0; }
lvirsh() { virsh -q -c "$URI" "$@"; }
# lab ARGS...: the lab script as the operator runs it, inside the test's namespace.
lab() {
    ip netns exec "$NS_SRV" env LAB_DIR="$LAB_DIR" LAB_NAME="$LAB_NAME" LIBVIRT_DEFAULT_URI="$URI" \
        LAB_DOMAIN_TYPE=qemu LAB_NODES=bios LAB_TIMEOUT="$LAB_TIMEOUT" LAB_IMAGE_DIR="${IMG:-}" \
        PROVISIONER="$PROVISIONER" "$LAB" "$@"
}
laptop() { lab ssh "$@"; }

# On any exit: the lab down (when up), then every process with the lab directory on its command
# line (QEMU, the imageserver) stopped by PID; lib.sh's cleanup then stops libvirtd.
lab_teardown() {
    local pid
    if [ -f "$LAB_DIR/lab.env" ]; then lab down >&2 || true; fi
    for pid in $(pgrep -f -- "$LAB_DIR" || true); do
        printf 'FAIL %s: left running: %s\n' "$TEST_NAME" "$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")"
        stop_pid "$pid"
    done
    rm -rf --one-file-system "$LAB_DIR"
}
trap 'lab_teardown; cleanup' EXIT

for tool in libvirtd virsh iptables unshare qemu-system-x86_64 zstd sfdisk debugfs mkfs.vfat mcopy ssh ssh-keygen; do
    command -v "$tool" >/dev/null || { fail "$tool is installed (tests/install-deps.sh)"; finish; }
done
BUNDLE=$(kube_bundle_dir) || { fail "the Kubernetes bundle is found (KUBERNETES_BUNDLE)"; finish; }
[ "${SKIP_BUILD:-0}" = 1 ] || (cd "$REPO" && cargo build -q --workspace --all-targets --locked)
[ "${SKIP_BUILD:-0}" = 1 ] || build_static_stage2 "$STATIC_TARGET_DIR"
kubeadm_image "$BUNDLE" || finish
log "image $IMG ($(since)s)"

# What must be the same after the test: the host's libvirt directories, links, iptables rules.
host_state() {
    # (find fails on the directories that do not exist: what is listed is what counts)
    find /etc/libvirt /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt 2>/dev/null | sort || true
    # links a libvirtd on the host would make (other tests' veths come and go meanwhile)
    ip -o link show | awk -F': ' '{print $2}' | grep -E "^($LAB_NAME|vnet|virbr|tap)" | sort || true
    iptables -S 2>/dev/null || true
    find /sys/fs/cgroup -maxdepth 3 \( -name '*machine*' -o -name '*libvirt*' -o -name '*qemu*' \) 2>/dev/null | sort || true
}
host_state >"$WORK/host-before"

# --- libvirtd, private -------------------------------------------------------------------------
ip netns add "$NS_SRV"
in_srv ip link set lo up
mkdir -p "$LVD"/{etc,run,var/lib/libvirt/dnsmasq,var/log/libvirt,var/cache/libvirt}
cat >"$LVD/etc/libvirtd.conf" <<EOF
# root only (0700 sockets), no polkit (no system bus here)
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
# not read from DMI (dmidecode needs /dev/mem)
host_uuid = "$(cat /proc/sys/kernel/random/uuid)"
log_outputs = "3:stderr"
EOF
cat >"$LVD/etc/qemu.conf" <<EOF
# QEMU as root with no labelling, no cgroups, no per-domain /dev namespace, its console log
# written by QEMU itself (no virtlogd): nothing outside this directory, no service but libvirtd.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
EOF
# The QEMU driver looks up its build's default user (libvirt-qemu, which Debian's
# libvirt-daemon-system creates) before it reads qemu.conf.
cp /etc/passwd "$LVD/passwd"
cp /etc/group "$LVD/group"
getent passwd libvirt-qemu >/dev/null || echo 'libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin' >>"$LVD/passwd"
getent group libvirt-qemu >/dev/null || echo 'libvirt-qemu:x:64055:' >>"$LVD/group"
LIBVIRTD_PID=$(start_in_srv libvirtd unshare --mount --propagation private bash -c '
    set -e
    d=$1
    mount --bind "$d/etc" /etc/libvirt
    mount --bind "$d/passwd" /etc/passwd
    mount --bind "$d/group" /etc/group
    mount --bind "$d/run" /run
    for x in lib log cache; do mount --bind "$d/var/$x" "/var/$x"; done
    exec libvirtd --config /etc/libvirt/libvirtd.conf' libvirtd "$LVD")
if ! wait_for -p "$LIBVIRTD_PID" -i 1 120 lvirsh version; then
    log "libvirtd's log:"; tail -n 20 "$WORK/libvirtd.log" >&2
    if alive "$LIBVIRTD_PID"; then
        skip "libvirtd (pid $LIBVIRTD_PID) did not answer on $LVD/run/libvirt/libvirt-sock within 120 s: $(grep ' error : ' "$WORK/libvirtd.log" | tail -n 1)"
    fi
    skip "libvirtd exited at start: $(grep ' error : ' "$WORK/libvirtd.log" | tail -n 1)"
fi
lvirsh version >&2
pass "libvirtd runs in the test's namespaces with its private configuration (pid $LIBVIRTD_PID, $(since)s)"

# --- up ----------------------------------------------------------------------------------------
UP_T0=$(date +%s)
if lab up; then
    UP_S=$(($(date +%s) - UP_T0))
    pass "lab up: network, imageserver, laptop to netboot, node-bios's Machine applied and node started (${UP_S}s)"
else
    UP_S=$(($(date +%s) - UP_T0))
    fail "lab up (after ${UP_S}s)"
    tail -n 40 "$LAB_DIR/$LAB_NAME-laptop.serial" >&2 2>/dev/null || true
    finish
fi

lvirsh net-dumpxml "$LAB_NAME" >"$WORK/network.xml"
check "the lab network is isolated and has no DHCP (no <forward>, no <dhcp>, DNS off)" bash -c \
    "! grep -qE '<forward|<dhcp' '$WORK/network.xml' && grep -q \"<dns enable='no'/>\" '$WORK/network.xml'"
check "the bridge ${LAB_NAME}0 has the host's address only" bash -c \
    "[ \"\$(ip netns exec '$NS_SRV' ip -o addr show dev ${LAB_NAME}0 | awk '\$3 == \"inet\" {print \$4}')\" = '$SUBNET_PREFIX.1/24' ]"
check "libvirt started no dnsmasq" not pgrep -f "libvirt/dnsmasq/$LAB_NAME"
# one PID file per domain (without a final newline), beside the driver's own driver.pid
QEMU_PIDS=$(for f in "$LVD/run/libvirt/qemu/$LAB_NAME"-*.pid; do [ -f "$f" ] && echo "$(cat "$f")"; done | tr '\n' ' ')
log "QEMU pids: $QEMU_PIDS"
check "both domains run QEMU with -accel tcg" bash -c \
    "n=0; for p in $QEMU_PIDS; do tr '\\0' ' ' </proc/\$p/cmdline | grep -q -- '-accel tcg' && n=\$((n + 1)); done; [ \$n = 2 ]"
check "laptop: kubeadm init succeeded (serial console log)" \
    grep -aq 'Your Kubernetes control-plane has initialized successfully' "$LAB_DIR/$LAB_NAME-laptop.serial"
laptop ip -4 -o addr show dev ens3 >"$WORK/laptop-addr" 2>&1 || true
cat "$WORK/laptop-addr" >&2
check "laptop: its static address from the seed's configuration, not a DHCP lease" bash -c \
    "grep -q 'inet $SUBNET_PREFIX.2/24' '$WORK/laptop-addr' && ! grep -q dynamic '$WORK/laptop-addr'"
check "laptop: netboot.path started netboot" laptop systemctl is-active --quiet netboot.service

# --- node-bios PXE-boots from the laptop's netboot -------------------------------------------------
phase() { laptop sudo kubectl get machine node-bios -o jsonpath='{.status.phase}' 2>/dev/null; }
imaging_or_later() { phase | grep -qxE 'Imaging|Imaged|Joining|Ready'; }
NODE_T0=$(date +%s)
if wait_for -i 10 "$NODE_TIMEOUT" imaging_or_later; then
    NODE_S=$(($(date +%s) - NODE_T0))
    pass "node-bios: PXE from the laptop's netboot, Machine phase $(phase) (${NODE_S}s after it was started)"
else
    NODE_S=-1
    fail "node-bios: Machine not Imaging within ${NODE_TIMEOUT}s (phase: $(phase || true))"
    tail -n 30 "$LAB_DIR/$LAB_NAME-node-bios.serial" >&2 2>/dev/null || true
fi
laptop sudo kubectl get machines -o wide >&2 || true
laptop sudo journalctl -u netboot.service -o json MACHINE=node-bios >"$WORK/node.journal" 2>/dev/null || true
PHASES=$(journal_phases "$WORK/node.journal")
log "node-bios's phase records in netboot's journal on the laptop: $PHASES"
check "netboot's journal on the laptop: node-bios PXEBooting, then Imaging" bash -c \
    "echo '$PHASES' | grep -qE '(^| )PXEBooting Imaging( |\$)'"
lab status >"$WORK/status.txt" 2>&1 && rc=0 || rc=$?
cat "$WORK/status.txt" >&2
check "lab status: everything defined and running" bash -c \
    "[ $rc = 0 ] && grep -q 'domain $LAB_NAME-node-bios: running' '$WORK/status.txt'"

# --- down ----------------------------------------------------------------------------------------
DOWN_T0=$(date +%s)
check "lab down" lab down
DOWN_S=$(($(date +%s) - DOWN_T0))
check "no domain left" bash -c "[ -z \"\$(virsh -q -c '$URI' list --all --name)\" ]"
check "no network left" bash -c "[ -z \"\$(virsh -q -c '$URI' net-list --all --name)\" ]"
ip netns exec "$NS_SRV" ip -o link show | awk -F': ' '{print $2}' >"$WORK/links-after"
check "no bridge or tap left in the namespace (only lo)" bash -c "[ \"\$(cat '$WORK/links-after')\" = lo ]"
check "the lab directory is gone" test ! -e "$LAB_DIR"
check "no process has the lab directory on its command line (QEMU, imageserver)" not pgrep -f -- "$LAB_DIR"
check "the domains' QEMU processes are gone" bash -c "for p in $QEMU_PIDS; do ! kill -0 \$p 2>/dev/null || exit 1; done"
stop_pid "$LIBVIRTD_PID"
check "libvirtd stopped by its PID ($LIBVIRTD_PID)" not alive "$LIBVIRTD_PID"
check "no QEMU of the lab runs" not pgrep -f "guest=$LAB_NAME-"
host_state >"$WORK/host-after"
if diff "$WORK/host-before" "$WORK/host-after" >&2; then
    pass "nothing changed in the host's libvirt directories, links, iptables rules or cgroups"
else
    fail "the host changed (diff above)"
fi

echo "LIBVIRT-LAB total_seconds=$(since) up_seconds=$UP_S node_to_imaging_seconds=$NODE_S down_seconds=$DOWN_S"
finish

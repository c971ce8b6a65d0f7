#!/bin/bash
# The whole product on empty machines, offline: a real Kubernetes cluster. Two VMs (QEMU TCG,
# SeaBIOS) on one virtual L2: a bridge in a network namespace this test creates, taps for the
# VMs, no user networking. The namespace's own side of the bridge ($SRV_IP) plays the
# operator's host.
#
#  operator's host  writes provisioner.yaml (with its laptop: section) and runs
#                   `provisioner imageserver --bootstrap --config provisioner.yaml` on
#                   $SRV_IP:8000: the debian-kubeadm artifacts (image-builder/build.sh with the
#                   Kubernetes bundle) and the laptop's NoCloud seed, rendered by the product
#                   (`provisioner cloud-config laptop`). dnsmasq stands in for the operator LAN's
#                   DHCP server and answers the laptop's MAC only.
#  laptop VM        boots a copy of the image from its disk, gets the seed's URL through SMBIOS
#                   (`ds=nocloud-net;s=…`; the image is not touched) and runs the product's
#                   cloud-config: static address, `kubeadm init` from the image's own binaries and
#                   images, the bridge pod network; admin.conf appears, netboot.path starts
#                   netboot, which takes the kubeconfig by LoadCredential= and applies the CRD.
#  operator         applies node2's Machine with kubectl on the laptop (over SSH, with the key the
#                   configuration's cloudInit.sshAuthorizedKeys put there).
#  node2 VM         empty disk, PXE (iPXE ROM) from the laptop's netboot, stage2 writes the image
#                   the laptop's imageserver fetched from the host (pull-through), reboots (QEMU
#                   ends: -no-reboot); started again from the same disk: cloud-init fetches its
#                   one-time user-data, `kubeadm join` with the bootstrap token netboot created.
#
# Checks: check-config accepts the configuration on the laptop; kubectl get nodes shows laptop and
# node2 Ready; netboot was inactive before admin.conf
# existed; kubectl get machines shows node2 Ready with its columns; the token Secret is gone; a
# pause Pod pinned to node2 is Running with an address from node2's pod range, reachable from the
# laptop; the user-data was served exactly once. Prints the time of each step.
#
# The image is built once per set of inputs (build.sh, kubernetes.sh, the profile, units, the
# bundle's SHA256SUMS, the provisioner and stage2 binaries) and cached in $IMAGE_CACHE;
# CLUSTER_IMAGE_DIR=DIR uses an earlier build output (run-all.sh passes image-build.sh's).
#
#   LAPTOP_TIMEOUT=1500 NODE_TIMEOUT=1200 (seconds per wait)  KEEP_WORK=1  KEEP_VMS=1 (leave the
#   VMs running at the end, for a look over SSH; stop with Ctrl-C)
#   SKIP_BUILD=1 (no cargo build)  KUBERNETES_BUNDLE=DIR
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$REPO/tests/lib-qemu.sh"
. "$REPO/tests/lib-kube.sh"
. "$REPO/tests/lib-image.sh"

LAPTOP_TIMEOUT=${LAPTOP_TIMEOUT:-1500}
NODE_TIMEOUT=${NODE_TIMEOUT:-1200}
LAPTOP_MAC=52:54:00:5e:00:50
LAPTOP_IP=$SUBNET_PREFIX.2
NODE_MAC=52:54:00:5e:00:52
NODE_IP=$SUBNET_PREFIX.20
BOOTSTRAP_PORT=8000
BOOTSTRAP_URL=http://$SRV_IP:$BOOTSTRAP_PORT
LAPTOP_DONE='provisioner: cloud-init user-data applied on laptop'
NODE_DONE='provisioner: cloud-init user-data applied on node2'
TEST_T0=$(date +%s.%N)
since() { awk -v a="$TEST_T0" -v b="${1:-$(date +%s.%N)}" 'BEGIN{printf "%.1f", b-a}'; }
STEP_T0=$TEST_T0
declare -A AT=() # step name -> seconds since the test started
mark() { AT[$1]=$(since "${2:-}"); }
step_done() { # step_done WHAT: logs WHAT with its duration and the test's elapsed time
    log "step: $1 ($(awk -v a="$STEP_T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s, at $(since)s)"
    STEP_T0=$(date +%s.%N)
}
# Conditions read on the laptop go over SSH into a VM under TCG: lib.sh's wait_for asks them
# every 5 s (-i 5), not ten times a second.

for tool in qemu-system-x86_64 dnsmasq zstd python3 mmdebstrap umoci ssh ssh-keygen; do
    command -v "$tool" >/dev/null || { fail "$tool is installed (tests/install-deps.sh)"; finish; }
done
BUNDLE=$(kube_bundle_dir) || { fail "the Kubernetes bundle is found (KUBERNETES_BUNDLE)"; finish; }

# --- binaries and the image ---------------------------------------------------------------------
# The same selection as run-all.sh's build: with `-p agent` alone cargo resolves other features
# and rebuilds the provisioner (139 s of a CI run).
[ "${SKIP_BUILD:-0}" = 1 ] || (cd "$REPO" && cargo build -q --workspace --all-targets --locked)
[ "${SKIP_BUILD:-0}" = 1 ] || build_static_stage2 "$STATIC_TARGET_DIR"
step_done "cargo build provisioner and static stage2"

IMAGE_T0=$(date +%s.%N)
kubeadm_image "$BUNDLE" || finish
manifest() { python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(eval("m"+sys.argv[2]))' "$IMG/manifest.json" "$1"; }
RAW_SHA256=$(manifest '["image"]["rawSha256"]')
RAW_SIZE=$(manifest '["image"]["rawSize"]')
ZST_SIZE=$(manifest '["image"]["size"]')
K8S_VERSION=$(cd "$(kube_unpack)" && ./kubeadm version -o short)
log "image: $RAW_SIZE bytes raw, $ZST_SIZE zstd, kernel $(manifest '["kernelRelease"]'), Kubernetes $K8S_VERSION"
mark image_built
IMAGE_S=$(awk -v a="$IMAGE_T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
step_done "debian-kubeadm image"

ART=$WORK/artifacts
mkdir -p "$ART"
for f in manifest.json image.raw.zst vmlinuz stage2.img; do ln "$IMG/$f" "$ART/$f" 2>/dev/null || cp "$IMG/$f" "$ART/$f"; done
zstd -q -d "$IMG/image.raw.zst" -o "$WORK/laptop.raw"
# Room for containerd's copies of the images and etcd: cloud-init's growpart fills the disk.
truncate -s 12G "$WORK/laptop.raw"
truncate -s 8G "$WORK/node2.raw"
ssh-keygen -q -t ed25519 -N '' -C "operator@cluster-flow" -f "$WORK/id_operator"
step_done "laptop disk (copy of the image), node2's empty disk, the operator's SSH key"

# --- the operator's configuration and host ---------------------------------------------------------
cat > "$WORK/provisioner.yaml" <<EOF
interface: ens3
serverAddress: $LAPTOP_IP
subnet: $SUBNET_PREFIX.0/24
bootFiles:
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
  kubernetes: true
cloudInit:
  sshAuthorizedKeys:
    - "$(cat "$WORK/id_operator.pub")"
laptop:
  hostname: laptop
  macAddress: "$LAPTOP_MAC"
  kubernetesVersion: $K8S_VERSION
  imageUpstream: "$BOOTSTRAP_URL/"
  # Machines emulated without KVM start an API server minutes slower than real ones.
  controlPlaneTimeout: 1800
EOF

netns_up
add_tap tap0
add_tap tap1
cat > "$WORK/lan-dnsmasq.conf" <<EOF
port=0
interface=br0
bind-interfaces
no-ping
dhcp-range=$SUBNET_PREFIX.0,static,255.255.255.0,1h
dhcp-host=$LAPTOP_MAC,$LAPTOP_IP,laptop
dhcp-leasefile=$WORK/lan-dnsmasq.leases
EOF
start_in_srv lan-dhcp dnsmasq -C "$WORK/lan-dnsmasq.conf" --keep-in-foreground \
    --user=root --group=root --log-dhcp --log-facility=- >/dev/null
BOOTSTRAP_PID=$(start_in_srv bootstrap env RUST_LOG=info,netboot=debug "$PROVISIONER" imageserver --dir "$ART" \
    --listen "$SRV_IP:$BOOTSTRAP_PORT" --bootstrap --config "$WORK/provisioner.yaml")
wait_for -p "$BOOTSTRAP_PID" 30 grep -q "imageserver ready" "$WORK/bootstrap.log" || log "no bootstrap imageserver within 30 s"
check "bootstrap imageserver serves the laptop's user-data rendered by the product" bash -c \
    "ip netns exec '$NS_SRV' curl -fsS '$BOOTSTRAP_URL/nocloud/laptop/user-data' \
     | cmp -s - <('$PROVISIONER' cloud-config laptop --config '$WORK/provisioner.yaml')"
step_done "configuration, namespace, LAN DHCP and bootstrap imageserver"

# --- the laptop ---------------------------------------------------------------------------------
# laptop CMD...: CMD on the laptop over SSH, as the operator (exported: checks run it in bash -c).
# ssh hands the words to the laptop's shell, which parses them again: keep ( ) ? " out of them.
laptop() {
    ip netns exec "$NS_SRV" ssh -i "$WORK/id_operator" -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=10 -o BatchMode=yes \
        "debian@$LAPTOP_IP" "$@"
}
kubectl() { laptop sudo kubectl "$@"; }
export -f laptop kubectl
export NS_SRV WORK LAPTOP_IP
NO_FLOPPY=(-global isa-fdc.fdtypeA=none -global isa-fdc.fdtypeB=none)
QEMU_MEM=3072 qemu_start laptop seabios "$LAPTOP_MAC" tap0 -smp 2 "${NO_FLOPPY[@]}" \
    -drive "file=$WORK/laptop.raw,if=none,id=d0,format=raw,cache=unsafe" -device virtio-blk-pci,drive=d0,bootindex=0 \
    -smbios "type=1,serial=ds=nocloud-net;s=$BOOTSTRAP_URL/nocloud/laptop/"
LAPTOP_T0=$QEMU_T0
mark laptop_on "$LAPTOP_T0"

# While kubeadm init runs: sample, over SSH, whether admin.conf exists and whether netboot runs.
: > "$WORK/trigger-samples"
(
    while kill -0 "$QEMU_PID" 2>/dev/null && [ ! -e "$WORK/stop-sampling" ]; do
        laptop 'printf "%s %s\n" "$(test -e /etc/kubernetes/admin.conf && echo admin.conf || echo no-admin.conf)" "$(systemctl is-active netboot.service)"' \
            >> "$WORK/trigger-samples" 2>/dev/null || true
        sleep 3
    done
) &
SAMPLER=$!
_PIDS+=("$SAMPLER")
if qemu_wait laptop "$LAPTOP_DONE" "$LAPTOP_TIMEOUT"; then
    pass "laptop: cloud-init ran the product's cloud-config to its end (${QEMU_ELAPSED}s after power-on)"
else
    fail "laptop: the cloud-config did not finish within ${LAPTOP_TIMEOUT}s"
    qemu_tail laptop 80 >&2
    finish
fi
touch "$WORK/stop-sampling"
wait "$SAMPLER" 2>/dev/null || true
LAPTOP_SERIAL=$(qemu_serial laptop)
check "laptop: the seed came from the bootstrap imageserver" grep -q 'nocloud/laptop/user-data' "$WORK/bootstrap.log"
check "laptop: kubeadm init succeeded" grep -aq 'Your Kubernetes control-plane has initialized successfully' "$LAPTOP_SERIAL"
mark kubeadm_init "$(awk -v a="$LAPTOP_T0" -v b="$(qemu_time_of laptop 'control-plane has initialized successfully')" 'BEGIN{printf "%.3f", a+b}')"
log "trigger samples (admin.conf, netboot): $(sort "$WORK/trigger-samples" | uniq -c | tr -s ' ' | tr '\n' ';')"
check "laptop: netboot was inactive whenever admin.conf did not exist yet (sampled over SSH)" bash -c \
    "grep -q '^no-admin.conf ' '$WORK/trigger-samples' && ! grep -q '^no-admin.conf active' '$WORK/trigger-samples'"
# The journal, read on the laptop: netboot's first record after admin.conf's creation.
times=$(laptop 'sudo sh -c "stat -c %Y /etc/kubernetes/admin.conf; journalctl -o json -u netboot.service | head -n 1"' || true)
check "laptop: netboot's first journal record comes after admin.conf was written" python3 -c '
import json, sys
lines = sys.argv[1].splitlines()
created = int(lines[0]); first = json.loads(lines[1])["__REALTIME_TIMESTAMP"]
sys.exit(0 if int(first) / 1e6 >= created else 1)' "$times"
# The files the configuration names are the image's: check-config where they are.
laptop sudo provisioner check-config --config /etc/provisioner/provisioner.yaml > "$WORK/check-config.txt" 2>&1 || true
sed 's/^/    /' "$WORK/check-config.txt" >&2
check "laptop: provisioner check-config accepts the operator's configuration on the image" \
    laptop sudo provisioner check-config --config /etc/provisioner/provisioner.yaml
if wait_for -i 5 300 laptop systemctl is-active --quiet netboot.service; then
    pass "laptop: netboot.path started netboot"
else
    fail "laptop: netboot did not become active"
fi
mark netboot_active
check "laptop: netboot took the kubeconfig by LoadCredential= and applied the Machine CRD" \
    wait_for -i 5 300 kubectl get crd machines.provisioner.dev
laptop systemctl status --no-pager -n 5 netboot.service >&2 || true
step_done "laptop: power-on to kubeadm init and netboot"

# --- the operator applies node2's Machine --------------------------------------------------------
MACHINES=$WORK write_machine node2 "$NODE_MAC" "$NODE_IP" "hostname: node2"
check "operator: kubectl apply -f node2.yaml on the laptop" bash -c "kubectl apply -f - < '$WORK/node2.yaml'"
wait_for -i 5 120 bash -c "laptop sudo kubectl get machine node2 -o jsonpath={.status.phase} | grep -q Pending" ||
    log "node2 not served (Pending) within 120 s"
kubectl get machines >&2 || true

# --- node2: PXE, imaging, reboot from its disk, kubeadm join -----------------------------------
disk_args=(-drive "file=$WORK/node2.raw,if=none,id=d0,format=raw,cache=unsafe" -device virtio-blk-pci,drive=d0,bootindex=2)
QEMU_MEM=2048 qemu_start node2-imaging seabios "$NODE_MAC" tap1 -smp 2 "${NO_FLOPPY[@]}" "${disk_args[@]}"
NODE_T0=$QEMU_T0
mark node2_on "$NODE_T0"
if qemu_wait node2-imaging 'imaged; rebooting' "$NODE_TIMEOUT"; then
    pass "node2: stage2 imaged the disk (${QEMU_ELAPSED}s after power-on)"
else
    fail "node2: stage2 did not finish imaging within ${NODE_TIMEOUT}s"
    qemu_tail node2-imaging 40 >&2
    finish
fi
mark node2_imaged "$(awk -v a="$NODE_T0" -v b="$QEMU_ELAPSED" 'BEGIN{printf "%.3f", a+b}')"
wait_for 60 not alive "$QEMU_PID" || true
qemu_stop node2-imaging
check "node2: stage2 verified the sha256" grep -aq 'sha256 verified' "$(qemu_serial node2-imaging)"
check "the laptop's imageserver fetched the image from the bootstrap imageserver (pull-through)" \
    grep -aqE "peer=$LAPTOP_IP:[0-9]+ method=GET path=/image\\.raw\\.zst status=200" "$WORK/bootstrap.log"
step_done "node2: PXE boot and imaging"

QEMU_MEM=2048 qemu_start node2 seabios "$NODE_MAC" tap1 -smp 2 "${NO_FLOPPY[@]}" "${disk_args[@]}"
NODE2_T0=$QEMU_T0
mark node2_disk "$NODE2_T0"
if qemu_wait node2 "$NODE_DONE" "$NODE_TIMEOUT"; then
    pass "node2: booted its disk and ran its user-data (${QEMU_ELAPSED}s after power-on)"
else
    fail "node2: its user-data did not finish within ${NODE_TIMEOUT}s"
    qemu_tail node2 60 >&2
fi
NODE_SERIAL=$(qemu_serial node2)
check "node2: kubeadm join succeeded" grep -aq 'This node has joined the cluster' "$NODE_SERIAL"
t=$(qemu_time_of node2 'This node has joined the cluster') && mark node2_joined "$(awk -v a="$NODE2_T0" -v b="$t" 'BEGIN{printf "%.3f", a+b}')"
if wait_for -i 5 "$NODE_TIMEOUT" bash -c \
    "laptop sudo kubectl get node node2 --no-headers | awk '{print \$2}' | grep -qx Ready"; then
    pass "node2: Node Ready"
else
    fail "node2: Node not Ready within ${NODE_TIMEOUT}s"
fi
mark node2_ready
step_done "node2: boot from disk, kubeadm join, Node Ready"

# --- the cluster, as the operator sees it ------------------------------------------------------
kubectl get nodes -o wide >&2 || true
check "kubectl get nodes: laptop and node2 Ready" bash -c \
    "[ \"\$(laptop sudo kubectl get nodes --no-headers | awk '\$2 == \"Ready\" {print \$1}' | sort | tr '\n' ' ')\" = 'laptop node2 ' ]"
wait_for -i 5 300 bash -c \
    "laptop sudo kubectl get machine node2 -o jsonpath={.status.phase} | grep -qx Ready" ||
    log "Machine node2 not Ready within 300 s"
kubectl get machines -o wide > "$WORK/machines.txt" 2>&1 || true
cat "$WORK/machines.txt" >&2
check "kubectl get machines: node2 Ready with its MAC/IP columns" bash -c \
    "awk '\$1 == \"node2\"' '$WORK/machines.txt' | grep -q 'Ready' && grep -q 'PHASE' '$WORK/machines.txt'"
check "the bootstrap token Secret of node2 is gone" wait_for -i 5 120 bash -c \
    "[ -z \"\$(laptop sudo kubectl -n kube-system get secrets -l provisioner.dev/machine=node2 -o name)\" ]"
check "netboot served node2's user-data exactly once" bash -c \
    "[ \"\$(laptop sudo journalctl -u netboot.service -o cat MACHINE=node2 | grep -c 'user-data with kubeadm join served')\" = 1 ]"

# A Pod pinned to node2 with the image's pause image: Running with an address of node2's range.
cat > "$WORK/pod.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: pause-on-node2
  namespace: default
spec:
  nodeName: node2
  containers:
    - name: pause
      image: registry.k8s.io/pause:3.10
      imagePullPolicy: Never
EOF
laptop sudo kubectl apply -f - < "$WORK/pod.yaml" >&2 || true
if wait_for -i 5 600 bash -c \
    "laptop sudo kubectl get pod pause-on-node2 -o jsonpath={.status.phase} | grep -qx Running"; then
    pass "a pause Pod pinned to node2 is Running"
else
    fail "the pause Pod on node2 is not Running"
    kubectl describe pod pause-on-node2 >&2 || true
fi
POD_IP=$(kubectl get pod pause-on-node2 -o jsonpath={.status.podIP} || true)
NODE2_RANGE=$(kubectl get node node2 -o jsonpath={.spec.podCIDR} || true)
log "pod IP $POD_IP, node2's pod range $NODE2_RANGE"
check "the Pod's address $POD_IP is in node2's pod range $NODE2_RANGE" python3 -c \
    'import ipaddress,sys; sys.exit(0 if ipaddress.ip_address(sys.argv[1]) in ipaddress.ip_network(sys.argv[2]) else 1)' \
    "$POD_IP" "$NODE2_RANGE"
check "the laptop routes node2's pod range via node2 (provisioner pod-network)" bash -c \
    "laptop ip route show proto 112 | grep -q '^$NODE2_RANGE via $NODE_IP '"
check "the laptop reaches the Pod on node2 (ping)" laptop ping -c 2 -W 5 "$POD_IP"
# What an operator reads on the laptop: the journal's phase records of node2 (one MESSAGE_ID per
# phase), D-Bus, and systemctl status.
laptop sudo journalctl -u netboot.service -o json MACHINE=node2 > "$WORK/node2.journal" 2>/dev/null || true
PHASES=$(journal_phases "$WORK/node2.journal")
log "node2's phase records in netboot's journal: $PHASES"
check "journal: node2 went PXEBooting → Imaging → Imaged → Joining → Ready, one record each with its MESSAGE_ID" \
    bash -c "echo '$PHASES' | grep -qE '(^| )PXEBooting Imaging Imaged Joining Ready\$'"
check "D-Bus: busctl shows node2's phase Ready" bash -c \
    "laptop busctl get-property dev.provisioner.Netboot1 /dev/provisioner/Netboot1/machine/node2 dev.provisioner.Netboot1.Machine Phase | grep -qx 's \"Ready\"'"
laptop systemctl status --no-pager -n 0 netboot.service provisioner-pod-network.service > "$WORK/status.txt" 2>&1 || true
cat "$WORK/status.txt" >&2
check "systemctl status: netboot's STATUS= and the pod network's" bash -c \
    "grep -q 'Status: \"serving 1 machine' '$WORK/status.txt' && grep -q 'Status: \"node laptop: pods in ' '$WORK/status.txt'"
step_done "checks on the cluster"

if [ "${KEEP_VMS:-0}" = 1 ]; then
    log "KEEP_VMS=1: the VMs run on; ssh from the namespace: ip netns exec $NS_SRV ssh -i $WORK/id_operator debian@$LAPTOP_IP (Ctrl-C ends)"
    KEEP_WORK=1
    while sleep 3600; do :; done
fi
qemu_stop node2
qemu_stop laptop

# --- times ---------------------------------------------------------------------------------------
at() { echo "${AT[$1]:-?}"; }
log "times (seconds since the test started):"
log "  $(at image_built)  image ready (${IMAGE_S}s: build or cache)"
log "  $(at laptop_on)  laptop powered on"
log "  $(at kubeadm_init)  laptop: kubeadm init done"
log "  $(at netboot_active)  laptop: netboot active (seen over SSH)"
log "  $(at node2_on)  node2 powered on (PXE)"
log "  $(at node2_imaged)  node2: Imaged (stage2 done)"
log "  $(at node2_disk)  node2 powered on again (disk)"
log "  $(at node2_joined)  node2: kubeadm join done"
log "  $(at node2_ready)  node2: Node Ready"
echo "CLUSTER-FLOW total_seconds=$(since) image_seconds=$IMAGE_S laptop_to_init=$(awk -v a="$(at laptop_on)" -v b="$(at kubeadm_init)" 'BEGIN{printf "%.1f", b-a}') node2_power_on_to_ready=$(awk -v a="$(at node2_on)" -v b="$(at node2_ready)" 'BEGIN{printf "%.1f", b-a}') image_zstd_bytes=$ZST_SIZE"
finish

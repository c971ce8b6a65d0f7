#!/bin/bash
# netboot under a real systemd: a Debian bookworm rootfs booted with `systemd-nspawn -b` inside
# the test's server namespace (bridge br0), with our build installed as a package would install
# it (units, D-Bus policy and activation file, sysusers and tmpfiles entries; the binary
# bind-mounted read-only), netboot.path enabled and a folder inventory with one machine.
# Shows: before the trigger file nothing starts netboot (not a DHCP packet, not D-Bus); after it
# netboot starts, `systemctl status` shows STATUS=; a DHCP client in another namespace gets its
# reservation from the sockets systemd bound; `journalctl -u netboot MACHINE=` and busctl show
# the machine; D-Bus activation starts a stopped netboot; after a reboot netboot is back.
#
# The rootfs is the debian-test image's (image-builder/build.sh --rootfs-only: mmdebstrap from
# the host's apt sources; ROOTFS=minimal: a bare mmdebstrap tree with systemd and dbus), cached
# in $PROVISIONER_TEST_CACHE (default /var/tmp/provisioner-test-cache), keyed by what it is built
# from; each run boots it through an overlay, so the cached tree is never changed, and installs
# the current units and binary over the image's own.
# Packages: systemd-container (systemd-nspawn), mmdebstrap, busybox-static.
TEST_NAME=nspawn
. "$(dirname "$0")/lib.sh"

for tool in systemd-nspawn mmdebstrap busybox nsenter; do
    command -v "$tool" >/dev/null || { echo "FAIL $TEST_NAME: $tool missing (tests/install-deps.sh)"; exit 1; }
done
[ -x "$PROVISIONER" ] || { echo "FAIL $TEST_NAME: $PROVISIONER not built (cargo build -p agent)"; exit 1; }

CACHE=${PROVISIONER_TEST_CACHE:-/var/tmp/provisioner-test-cache}
MAC=52:54:00:5e:00:20
MACHINE_IP=$SUBNET_PREFIX.20
NAME=dev.provisioner.Netboot1
OBJ=/dev/provisioner/Netboot1
started=$(date +%s.%N)
elapsed() { awk -v s="$started" -v n="$(date +%s.%N)" 'BEGIN {printf "%.1f", n - s}'; }

# --- the rootfs, built once -----------------------------------------------------------------
# The debian-test image's rootfs (image-builder/build.sh --rootfs-only), keyed by the builder and
# its profile; ROOTFS=minimal (or no image builder) takes a bare mmdebstrap tree instead.
ROOTFS=${ROOTFS:-debian-test}
[ -x "$REPO/image-builder/build.sh" ] || ROOTFS=minimal
if [ -n "${ROOTFS_DIR:-}" ]; then
    # A rootfs built earlier in the same run (run-all.sh: image-build.sh's debian-kubeadm).
    [ -x "$ROOTFS_DIR/usr/lib/systemd/systemd" ] || { fail "ROOTFS_DIR=$ROOTFS_DIR holds a rootfs"; finish; }
    BASE=$ROOTFS_DIR
    ROOTFS="given (ROOTFS_DIR)"
elif [ "$ROOTFS" = debian-test ]; then
    key=$(cat "$REPO/image-builder/build.sh" "$REPO"/image-builder/profiles/debian-test.conf \
        "$REPO"/image-builder/provisioner.yaml 2>/dev/null | sha256sum | cut -c1-16)
    BUILT=$CACHE/debian-test-$key
    BASE=$BUILT/rootfs
    if [ ! -f "$BUILT/complete" ]; then
        log "building the debian-test rootfs in $BUILT (image-builder/build.sh --rootfs-only)"
        rm -rf "$BUILT"
        mkdir -p "$BUILT"
        "$REPO/image-builder/build.sh" --profile debian-test --rootfs-only --out "$BUILT" \
            --apt-cache "${IMAGE_APT_CACHE:-/var/tmp/pv-image-apt-cache}" \
            --provisioner "$PROVISIONER" >"$CACHE/debian-test-$key.log" 2>&1 \
            || { tail -20 "$CACHE/debian-test-$key.log"; fail "image-builder/build.sh --rootfs-only (log: $CACHE/debian-test-$key.log)"; finish; }
        touch "$BUILT/complete"
        log "rootfs built at $(elapsed)s: $(du -sh "$BASE" | cut -f1)"
    fi
else
    SUITE=bookworm
    PACKAGES=systemd,systemd-sysv,dbus,udev,iproute2
    key=$(printf '%s\n' "$SUITE" apt "$PACKAGES" | sha256sum | cut -c1-16)
    BASE=$CACHE/rootfs-$SUITE-$key
    if [ ! -x "$BASE/usr/lib/systemd/systemd" ]; then
        # The host's own apt sources for this suite: no mirror is named here.
        sources=()
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] && grep -qw "$SUITE" "$f" && sources+=("$f")
        done
        [ ${#sources[@]} -gt 0 ] || { echo "FAIL $TEST_NAME: no apt source for $SUITE on this host"; exit 1; }
        log "building the $SUITE rootfs in $BASE (mmdebstrap, from ${sources[*]})"
        mkdir -p "$CACHE"
        rm -rf "$BASE.tmp"
        mmdebstrap --quiet --variant=apt --include="$PACKAGES" "$SUITE" "$BASE.tmp" "${sources[@]}"
        mv "$BASE.tmp" "$BASE"
        log "rootfs built at $(elapsed)s: $(du -sh "$BASE" | cut -f1)"
    fi
fi
log "booting the $ROOTFS rootfs $BASE"

# --- an overlay over the cached tree, our files installed into it ------------------------------
ROOT=$WORK/root
mkdir -p "$WORK"/{upper,overlay-work,root}
mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$WORK/upper,workdir=$WORK/overlay-work" "$ROOT"
NSPAWN_PID=
CONTAINER_PID=
stop_container() {
    [ -n "$NSPAWN_PID" ] || return 0
    if kill -0 "$NSPAWN_PID" 2>/dev/null; then
        # SIGRTMIN+4 asks the container's systemd to power off (what machinectl poweroff does).
        [ -n "$CONTAINER_PID" ] && kill -RTMIN+4 "$CONTAINER_PID" 2>/dev/null
        wait_for 15 not alive "$NSPAWN_PID" || { kill "$NSPAWN_PID" 2>/dev/null; wait_for 30 not alive "$NSPAWN_PID"; } || true
    fi
    stop_pid "$NSPAWN_PID"
    NSPAWN_PID=
    CONTAINER_PID=
}
nspawn_cleanup() {
    stop_container
    umount "$ROOT" 2>/dev/null || umount -l "$ROOT" 2>/dev/null || true
    cleanup
}
trap nspawn_cleanup EXIT
trap 'exit 130' INT TERM PIPE HUP

install -D -m 0644 -t "$ROOT/usr/lib/systemd/system" \
    "$REPO"/units/netboot.path "$REPO"/units/netboot.service "$REPO"/units/netboot-*.socket
install -D -m 0644 "$REPO/units/dev.provisioner.Netboot1.conf" "$ROOT/usr/share/dbus-1/system.d/dev.provisioner.Netboot1.conf"
install -D -m 0644 "$REPO/units/dev.provisioner.Netboot1.service" "$ROOT/usr/share/dbus-1/system-services/dev.provisioner.Netboot1.service"
install -D -m 0644 "$REPO/units/provisioner.sysusers.conf" "$ROOT/usr/lib/sysusers.d/provisioner.conf"
install -D -m 0644 "$REPO/units/provisioner.tmpfiles.conf" "$ROOT/usr/lib/tmpfiles.d/provisioner.conf"
: > "$ROOT/usr/bin/provisioner"   # mount point for the binary (bind-mounted read-only)
chmod 0755 "$ROOT/usr/bin/provisioner"
# The image enables netboot.path itself; undone here to show what `systemctl enable netboot`
# (what an operator types) enables: its path unit (Also=) and nothing else.
systemctl --root="$ROOT" disable netboot.path >/dev/null 2>&1 || true
systemctl --root="$ROOT" enable netboot.service >/dev/null 2>&1
# The image's cloud-init has no datasource here (the two-VM test gives it one).
[ -d "$ROOT/etc/cloud" ] && touch "$ROOT/etc/cloud/cloud-init.disabled"
# A kubeadm image's container runtime and Kubernetes units are for the VMs of
# tests/cluster-flow.sh; in a container they would only slow the boot down.
for unit in containerd.service kubelet.service provisioner-kubernetes-images.service provisioner-pod-network.path; do
    [ -e "$ROOT/usr/lib/systemd/system/$unit" ] || [ -e "$ROOT/lib/systemd/system/$unit" ] || continue
    systemctl --root="$ROOT" mask "$unit" >/dev/null 2>&1 || true
done
check "systemctl enable netboot enables netboot.path only" bash -c "
    [ -L '$ROOT/etc/systemd/system/multi-user.target.wants/netboot.path' ] &&
    ! ls '$ROOT'/etc/systemd/system/*.wants/ | grep -Eq '^netboot(\.service|-.*\.socket)$'"

stub_boot_files "$ROOT/srv/provisioner/boot" undionly.kpxe snponly.efi vmlinuz initrd.img
MACHINES=$ROOT/etc/provisioner/machines write_machine node2 "$MAC" "$MACHINE_IP" "hostname: node2"
# Paths inside the container; the listen addresses are the units' (socket activation).
write_config "$ROOT/etc/provisioner/provisioner.yaml" "listen:" \
    "bootFiles: {ipxeDir: /srv/provisioner/boot, assetsDir: /srv/provisioner/boot}" \
    "inventory: {directory: /etc/provisioner/machines}"
echo nspawn-seed > "$ROOT/etc/hostname"

# --- boot -------------------------------------------------------------------------------------
netns_up
client=$(add_client nsp "$MAC")

boot_container() {
    # --register=no --keep-unit: no machined or host system bus is needed; the network is the
    # test's server namespace only.
    systemd-nspawn --quiet --boot --directory="$ROOT" --register=no --keep-unit \
        --network-namespace-path="/run/netns/$NS_SRV" \
        --bind-ro="$PROVISIONER:/usr/bin/provisioner" \
        --console=read-only >>"$WORK/console.log" 2>&1 &
    NSPAWN_PID=$!
    track_pid "$NSPAWN_PID" systemd-nspawn
    CONTAINER_PID=
    wait_for 10 container_pid1 || true
    [ -n "$CONTAINER_PID" ] || { fail "container PID 1 found"; return 1; }
    wait_for 30 test -S "/proc/$CONTAINER_PID/root/run/systemd/private" || true
    local state
    state=$(in_container timeout 60 systemctl is-system-running --wait 2>&1) || true
    log "container booted at $(elapsed)s: $state"
    [ "$state" = running ] || in_container systemctl --failed --no-pager --plain >&2 || true
}
# container_pid1: sets CONTAINER_PID once nspawn's child has executed systemd (the container's
# PID 1); not in $(...), since wait_for runs it in this shell.
container_pid1() {
    local pid
    for pid in $(ps -o pid= --ppid "$NSPAWN_PID"); do
        if [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == */systemd ]]; then
            CONTAINER_PID=$pid
            return 0
        fi
    done
    return 1
}
in_container() { nsenter --target "$CONTAINER_PID" --mount --uts --ipc --net --pid -- "$@"; }
is_state() { [ "$(in_container systemctl is-active "$1")" = "$2" ]; }
dhcp_lease() {  # prints the address udhcpc got in the client namespace, nothing if none
    ip netns exec "$client" busybox udhcpc -i eth0 -q -n -f -t "${1:-5}" -T 1 -s "$WORK/udhcpc.sh" >/dev/null 2>&1 || true
    cat "$WORK/lease" 2>/dev/null
    rm -f "$WORK/lease"
}
cat > "$WORK/udhcpc.sh" <<EOF2
#!/bin/sh
[ "\$1" = bound ] && echo "\$ip" > "$WORK/lease"
exit 0
EOF2
chmod +x "$WORK/udhcpc.sh"

boot_container
check "container's systemd is running" is_state multi-user.target active
check "provisioner system user created by sysusers" in_container getent passwd provisioner
check "tmpfiles created /etc/provisioner/machines" in_container test -d /etc/provisioner/machines

# --- before the trigger -----------------------------------------------------------------------
check "netboot.path is active (waiting) before the trigger" is_state netboot.path active
check "netboot.service is inactive before the trigger" is_state netboot.service inactive
check "no DHCP socket bound before the trigger" bash -c "! ip netns exec '$NS_SRV' ss -Hlun 'sport = :67' | grep -q ."
lease=$(dhcp_lease 2)
check "a DHCP client gets nothing before the trigger (got '${lease}')" [ -z "$lease" ]
# The start is skipped by the service's condition, which is not a failure to the bus: the caller
# waits for its timeout.
in_container busctl --timeout=3 get-property "$NAME" "$OBJ" "$NAME.Manager" Summary >"$WORK/busctl-early.log" 2>&1 || true
check "D-Bus activation does not start netboot before the trigger" is_state netboot.service inactive
log "busctl before the trigger said: $(cat "$WORK/busctl-early.log")"

# --- the trigger ------------------------------------------------------------------------------
in_container mkdir -p /etc/kubernetes
in_container sh -c 'umask 077; echo "# stands for the admin kubeconfig kubeadm init writes" > /etc/kubernetes/admin.conf'
t_trigger=$(date +%s.%N)
check "netboot starts once the trigger exists" wait_for 20 is_state netboot.service active
log "netboot active $(awk -v s="$t_trigger" -v n="$(date +%s.%N)" 'BEGIN {printf "%.2f", n - s}')s after the trigger"
in_container systemctl status netboot.service --no-pager --lines=5 > "$WORK/status.txt" 2>&1 || true
printf '\n--- systemctl status netboot ---\n%s\n---\n' "$(cat "$WORK/status.txt")"
check "systemctl status shows the STATUS= summary" grep -Eq 'Status: "serving 1 machine.*DHCP' "$WORK/status.txt"
check "the sockets systemd bound are active" bash -c "
    [ \"\$(nsenter --target $CONTAINER_PID --mount --pid -- systemctl is-active netboot-dhcp.socket netboot-tftp.socket netboot-http.socket | sort -u)\" = active ]"
check "systemd passed admin.conf as the kubeconfig credential (LoadCredential=)" in_container \
    cmp /etc/kubernetes/admin.conf /run/credentials/netboot.service/kubeconfig
# netboot keeps no CAP_NET_BIND_SERVICE: port 67 is the socket PID 1 bound and passed it.
check "udp/67 is held by the container's systemd and netboot" bash -c "
    ip netns exec '$NS_SRV' ss -Hlunp 'sport = :67' | grep -q '\"systemd\",pid=$CONTAINER_PID,' &&
    ip netns exec '$NS_SRV' ss -Hlunp 'sport = :67' | grep -q '\"provisioner\"'"

# --- a DHCP client through the socket-activated service ---------------------------------------
lease=$(dhcp_lease 5)
check "udhcpc gets node2's reservation $MACHINE_IP (got '${lease}')" [ "$lease" = "$MACHINE_IP" ]
check "journalctl -u netboot MACHINE=node2 has the PXEBooting record" wait_for 10 bash -c "
    nsenter --target $CONTAINER_PID --mount --pid -- journalctl -b -u netboot MACHINE=node2 -o verbose --no-pager | grep -q 'PHASE=PXEBooting'"
in_container journalctl -b -u netboot MACHINE=node2 --no-pager -o cat > "$WORK/journal.txt" 2>&1 || true
printf -- '--- journalctl -u netboot MACHINE=node2 ---\n%s\n---\n' "$(cat "$WORK/journal.txt")"
check "every record of MACHINE=node2 is node2's" bash -c "
    nsenter --target $CONTAINER_PID --mount --pid -- journalctl -b -u netboot MACHINE=node2 -o verbose --no-pager | grep '^ *MACHINE=' | sort -u | grep -qx ' *MACHINE=node2'"

# --- D-Bus ------------------------------------------------------------------------------------
bus_checks() {  # WHEN
    in_container busctl tree "$NAME" > "$WORK/tree" 2>&1 || true
    check "busctl tree shows node2 ($1)" grep -q "$OBJ/machine/node2" "$WORK/tree"
    in_container busctl introspect "$NAME" "$OBJ/machine/node2" > "$WORK/introspect" 2>&1 || true
    check "busctl introspect shows node2's address and phase ($1)" bash -c "
        grep -Eq '^\.IpAddress +property +s +\"$MACHINE_IP\"' '$WORK/introspect' &&
        grep -Eq '^\.Phase +property +s +\"PXEBooting\"' '$WORK/introspect'"
    check "busctl get-property MacAddress ($1)" [ "$(in_container busctl get-property "$NAME" "$OBJ/machine/node2" "$NAME.Machine" MacAddress)" = "s \"$MAC\"" ]
}
bus_checks "started by netboot.path"

# Stopped (the path unit too, or it would start netboot again at once), then a call to the
# name: dbus-daemon asks systemd to start netboot.service.
in_container systemctl stop netboot.path netboot.service
check "netboot stopped" is_state netboot.service inactive
check "its sockets stopped with it (PartOf=)" is_state netboot-dhcp.socket inactive
summary=$(in_container busctl get-property "$NAME" "$OBJ" "$NAME.Manager" Summary 2>&1) || true
log "busctl get-property Summary on the stopped name: $summary"
check "D-Bus activation started netboot" is_state netboot.service active
check "and the answer came from it: $summary" bash -c "[[ '$summary' == *'1 machine'* ]]"
check "the state file kept the phase across the restart" bash -c "
    [ \"\$(nsenter --target $CONTAINER_PID --mount --pid -- busctl get-property $NAME $OBJ/machine/node2 $NAME.Machine Phase)\" = 's \"PXEBooting\"' ]"
bus_checks "started by D-Bus activation"
check "D-Bus activation is in the journal" bash -c "
    nsenter --target $CONTAINER_PID --mount --pid -- journalctl -b -u dbus --no-pager | grep -q \"Activating via systemd: service name='$NAME'\""

# --- reboot: netboot comes back by itself ------------------------------------------------------
stop_container
log "container powered off at $(elapsed)s; booting it again"
boot_container
check "after a reboot netboot is active again (netboot.path enabled)" wait_for 20 is_state netboot.service active
lease=$(dhcp_lease 5)
check "and serves node2 again (got '${lease}')" [ "$lease" = "$MACHINE_IP" ]
stop_container
log "total $(elapsed)s"
finish

#!/bin/bash
# The systemd units as systemd reads them: `systemd-analyze verify` is clean for every unit in
# units/ (ExecStart pointed at the binary we built, since it is not installed on this host), also
# with the example trigger drop-ins of units/examples/trigger/ applied; `systemd-analyze security
# --offline` rates netboot.service, imageserver.service and provisioner-pod-network.service (the
# full tables are printed, so the remaining exposures are visible in the CI log); the sysusers
# and tmpfiles entries apply to an empty root; netboot.path is the only netboot unit with an
# [Install] target; netboot.service and imageserver.service set LimitNOFILE=, MemoryMax= and
# TasksMax= consistent with the HTTP connection cap and the runtime's threads (netboot's: and a
# thread per TFTP transfer), and rate exposure
# 1.5 or lower (provisioner-pod-network.service: 2.0 or lower).
TEST_NAME=units
. "$(dirname "$0")/lib.sh"

mkdir -p "$WORK/units"
cp "$REPO"/units/*.socket "$REPO"/units/*.service "$REPO"/units/*.path "$WORK/units/"
# D-Bus activation files share the .service suffix but are not systemd units.
rm -f "$WORK"/units/dev.provisioner.*.service
sed -i "s|/usr/bin/provisioner|$PROVISIONER|g" "$WORK"/units/*
verify() {  # DESCRIPTION DIR
    local out
    out=$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no "$2"/*.socket "$2"/*.service "$2"/*.path 2>&1) || true
    [ -n "$out" ] && log "systemd-analyze verify said:"$'\n'"$out"
    check "systemd-analyze verify is clean for $1" [ -z "$out" ]
}
verify "$(cd "$WORK/units" && echo *)" "$WORK/units"

# The drop-ins are read from <unit>.d/ beside the unit files.
cp -r "$WORK/units" "$WORK/units-trigger"
cp -r "$REPO"/units/examples/trigger/*.d "$WORK/units-trigger/"
verify "the units with the example trigger drop-ins" "$WORK/units-trigger"
dump=$(SYSTEMD_LOG_LEVEL=debug systemd-analyze verify --man=no "$WORK/units-trigger/netboot.path" 2>&1 || true)
check "the example drop-in moves netboot.path's trigger" grep -q 'PathExists: /etc/provisioner/enabled' <<<"$dump"
check "and leaves only the new path" bash -c '! grep -q "PathExists: /etc/kubernetes/admin.conf" <<<"$1"' _ "$dump"

cp -r "$WORK/units" "$WORK/units-upstream"
cp -r "$REPO"/units/examples/imageserver-upstream/*.d "$WORK/units-upstream/"
sed -i "s|/usr/bin/provisioner|$PROVISIONER|g" "$WORK"/units-upstream/*.d/*.conf
verify "the units with the example pull-through drop-in" "$WORK/units-upstream"
dump=$(SYSTEMD_LOG_LEVEL=debug systemd-analyze verify --man=no "$WORK/units-upstream/imageserver.service" 2>&1 || true)
check "imageserver has a directory of its own, outside netboot's private state" \
    grep -qx 'StateDirectory=provisioner-images' "$REPO/units/imageserver.service"

check "netboot.path is wanted by multi-user.target" grep -qx 'WantedBy=multi-user.target' "$REPO/units/netboot.path"
for unit in netboot.service netboot-dhcp.socket netboot-tftp.socket netboot-http.socket; do
    check "$unit is started only through netboot.path (no WantedBy=)" bash -c "! grep -q '^WantedBy=' '$REPO/units/$unit'"
done
check "netboot-dhcp.socket listens on the DHCP port and the PXE boot-server port (proxy mode)" bash -c "
    grep -qx 'ListenDatagram=0.0.0.0:67' '$REPO/units/netboot-dhcp.socket' &&
    grep -qx 'ListenDatagram=0.0.0.0:4011' '$REPO/units/netboot-dhcp.socket'"
check "netboot.path and netboot.service name the same trigger" bash -c "
    [ \"\$(sed -n 's/^PathExists=//p' '$REPO/units/netboot.path')\" = \"\$(sed -n 's/^ConditionPathExists=//p' '$REPO/units/netboot.service')\" ]"

mkdir -p "$WORK/sysroot/etc"
check "sysusers entry creates the provisioner user" bash -c "
    systemd-sysusers --root='$WORK/sysroot' '$REPO/units/provisioner.sysusers.conf' &&
    grep -q '^provisioner:' '$WORK/sysroot/etc/passwd'"
check "tmpfiles entry creates /etc/provisioner/machines" bash -c "
    systemd-tmpfiles --root='$WORK/sysroot' --create '$REPO/units/provisioner.tmpfiles.conf' &&
    [ -d '$WORK/sysroot/etc/provisioner/machines' ]"

# Resource limits, consistent with what the code allows itself: HTTP lowers its connection
# cap to (LimitNOFILE - 256) / 2, so the default cap must fit; the runtime's threads
# (agent/src/main.rs) must fit TasksMax=; MemoryMax= must be set (tests/attack.sh measures
# the RSS under attack against a bound below it).
unit_value() { sed -n "s/^$2=//p" "$REPO/units/$1" | tail -1; }
const() { sed -n "s/.*const $2: usize = \([0-9]*\);.*/\1/p" "$REPO/$1"; }
http_cap=$(sed -n 's/^    maxConnections: \([0-9]*\)$/\1/p' "$REPO/provisioner.yaml.example")
imageserver_cap=$("$PROVISIONER" imageserver --help 2>/dev/null | sed -n '/--max-connections <MAX_CONNECTIONS>/,/default:/s/.*\[default: \([0-9]*\)\].*/\1/p' | head -1)
threads=$(( $(const agent/src/main.rs MAX_WORKER_THREADS) + $(const agent/src/main.rs MAX_BLOCKING_THREADS) ))
# netboot also runs each TFTP transfer on a thread of its own (netboot/src/tftp.rs).
tftp_transfers=$(sed -n 's/^    maxTransfers: \([0-9]*\)$/\1/p' "$REPO/provisioner.yaml.example")
log "HTTP cap netboot ${http_cap:-?}, imageserver ${imageserver_cap:-?}; runtime threads at most $threads, TFTP transfers ${tftp_transfers:-?}"
for pair in "netboot.service:${http_cap:-0}:$((threads + ${tftp_transfers:-1000}))" "imageserver.service:${imageserver_cap:-0}:$threads"; do
    IFS=: read -r unit cap unit_threads <<<"$pair"
    nofile=$(unit_value "$unit" LimitNOFILE) memmax=$(unit_value "$unit" MemoryMax) tasks=$(unit_value "$unit" TasksMax)
    log "$unit: LimitNOFILE=$nofile MemoryMax=$memmax TasksMax=$tasks"
    check "$unit LimitNOFILE=${nofile:-unset} holds $cap connections of two descriptors plus 256" \
        bash -c '[[ $1 =~ ^[0-9]+$ ]] && [ "$2" -gt 0 ] && [ $(( ($1 - 256) / 2 )) -ge "$2" ]' _ "$nofile" "$cap"
    check "$unit TasksMax=${tasks:-unset} above its $unit_threads threads (+16 for the rest)" \
        bash -c '[[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge $(( $2 + 16 )) ]' _ "$tasks" "$unit_threads"
    check "$unit MemoryMax=${memmax:-unset} set, at least 128M" \
        bash -c '[[ $1 =~ ^([0-9]+)([MG])$ ]] && { [ "${BASH_REMATCH[2]}" = G ] || [ "${BASH_REMATCH[1]}" -ge 128 ]; }' _ "$memmax"
done

# netboot and the imageserver face the provisioning LAN: 1.5 at most; the pod-network
# daemon runs on the nodes, as root for its routes: 2.0.
for pair in netboot.service:1.5 imageserver.service:1.5 provisioner-pod-network.service:2.0; do
    unit=${pair%%:*} max=${pair#*:}
    table=$(systemd-analyze security --offline=true --no-pager "$WORK/units/$unit" 2>&1) || true
    printf '%s\n' "$table" | grep -v '^✓'
    level=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$table")
    check "$unit exposure ${level:-unknown} <= $max" awk -v l="${level:-99}" -v m="$max" 'BEGIN {exit !(l <= m)}'
done
finish

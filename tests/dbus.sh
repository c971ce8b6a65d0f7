#!/bin/bash
# Machine status on D-Bus: provisioner netboot on a private system bus (dbus-daemon with the
# stock system policy and our units/dev.provisioner.Netboot1.conf included), read with busctl
# as root and as an unprivileged user; a real DHCP client (udhcpc) in a client namespace moves
# node2 from Pending to PXEBooting, which busctl monitor sees as PropertiesChanged; a restart
# resumes from the state file; a machine removed from the folder leaves the bus. `provisioner
# status` shows machines in several phases (restored from a state file) as busctl sees them, as
# root and unprivileged, `status --watch` prints a phase change, and without netboot on the bus
# status says so (exit 1) without activating it.
TEST_NAME=dbus
. "$(dirname "$0")/lib.sh"

netns_up
MAC=52:54:00:cc:00:02
mkdir -p "$WORK/assets"
stub_boot_files "$WORK/assets" undionly.kpxe snponly.efi vmlinuz initrd.img
write_machine node2 "$MAC" "$SUBNET_PREFIX.20"
write_machine node-3 52:54:00:cc:00:03 "$SUBNET_PREFIX.21"
write_config "$WORK/provisioner.yaml" "stateFile: $WORK/state.yaml"

. "$REPO/tests/lib-dbus.sh"
dbus_private_start
BUS=(busctl --address="$DBUS_SYSTEM_BUS_ADDRESS")
NAME=dev.provisioner.Netboot1
ROOT=/dev/provisioner/Netboot1
M=dev.provisioner.Netboot1.Machine
check "dbus-daemon accepts our policy and activation file" "${BUS[@]}" status org.freedesktop.DBus >/dev/null
check "the name is activatable (system-service file parsed)" bash -c "${BUS[*]} list --activatable --no-legend | grep -q '^$NAME '"

start_netboot() {
    local pid
    pid=$(start_in_srv netboot "$PROVISIONER" netboot --config "$WORK/provisioner.yaml")
    wait_for -p "$pid" 15 grep -q "publishing machine status on D-Bus" "$WORK/netboot.log" || true
}
start_netboot
check "netboot owns $NAME" grep -q "publishing machine status on D-Bus" "$WORK/netboot.log"

"${BUS[@]}" tree "$NAME" > "$WORK/tree" 2>&1 || true
check "busctl tree lists both machines (names escaped)" bash -c "grep -q '$ROOT/machine/node2' '$WORK/tree' && grep -q '$ROOT/machine/node_2d3' '$WORK/tree'"
"${BUS[@]}" introspect "$NAME" "$ROOT/machine/node2" > "$WORK/introspect" 2>&1 || true
check "introspect shows the Machine interface with its values" bash -c "grep -q '^$M ' '$WORK/introspect' && grep -Eq '^\.Phase +property +s +\"Pending\"' '$WORK/introspect' && grep -Eq '^\.IpAddress +property +s +\"$SUBNET_PREFIX.20\"' '$WORK/introspect'"
check "get-property MacAddress" [ "$("${BUS[@]}" get-property "$NAME" "$ROOT/machine/node2" "$M" MacAddress)" = "s \"$MAC\"" ]
check "manager counts: Total 2, Pending 2" [ "$("${BUS[@]}" get-property "$NAME" "$ROOT" dev.provisioner.Netboot1.Manager Total Pending | tr '\n' ' ')" = "u 2 u 2 " ]
check "manager summary" [ "$("${BUS[@]}" get-property "$NAME" "$ROOT" dev.provisioner.Netboot1.Manager Summary)" = 's "2 machines: 2 pending"' ]

# Anyone may read; nobody else may own the name or change anything.
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
check "an unprivileged user reads properties" [ "$(as_nobody "${BUS[@]}" get-property "$NAME" "$ROOT/machine/node2" "$M" Phase)" = 's "Pending"' ]
check "an unprivileged user lists managed objects" bash -c "$(declare -f as_nobody); as_nobody ${BUS[*]} call $NAME / org.freedesktop.DBus.ObjectManager GetManagedObjects | grep -q node2"
check "an unprivileged user may not take the name" bash -c "$(declare -f as_nobody); as_nobody ${BUS[*]} call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus RequestName su $NAME 4 2>&1 | grep -qi 'denied'"
check "properties are read-only" bash -c "! ${BUS[*]} set-property $NAME $ROOT/machine/node2 $M Phase s Ready 2>/dev/null"

# A real PXE client's DHCP moves node2 to PXEBooting: one PropertiesChanged on its object.
check "busctl monitor is registered" \
    dbus_monitor monitor "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',path='$ROOT/machine/node2'"
client=$(add_client dbus "$MAC")
ip netns exec "$client" busybox udhcpc -i eth0 -q -n -f -t 5 -T 1 -s /bin/true >/dev/null 2>&1 || true
check "busctl monitor sees PropertiesChanged with Phase PXEBooting" \
    wait_for 10 bash -c "grep -A3 'STRING \"Phase\"' '$WORK/monitor.log' | grep -q 'STRING \"PXEBooting\"'"
check "get-property Phase is PXEBooting" [ "$("${BUS[@]}" get-property "$NAME" "$ROOT/machine/node2" "$M" Phase)" = 's "PXEBooting"' ]
check "LastSeen is set" bash -c "[ \"\$(${BUS[*]} get-property $NAME $ROOT/machine/node2 $M LastSeen | cut -d' ' -f2)\" -gt 0 ]"
check "node-3 is still Pending" [ "$("${BUS[@]}" get-property "$NAME" "$ROOT/machine/node_2d3" "$M" Phase)" = 's "Pending"' ]
# The manager's counts, the state file and the log follow the machine's change on their own.
counts() { [ "$("${BUS[@]}" get-property "$NAME" "$ROOT" dev.provisioner.Netboot1.Manager PXEBooting Pending | tr '\n' ' ')" = "$1" ]; }
check "manager counts follow: PXEBooting 1, Pending 1" wait_for 10 counts "u 1 u 1 "
check "the phase change is in the state file" wait_for 10 bash -c "grep -A2 '^  node2:' '$WORK/state.yaml' | grep -q 'phase: PXEBooting'"
check "the phase change is logged with its MESSAGE_ID field" wait_for 10 grep -q 'message_id="\?826dbd54d3004b2b81ecf7e0233863f1.*phase="\?PXEBooting' "$WORK/netboot.log"

# A restart resumes from the state file.
stop_pid "$(cat "$WORK/netboot.pid")"
start_netboot
check "after a restart node2 is still PXEBooting" \
    wait_for 10 bash -c "[ \"\$(${BUS[*]} get-property $NAME $ROOT/machine/node2 $M Phase)\" = 's \"PXEBooting\"' ]"

# Inventory changes add and remove objects.
check "busctl monitor of the object manager is registered" \
    dbus_monitor om "type='signal',interface='org.freedesktop.DBus.ObjectManager'"
rm "$WORK/machines/node-3.yaml"
check "a removed machine leaves the bus (InterfacesRemoved)" wait_for 10 grep -q "InterfacesRemoved" "$WORK/om.log"
check "busctl tree no longer lists it" bash -c "! ${BUS[*]} tree $NAME | grep -q node_2d3"

# provisioner status: machines in several phases (a state file written while netboot is stopped,
# restored on start).
stop_pid "$(cat "$WORK/netboot.pid")"
write_machine node4 52:54:00:cc:00:04 "$SUBNET_PREFIX.24"
write_machine node5 52:54:00:cc:00:05 "$SUBNET_PREFIX.25"
write_machine node6 52:54:00:cc:00:06 "$SUBNET_PREFIX.26"
write_machine node7 52:54:00:cc:00:07 "$SUBNET_PREFIX.27"
NOW_USEC=$(($(date +%s) * 1000000))
cat > "$WORK/state.yaml" <<EOF2
machines:
  node2: {macAddress: "$MAC", phase: Imaged, progress: 100, message: imaged, lastSeenUsec: $((NOW_USEC - 3600000000))}
  node4: {macAddress: "52:54:00:cc:00:04", phase: Imaging, progress: 42, message: "writing the image, 12.0 MiB/s", lastSeenUsec: $((NOW_USEC - 5000000))}
  node5: {macAddress: "52:54:00:cc:00:05", phase: Failed, progress: 0, message: "imaging failed: sha256 mismatch", lastSeenUsec: $((NOW_USEC - 120000000))}
  node6: {macAddress: "52:54:00:cc:00:06", phase: Ready, progress: 100, message: "node node6 is Ready", lastSeenUsec: $((NOW_USEC - 86400000000 * 2))}
EOF2
start_netboot
check "node4 is back in Imaging on the bus" \
    wait_for 10 bash -c "[ \"\$(${BUS[*]} get-property $NAME $ROOT/machine/node4 $M Phase)\" = 's \"Imaging\"' ]"
if "$PROVISIONER" status > "$WORK/status.out" 2> "$WORK/status.err"; then code=0; else code=$?; fi
check "provisioner status exits 0 (got $code)" [ "$code" = 0 ]
log "provisioner status:"; sed 's/^/    /' "$WORK/status.out" >&2
SUMMARY=$("${BUS[@]}" get-property "$NAME" "$ROOT" dev.provisioner.Netboot1.Manager Summary | sed 's/^s "//; s/"$//')
check "status: the first line is netboot's summary ($SUMMARY)" [ "$(head -n 1 "$WORK/status.out")" = "$SUMMARY" ]
check "status: a header line" grep -Eq '^NAME +PHASE +PROGRESS +MAC +IP +LAST SEEN +MESSAGE$' "$WORK/status.out"
check "status: node2 Imaged 100%, seen an hour ago" grep -Eq "^node2 +Imaged +100% +$MAC +$SUBNET_PREFIX.20 +1h ago +imaged$" "$WORK/status.out"
check "status: node4 Imaging 42% with its message" grep -Eq "^node4 +Imaging +42% +52:54:00:cc:00:04 +$SUBNET_PREFIX.24 +[0-9]+s ago +writing the image, 12.0 MiB/s$" "$WORK/status.out"
check "status: node5 Failed with the reason" grep -Eq "^node5 +Failed +0% +52:54:00:cc:00:05 +$SUBNET_PREFIX.25 +2m ago +imaging failed: sha256 mismatch$" "$WORK/status.out"
check "status: node6 Ready, seen 2 days ago" grep -Eq "^node6 +Ready +100% +52:54:00:cc:00:06 +$SUBNET_PREFIX.26 +2d ago +node node6 is Ready$" "$WORK/status.out"
check "status: node7 Pending, never seen" grep -Eq "^node7 +Pending +0% +52:54:00:cc:00:07 +$SUBNET_PREFIX.27 +never" "$WORK/status.out"
check "status: one line per machine on the bus" [ "$(grep -c '^node' "$WORK/status.out")" = "$("${BUS[@]}" tree --list "$NAME" | grep -c "$ROOT/machine/")" ]
check "status: an unprivileged user reads the same machines" bash -c "$(declare -f as_nobody); as_nobody $PROVISIONER status | grep -c '^node' | grep -qx 5"

# --watch prints the next view when node7 does DHCP.
"$PROVISIONER" status --watch > "$WORK/watch.out" 2>&1 &
watch_pid=$!
track_pid "$watch_pid" status-watch
check "status --watch prints the machines" wait_for 10 grep -q '^node7 .*Pending' "$WORK/watch.out"
client7=$(add_client dbus7 52:54:00:cc:00:07)
ip netns exec "$client7" busybox udhcpc -i eth0 -q -n -f -t 5 -T 1 -s /bin/true >/dev/null 2>&1 || true
check "status --watch prints node7's phase change (PXEBooting)" wait_for 10 grep -Eq '^node7 +PXEBooting' "$WORK/watch.out"
check "status --watch stamps each view" [ "$(grep -c '^--- ' "$WORK/watch.out")" -ge 2 ]
stop_pid "$watch_pid"

# Without netboot on the bus: says so, exit 1, and does not activate it.
stop_pid "$(cat "$WORK/netboot.pid")"
if "$PROVISIONER" status > "$WORK/status-none.out" 2>&1; then code=0; else code=$?; fi
check "status without netboot exits 1 (got $code)" [ "$code" = 1 ]
check "and says netboot is not on the bus" grep -q "$NAME is not on the system bus" "$WORK/status-none.out"

# Without a bus netboot still serves.
stop_pid "$(cat "$WORK/netboot.pid")"
DBUS_SYSTEM_BUS_ADDRESS=unix:path=$WORK/no-such-bus start_in_srv netboot "$PROVISIONER" netboot --config "$WORK/provisioner.yaml" >/dev/null
check "without a bus netboot still becomes ready" wait_for 10 grep -q "netboot ready" "$WORK/netboot.log"
check "and says D-Bus is unavailable, in one line that says it is harmless" \
    wait_for 10 bash -c "[ \$(grep -c 'not on D-Bus' '$WORK/netboot.log') = 1 ] && grep 'not on D-Bus' '$WORK/netboot.log' | grep -q 'no system bus at unix:path=$WORK/no-such-bus.*harmless'"
finish

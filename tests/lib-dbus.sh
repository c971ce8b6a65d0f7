# A private system bus for tests (sourced after tests/lib.sh): dbus-daemon with Debian's default
# system policy, our policy (units/dev.provisioner.Netboot1.conf) and activation file, listening
# on a socket in $WORK. `dbus_private_start` exports DBUS_SYSTEM_BUS_ADDRESS; cleanup stops it.

dbus_private_start() {
    mkdir -p "$WORK/services"
    cp "$REPO/units/dev.provisioner.Netboot1.service" "$WORK/services/"
    cat > "$WORK/bus.conf" <<EOF2
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$WORK/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <servicedir>$WORK/services</servicedir>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>$REPO/units/dev.provisioner.Netboot1.conf</include>
</busconfig>
EOF2
    chmod 755 "$WORK"   # the unprivileged reader must reach the socket
    dbus-daemon --nofork --config-file="$WORK/bus.conf" >"$WORK/dbus-daemon.log" 2>&1 &
    track_pid $! dbus-daemon
    wait_for 10 test -S "$WORK/system_bus_socket" || log "dbus-daemon: no socket after 10 s"
    export DBUS_SYSTEM_BUS_ADDRESS=unix:path=$WORK/system_bus_socket
}

# dbus_monitor NAME MATCH: `busctl monitor` of the private bus in the background, its output in
# $WORK/NAME.log; returns once the monitor is registered with the bus (so no later signal is
# missed).
dbus_monitor() {
    busctl --address="$DBUS_SYSTEM_BUS_ADDRESS" monitor --match="$2" >"$WORK/$1.log" 2>&1 &
    track_pid $! "$1"
    wait_for 10 grep -q "Monitoring bus message stream" "$WORK/$1.log"
}

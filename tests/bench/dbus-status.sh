#!/bin/bash
# 1000 machines (N) in the YAML folder: resident memory of `provisioner netboot` with its D-Bus
# objects published on a private system bus, and the time from a phase change (a DHCP DISCOVER
# for a Pending machine) to the PropertiesChanged signal (COUNT of them, 20 ms apart). Bounded.
#   N=1000 COUNT=200 PROVISIONER=target/release/provisioner
TEST_NAME=dbus-bench
. "$(dirname "$0")/../lib.sh"
. "$REPO/tests/lib-dbus.sh"
N=${N:-1000}
COUNT=${COUNT:-200}

netns_up
in_srv ip addr add 10.77.0.1/21 dev br0
mkdir -p "$WORK/assets"
stub_boot_files "$WORK/assets" undionly.kpxe snponly.efi vmlinuz initrd.img
for i in $(seq 1 "$N"); do
    write_machine "$(printf m%04d "$i")" "$(printf 52:54:02:00:%02x:%02x $((i / 256)) $((i % 256)))" \
        "10.77.$((1 + i / 250)).$((i % 250 + 2))"
done
write_config "$WORK/provisioner.yaml" "subnet: 10.77.0.0/21" "stateFile: $WORK/state.yaml"
dbus_private_start
start=$(date +%s.%N)
pid=$(start_in_srv netboot env RUST_LOG=warn "$PROVISIONER" netboot --config "$WORK/provisioner.yaml")
all_published() {
    busctl --address="$DBUS_SYSTEM_BUS_ADDRESS" get-property dev.provisioner.Netboot1 /dev/provisioner/Netboot1 \
        dev.provisioner.Netboot1.Manager Total | grep -qx "u $N"
}
check "all $N machines on D-Bus" wait_for -p "$pid" 30 all_published
printf 'netboot with %d machines published on D-Bus after %.1f s\n' "$N" "$(echo "$(date +%s.%N) - $start" | awk '{print $1 - $3}')"
sleep 2
rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
printf 'resident memory with %d machines: %.1f MiB (target < 50 MiB)\n' "$N" "$(awk -v k="$rss" 'BEGIN {print k / 1024}')"

client=$(add_client dbb)
ip netns exec "$client" ip addr add 10.77.7.250/21 dev eth0
check "phase change to D-Bus signal for $COUNT machines" \
    ip netns exec "$client" python3 "$REPO/tests/bench/dbus-latency.py" "$DBUS_SYSTEM_BUS_ADDRESS" eth0 "$COUNT" 52:54:02 m%04d
rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
printf 'resident memory after %d phase changes: %.1f MiB\n' "$COUNT" "$(awk -v k="$rss" 'BEGIN {print k / 1024}')"
finish

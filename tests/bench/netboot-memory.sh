#!/bin/bash
# Idle resident memory of `provisioner netboot` serving N machines (default 100) from the YAML
# folder inventory, inside a private network namespace. Prints VmRSS and VmHWM; target < 20 MiB.
#   N=100  PROVISIONER=target/release/provisioner (default: the debug build)
TEST_NAME=netboot-mem
. "$(dirname "$0")/../lib.sh"
N=${N:-100}

netns_up
mkdir -p "$WORK/assets"
stub_boot_files "$WORK/assets" vmlinuz initrd.img
for i in $(seq 1 "$N"); do
    write_machine "node$i" "$(printf 52:54:01:00:%02x:%02x $((i / 256)) $((i % 256)))" "10.77.$((1 + i / 250)).$((i % 250 + 2))"
done
write_config "$WORK/provisioner.yaml" "subnet: 10.77.0.0/16" \
    "bootFiles: {ipxeDir: /usr/lib/ipxe, assetsDir: $WORK/assets}"
in_srv ip addr add 10.77.0.1/16 dev br0 2>/dev/null || true
pid=$(start_in_srv netboot "$PROVISIONER" netboot --config "$WORK/provisioner.yaml")
wait_for -p "$pid" 10 grep -q "netboot ready" "$WORK/netboot.log" || true
grep -q "serving $N machine" "$WORK/netboot.log" || { cat "$WORK/netboot.log" >&2; fail "netboot did not load $N machines"; finish; }
sleep 3
rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")
threads=$(awk '/^Threads/ {print $2}' "/proc/$pid/status")
printf 'netboot idle with %d machines (%s): VmRSS %.1f MiB, peak %.1f MiB, %d threads (target < 20 MiB)\n' \
    "$N" "$(basename "$PROVISIONER")$( [[ $PROVISIONER == *release* ]] && echo ' release' || echo ' debug')" \
    "$(awk -v k="$rss" 'BEGIN {print k / 1024}')" "$(awk -v k="$hwm" 'BEGIN {print k / 1024}')" "$threads"
check "idle RSS under 20 MiB" [ "$rss" -lt $((20 * 1024)) ]
finish

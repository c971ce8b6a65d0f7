#!/bin/bash
# Journald output: when stderr is the journal stream systemd gave it (JOURNAL_STREAM matches
# stderr's device:inode), provisioner netboot logs native journal records with MACHINE=, MAC=,
# IP= fields and the right PRIORITY. A listener stands in for journald's socket inside a private
# mount namespace (a tmpfs over /run), so the host's journal is never touched; a real DHCP client
# in a client namespace makes netboot log a reply for the machine.
TEST_NAME=journald
. "$(dirname "$0")/lib.sh"

netns_up
MAC=52:54:00:bb:00:02
mkdir -p "$WORK/assets"
stub_boot_files "$WORK/assets" undionly.kpxe snponly.efi vmlinuz initrd.img
write_machine node2 "$MAC" "$SUBNET_PREFIX.20"
write_config "$WORK/provisioner.yaml"

# Inside the server namespace and a private mount namespace: journald's socket path is ours.
# The listener and netboot write their PIDs; both are stopped by PID.
cat > "$WORK/inner.sh" <<EOF2
set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal
python3 "$REPO/tests/journal-listener.py" /run/systemd/journal/socket "$WORK/journal.txt" 60 &
echo \$! > "$WORK/listener.pid"
for _ in \$(seq 1 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.1; done
exec 2>"$WORK/stderr.log"
export JOURNAL_STREAM=\$(stat -L -c '%d:%i' /proc/self/fd/2)
echo \$\$ > "$WORK/netboot.pid"
exec "$PROVISIONER" netboot --config "$WORK/provisioner.yaml"
EOF2
ip netns exec "$NS_SRV" unshare --mount --propagation private bash "$WORK/inner.sh" &
wait_for 10 test -s "$WORK/netboot.pid" || true
for name in listener netboot; do
    [ -s "$WORK/$name.pid" ] && track_pid "$(cat "$WORK/$name.pid")" "$name"
done
check "records reach the journal socket" wait_for 10 grep -q "netboot ready" "$WORK/journal.txt"

client=$(add_client jrn "$MAC")
printf '#!/bin/sh\nexit 0\n' > "$WORK/udhcpc.script"; chmod +x "$WORK/udhcpc.script"
ip netns exec "$client" busybox udhcpc -i eth0 -q -n -f -t 5 -T 1 -s "$WORK/udhcpc.script" >/dev/null 2>&1 || true
# The records checked below: the ACK's, and the phase change the exchange caused.
ack_and_phase() {
    [ -n "$(awk -v RS= '/DHCP reply sent/ && /REPLY=Ack/' "$WORK/journal.txt")" ] &&
        grep -q "^PHASE=PXEBooting$" "$WORK/journal.txt"
}
wait_for 10 ack_and_phase || true
stop_pid "$(cat "$WORK/netboot.pid")"

# The record of the ACK, as a block of FIELD=value lines.
record=$(awk -v RS= '/DHCP reply sent/ && /REPLY=Ack/' "$WORK/journal.txt" | head -n 40)
log "record: $(tr '\n' ' ' <<<"$record")"
check "MACHINE field, no prefix" grep -qx "MACHINE=node2" <<<"$record"
check "MAC field" grep -qx "MAC=$MAC" <<<"$record"
check "IP field" grep -qx "IP=$SUBNET_PREFIX.20" <<<"$record"
check "INFO is priority 6" grep -qx "PRIORITY=6" <<<"$record"
check "syslog identifier" grep -qx "SYSLOG_IDENTIFIER=provisioner" <<<"$record"
# The phase change the DHCP exchange caused: one record with the fixed MESSAGE_ID of PXEBooting.
phase=$(awk -v RS= '/PHASE=PXEBooting/' "$WORK/journal.txt")
# The documented id (README's table), so docs and records cannot drift apart.
id=$(grep '^| PXEBooting |' "$REPO/README.md" | grep -o '[0-9a-f]\{32\}' | head -n 1)
check "phase change record with PXEBooting's MESSAGE_ID" grep -qx "MESSAGE_ID=${id:-none}" <<<"$phase"
check "phase change record names the machine" grep -qx "MACHINE=node2" <<<"$phase"
check "nothing on stderr while the journal is used" bash -c "! grep -q 'DHCP reply sent' '$WORK/stderr.log'"
finish

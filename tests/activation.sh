#!/bin/bash
# Socket activation: provisioner netboot serves DHCP, TFTP and HTTP on sockets it inherits
# (LISTEN_FDS/LISTEN_FDNAMES), not on the listen addresses of its config, which here point at
# ports nothing talks to. Real clients (udhcpc, tftp-hpa, curl) in a client namespace.
TEST_NAME=activation
. "$(dirname "$0")/lib.sh"

netns_up
MAC=52:54:00:aa:00:02
mkdir -p "$WORK"/{assets,ipxe}
head -c 100000 /dev/urandom > "$WORK/ipxe/undionly.kpxe"
echo kernel > "$WORK/assets/vmlinuz"; echo initrd > "$WORK/assets/initrd.img"
stub_boot_files "$WORK/ipxe" snponly.efi
write_machine node2 "$MAC" "$SUBNET_PREFIX.20"
write_config "$WORK/provisioner.yaml" "interface:" "gateway: $SRV_IP" "dnsServers: [$SRV_IP]" \
    "bootFiles: {ipxeDir: $WORK/ipxe, assetsDir: $WORK/assets}" \
    'listen: {dhcp: "127.0.0.1:1067", tftp: "127.0.0.1:1069", http: "127.0.0.1:1080"}'

start_in_srv netboot "$REPO/tests/activate.py" dhcp=udp:0.0.0.0:67 tftp=udp:0.0.0.0:69 http=tcp:0.0.0.0:80 \
    -- "$PROVISIONER" netboot --config "$WORK/provisioner.yaml" >/dev/null
wait_for 10 grep -q "netboot ready" "$WORK/netboot.log" || true
check "daemon reports ready on inherited sockets" grep -q "activated=true" "$WORK/netboot.log"
check "nothing bound on the config's own ports" bash -c "! ip netns exec $NS_SRV ss -lnu | grep -q ':1067 '"

client=$(add_client act "$MAC")
cat > "$WORK/udhcpc.script" <<'EOF2'
#!/bin/sh
[ "$1" = bound ] && echo "ip=$ip" >> "$LEASE_FILE"
exit 0
EOF2
chmod +x "$WORK/udhcpc.script"
LEASE_FILE=$WORK/lease ip netns exec "$client" busybox udhcpc -i eth0 -q -n -f -t 5 -T 1 -s "$WORK/udhcpc.script" >/dev/null 2>&1 || true
check "DHCP on the inherited :67 gives the reservation" grep -qx "ip=$SUBNET_PREFIX.20" "$WORK/lease"
ip netns exec "$client" ip addr add "$SUBNET_PREFIX.20/24" dev eth0
(cd "$WORK" && ip netns exec "$client" tftp -m binary "$SRV_IP" -c get undionly.kpxe got.kpxe) || true
check "TFTP on the inherited :69 serves the file" cmp -s "$WORK/ipxe/undionly.kpxe" "$WORK/got.kpxe"
code=$(ip netns exec "$client" curl -s -o "$WORK/script" -w '%{http_code}' "http://$SRV_IP/ipxe/${MAC//:/-}" || true)
check "HTTP on the inherited :80 serves the iPXE script" [ "$code" = 200 ]
check "the script boots our kernel" grep -q "http://$SRV_IP/assets/vmlinuz" "$WORK/script"
finish

#!/bin/bash
# The imaging API of `provisioner netboot`, driven with curl from a client namespace the way
# stage2 and cloud-init use it: the machine takes its lease with udhcpc, then the iPXE script of
# a machine carries stage2's orders and a token (only for its reserved address, after the ACK;
# the same token when asked again in the same DHCP cycle);
# reports with the token move the machine PXEBooting → Imaging → Imaged (state file);
# a wrong token is refused; user-data is served once; the next script boots the local disk;
# a new spec.reimage value images the machine again. Also `provisioner imageserver` serving a
# file with Range and ETag. Run as root.
TEST_NAME=imaging-api
. "$(dirname "$0")/lib.sh"

netns_up
MAC=52:54:00:ee:00:02
HMAC=52-54-00-ee-00-02
PORT=8080
BASE="http://$SRV_IP:$PORT"
SHA=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
mkdir -p "$WORK"/{assets,images}
stub_boot_files "$WORK/assets" undionly.kpxe snponly.efi vmlinuz stage2.img
manifest() { write_machine node2 "$MAC" "$SUBNET_PREFIX.20" "reimage: \"$1\""; }  # REIMAGE
manifest 1
write_config "$WORK/provisioner.yaml" "routerAdvertisements: false" \
    "boot: {kernel: vmlinuz, initrd: stage2.img, cmdline: console=ttyS0}" \
    "image: {url: \"http://$SRV_IP:8081/node.raw\", sha256: $SHA, size: 4096}" \
    "listen: {dhcp: \"0.0.0.0:67\", tftp: \"$SRV_IP:1069\", http: \"$SRV_IP:$PORT\"}" \
    "stateFile: $WORK/state.yaml"
start_in_srv netboot "$PROVISIONER" netboot --config "$WORK/provisioner.yaml" >/dev/null
check "netboot is ready" wait_for 10 grep -q "netboot ready" "$WORK/netboot.log"

add_client img "$MAC" >/dev/null; client=pv-cimg-$$
c() { ip netns exec "$client" curl -sS --max-time 10 "$@"; }
phase() { sed -n '/^  node2:/,/^  [^ ]/p' "$WORK/state.yaml" 2>/dev/null | sed -n 's/^    phase: //p'; }
phase_is() { [ "$(phase)" = "$1" ]; }
wait_phase() { wait_for 10 phase_is "$1"; }  # PHASE: the state file says so within 10 s
report() {  # TOKEN JSON: prints the status code
    c -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $1" \
        -H 'Content-Type: application/json' --data "$2" "$BASE/report/$HMAC"
}

# The reserved address set by hand, no DHCP: no token.
ip netns exec "$client" ip addr add "$SUBNET_PREFIX.20/24" dev eth0
code=$(c -o "$WORK/no-ack" -w '%{http_code}' "$BASE/ipxe/$HMAC" || true)
check "no imaging script before the machine's DHCP ACK (403, got $code)" bash -c "[ '$code' = 403 ] && grep -q 'no recent DHCP lease' '$WORK/no-ack'"
check "udhcpc takes the reserved lease" udhcpc_bind "$client"
check "the client has its reserved address" bash -c "ip netns exec '$client' ip -4 addr show eth0 | grep -q 'inet $SUBNET_PREFIX.20/'"
code=$(in_srv curl -sS --max-time 10 -o /dev/null -w '%{http_code}' "$BASE/ipxe/$HMAC" || true)
check "another address gets no imaging script after the ACK (403, got $code)" [ "$code" = 403 ]
c -o "$WORK/script" "$BASE/ipxe/$HMAC"
TOKEN=$(grep -o 'provisioner\.token=[^ ]*' "$WORK/script" | cut -d= -f2)
c -o "$WORK/script-again" "$BASE/ipxe/$HMAC"
check "a repeated request in the same DHCP cycle gets the same token" cmp -s "$WORK/script" "$WORK/script-again"
check "the imaging script boots stage2 with its orders" grep -q "^kernel $BASE/assets/vmlinuz initrd=stage2.img console=ttyS0 provisioner.url=$BASE provisioner.token=[0-9a-f]\{64\} provisioner.image=http://$SRV_IP:8081/node.raw provisioner.sha256=$SHA provisioner.image_size=4096\$" "$WORK/script"
check "the token is 64 hex digits" grep -qE '^[0-9a-f]{64}$' <<<"$TOKEN"
check "phase PXEBooting after the script" wait_phase PXEBooting
check "only the token's sha256 is in the state file" bash -c "! grep -q '$TOKEN' '$WORK/state.yaml' && grep -q \"tokenSha256: $(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)\" '$WORK/state.yaml'"

WRONG=$(printf '%064d' 7)
check "a wrong token gets 403" [ "$(report "$WRONG" '{"phase":"imaging","progress":5}')" = 403 ]
check "no token gets 401" [ "$(c -o /dev/null -w '%{http_code}' -X POST --data '{"phase":"imaged"}' "$BASE/report/$HMAC")" = 401 ]
check "bad JSON gets 400" [ "$(report "$TOKEN" '{"phase":')" = 400 ]
check "the refusal is logged" wait_for 10 grep -q 'HTTP request refused' "$WORK/netboot.log"
check "without the token" bash -c "! grep -q '$WRONG\|$TOKEN' '$WORK/netboot.log'"
check "report imaging 10% → 204" [ "$(report "$TOKEN" '{"phase":"imaging","progress":10,"rate":104857600}')" = 204 ]
check "phase Imaging" wait_phase Imaging
check "report imaging 100% → 204" [ "$(report "$TOKEN" '{"phase":"imaging","progress":100}')" = 204 ]
# (the state file batches changes that are not phase changes)
check "progress 100 in the state file" wait_for 10 bash -c "sed -n '/^  node2:/,\$p' '$WORK/state.yaml' | grep -q 'progress: 100'"
check "report imaged → 204" [ "$(report "$TOKEN" '{"phase":"imaged"}')" = 204 ]
check "phase Imaged" wait_phase Imaged
check "the phases were logged in order" wait_for 10 bash -c "grep -o 'node2 [A-Za-z]* -> [A-Za-z]*' '$WORK/netboot.log' | tr '\n' ' ' | grep -q 'node2 Pending -> PXEBooting node2 PXEBooting -> Imaging node2 Imaging -> Imaged'"

c -o "$WORK/meta-data" "$BASE/nocloud/$TOKEN/meta-data"
check "meta-data names the machine" grep -q '^local-hostname: "node2"$' "$WORK/meta-data"
code=$(c -o "$WORK/user-data" -w '%{http_code}' "$BASE/nocloud/$TOKEN/user-data")
check "user-data: first fetch 200" [ "$code" = 200 ]
check "user-data is a cloud-config for node2" bash -c "head -1 '$WORK/user-data' | grep -qx '#cloud-config' && grep -qx 'hostname: \"node2\"' '$WORK/user-data'"
check "user-data: second fetch 403" [ "$(c -o /dev/null -w '%{http_code}' "$BASE/nocloud/$TOKEN/user-data")" = 403 ]
check "the replay is recorded as the machine's message" wait_for 10 grep -Eq "message: '?user-data requested again" "$WORK/state.yaml"
check "the replay is logged as a warning" wait_for 10 grep -q 'already used token: refused' "$WORK/netboot.log"
check "the log never shows the token" bash -c "! grep -q '$TOKEN' '$WORK/netboot.log'"

c -o "$WORK/script2" "$BASE/ipxe/$HMAC"
check "an imaged machine's next script boots the local disk" bash -c "grep -q 'sanboot --no-describe --drive 0x80' '$WORK/script2' && grep -q 'iseq \${platform} efi' '$WORK/script2' && ! grep -q '^kernel' '$WORK/script2'"
check "still Imaged after the local boot script" wait_phase Imaged

# cloud-init's phone-home: the report script and its URL and token files from the served
# user-data, run in the client namespace (paths moved under $WORK/root).
/usr/bin/python3 - "$WORK/user-data" "$WORK/root" <<'PYEOF'
import os, sys, yaml
doc, root = yaml.safe_load(open(sys.argv[1])), sys.argv[2]
for f in doc["write_files"]:
    if f["path"].startswith(("/var/lib/provisioner/", "/usr/local/libexec/provisioner-report")):
        path = root + f["path"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write(f["content"].replace("/var/lib/provisioner/", root + "/var/lib/provisioner/"))
        os.chmod(path, int(f["permissions"], 8))
PYEOF
check "user-data carries the report URL of node2" grep -qx "$BASE/report/$HMAC" "$WORK/root/var/lib/provisioner/report-url"
check "cloud-init's report script reports joining" ip netns exec "$client" "$WORK/root/usr/local/libexec/provisioner-report" joining "cloud-init is configuring the node"
check "phase Joining" wait_phase Joining
check "a joining report with a wrong token gets 403" [ "$(report "$WRONG" '{"phase":"joining"}')" = 403 ]

# A new reimage value: back to Pending, old token dead, the next script images again.
manifest 2
check "spec.reimage change sends node2 back to Pending" wait_phase Pending
check "the old token is refused after the reimage request" [ "$(report "$TOKEN" '{"phase":"imaged"}')" = 403 ]
check "the machine boots from the network again: a new DHCP ACK" udhcpc_bind "$client"
c -o "$WORK/script3" "$BASE/ipxe/$HMAC"
TOKEN2=$(grep -o 'provisioner\.token=[^ ]*' "$WORK/script3" | cut -d= -f2)
check "the reimage script carries a new token" bash -c "[ -n '$TOKEN2' ] && [ '$TOKEN2' != '$TOKEN' ]"
check "phase PXEBooting again" wait_phase PXEBooting

# A restart keeps accepting the current token (only its hash was stored).
stop_pid "$(cat "$WORK/netboot.pid")"
start_in_srv netboot "$PROVISIONER" netboot --config "$WORK/provisioner.yaml" >/dev/null
check "netboot is ready again" wait_for 10 grep -q "netboot ready" "$WORK/netboot.log"
check "after a restart the current token is accepted" [ "$(report "$TOKEN2" '{"phase":"imaging","progress":3}')" = 204 ]

# The imageserver: Content-Length, Range, ETag.
head -c 3000000 /dev/urandom > "$WORK/images/node.raw"
start_in_srv imageserver "$PROVISIONER" imageserver --dir "$WORK/images" --listen "$SRV_IP:8081" >/dev/null
check "imageserver is ready" wait_for 10 grep -q "imageserver ready" "$WORK/imageserver.log"
c -o "$WORK/got" -D "$WORK/img.hdr" "http://$SRV_IP:8081/node.raw"
check "imageserver serves the image byte-exact" cmp -s "$WORK/got" "$WORK/images/node.raw"
check "imageserver sends Content-Length and ETag" bash -c "grep -qi '^content-length: 3000000' '$WORK/img.hdr' && grep -qi '^etag: \"' '$WORK/img.hdr'"
c -o "$WORK/tail" -r 2999000- "http://$SRV_IP:8081/node.raw"
check "imageserver serves a Range (resume)" cmp -s "$WORK/tail" <(tail -c 1000 "$WORK/images/node.raw")
check "imageserver lists no directory" [ "$(c -o /dev/null -w '%{http_code}' "http://$SRV_IP:8081/")" = 404 ]
finish

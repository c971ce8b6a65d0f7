#!/bin/bash
# provisioner check-config as an operator meets it, offline (no namespace, no socket): one broken
# configuration or Machine folder per mistake, each with its message and exit code 2; the
# mistakes of the configuration itself also stop `provisioner netboot` at start with exit 2 and
# the same message (before it binds anything), and imageserver's bad flags exit 2. A valid
# configuration prints what it means: per machine, what each firmware is answered and the iPXE
# script, with a Machine's own image and disk hint in its orders.
TEST_NAME=check-config
. "$(dirname "$0")/lib.sh"

SHA=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
OWN_SHA=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef

# setup DIR: a valid configuration DIR/p.yaml with its folders, files and two Machines
setup() {
    local d=$1
    rm -rf "$d"
    mkdir -p "$d"/{ipxe,assets,machines}
    stub_boot_files "$d/ipxe" undionly.kpxe snponly.efi ipxe.efi
    stub_boot_files "$d/assets" vmlinuz stage2.img
    cat > "$d/machines/node2.yaml" <<EOF
apiVersion: provisioner.dev/v1alpha1
kind: Machine
metadata: {name: node2}
spec:
  macAddress: "52:54:00:12:34:56"
  ipAddress: 10.77.0.20
  hostname: node2
EOF
    cat > "$d/machines/more.yaml" <<EOF
apiVersion: v1
kind: ConfigMap
metadata: {name: notes}
data: {rack: r1}
---
apiVersion: provisioner.dev/v1alpha1
kind: Machine
metadata: {name: node3}
spec:
  macAddress: "52:54:00:12:34:57"
  ipAddress: 10.77.0.21
  image: {url: "http://10.77.0.1:8081/own.img.zst", sha256: "$OWN_SHA", size: 1048576}
  rootDevice: {serial: DISK-B}
EOF
    cat > "$d/p.yaml" <<EOF
serverAddress: 10.77.0.1
subnet: 10.77.0.0/24
bootFiles: {ipxeDir: $d/ipxe, assetsDir: $d/assets}
boot: {kernel: vmlinuz, initrd: stage2.img, cmdline: console=ttyS0}
listen: {dhcp: "127.0.0.1:0", tftp: "127.0.0.1:0", http: "127.0.0.1:8080"}
inventory: {directory: $d/machines}
stateFile: $d/state.yaml
image: {url: "http://10.77.0.1:8081/node.img.zst", sha256: $SHA, size: 4096}
EOF
}

# run_check NAME: check-config on case NAME's configuration; sets CODE, OUT, ERR
run_check() {
    local d=$WORK/$1
    if "$PROVISIONER" check-config --config "$d/p.yaml" > "$d.out" 2> "$d.err"; then CODE=0; else CODE=$?; fi
    OUT=$d.out ERR=$d.err
}

# mistake NAME MESSAGE [netboot]: check-config exits 2 and says MESSAGE (a fixed string) on
# stderr; with "netboot", netboot exits 2 with the same message too
mistake() {
    local name=$1 message=$2 d=$WORK/$1 code
    run_check "$name"
    check "$name: check-config exits 2 (got $CODE)" [ "$CODE" = 2 ]
    if grep -qF -- "$message" "$ERR"; then
        pass "$name: check-config says: $message"
    else
        fail "$name: check-config does not say: $message"
        sed 's/^/    /' "$ERR" >&2
    fi
    if [ "${3:-}" = netboot ]; then
        if timeout 20 "$PROVISIONER" netboot --config "$d/p.yaml" > "$d.netboot" 2>&1; then code=0; else code=$?; fi
        check "$name: netboot exits 2 at start (got $code)" [ "$code" = 2 ]
        check "$name: netboot says the same" grep -qF -- "$message" "$d.netboot"
        check "$name: netboot did not get as far as serving" bash -c "! grep -q 'netboot ready' '$d.netboot'"
    fi
}

# --- the valid configuration: what it means --------------------------------------------------
setup "$WORK/good"
run_check good
check "valid: exit 0 (got $CODE)" [ "$CODE" = 0 ]
check "valid: says so" grep -qx "$WORK/good/p.yaml is valid" "$OUT"
check "valid: the ConfigMap is a warning, not an error" grep -qF "warning: $WORK/good/machines/more.yaml, document 1 (notes): kind ConfigMap, skipped" "$ERR"
check "valid: no error" bash -c "! grep -q '^error' '$ERR'"
log "check-config says:"; sed 's/^/    /' "$OUT" >&2
check "valid: server and subnet" grep -qx "server 10.77.0.1 on subnet 10.77.0.0/24" "$OUT"
check "valid: two machines served" grep -qF "inventory: folder $WORK/good/machines, 2 machine(s) served" "$OUT"
check "valid: node2's BIOS PXE gets the BIOS loader over TFTP" grep -qF "  BIOS PXE        -> TFTP undionly.kpxe  ($WORK/good/ipxe/undionly.kpxe)" "$OUT"
check "valid: UEFI PXE gets snponly.efi over TFTP" grep -qF "  UEFI PXE        -> TFTP snponly.efi  ($WORK/good/ipxe/snponly.efi)" "$OUT"
check "valid: UEFI HTTP Boot gets ipxe.efi over HTTP" grep -qF "  UEFI HTTP Boot  -> http://10.77.0.1:8080/boot/ipxe.efi  ($WORK/good/ipxe/ipxe.efi)" "$OUT"
check "valid: iPXE gets node2's script URL" grep -qF "  iPXE            -> http://10.77.0.1:8080/ipxe/52-54-00-12-34-56" "$OUT"
check "valid: node2's script boots stage2 with the configured image, the token a placeholder" grep -qF \
    "      kernel http://10.77.0.1:8080/assets/vmlinuz initrd=stage2.img console=ttyS0 provisioner.url=http://10.77.0.1:8080 provisioner.token=<token> provisioner.image=http://10.77.0.1:8081/node.img.zst provisioner.sha256=$SHA provisioner.image_size=4096" "$OUT"
check "valid: node3's script has its own image and its disk hint" grep -qF \
    "provisioner.image=http://10.77.0.1:8081/own.img.zst provisioner.sha256=$OWN_SHA provisioner.image_size=1048576 provisioner.disk.serial=DISK-B" "$OUT"
check "valid: node3 is said to be imaged with its own image, on the disk of serial DISK-B" grep -qF \
    "imaged with its own spec.image: http://10.77.0.1:8081/own.img.zst (sha256 $OWN_SHA, 1048576 bytes); disk: the one matching serial=\"DISK-B\"" "$OUT"
check "valid: and once imaged, the local disk" grep -qF "    once imaged: the local disk" "$OUT"
check "valid: stand-alone DHCP by default, with what it hands out" grep -qF \
    "DHCP: stand-alone server: each Machine gets its spec.ipAddress with the mask of 10.77.0.0/24, a 3600 s lease" "$OUT"

# --- proxy mode: accepted, and what it means ------------------------------------------------
setup "$WORK/proxy"; echo "dhcpMode: proxy" >> "$WORK/proxy/p.yaml"
run_check proxy
check "proxy: exit 0 (got $CODE)" [ "$CODE" = 0 ]
check "proxy: says the mode and what the LAN's server must do" grep -qF \
    "DHCP: proxy beside the LAN's server: netboot gives no addresses" "$OUT"
check "proxy: names the keys it does not send" grep -qF "gateway, dnsServers and leaseTime are not sent" "$OUT"
check "proxy: lists the PXE boot-server port" grep -qF "PXE boot server 0.0.0.0:4011" "$OUT"
check "proxy: the machines' answers are the same" grep -qF "  UEFI PXE        -> TFTP snponly.efi" "$OUT"
setup "$WORK/bad-mode"; echo "dhcpMode: relay" >> "$WORK/bad-mode/p.yaml"
mistake bad-mode "unknown variant \`relay\`, expected \`standalone\` or \`proxy\`" netboot

# --- mistakes of the configuration: check-config and netboot --------------------------------
setup "$WORK/no-ipxe-dir"; rm -r "$WORK/no-ipxe-dir/ipxe"
mistake no-ipxe-dir "p.yaml: bootFiles.ipxeDir: $WORK/no-ipxe-dir/ipxe does not exist" netboot
setup "$WORK/no-bios-loader"; rm "$WORK/no-bios-loader/ipxe/undionly.kpxe"
mistake no-bios-loader "p.yaml: bootFiles.biosLoader: \"undionly.kpxe\" not found in $WORK/no-bios-loader/ipxe" netboot
setup "$WORK/no-uefi-loader"; sed -i 's/ipxeDir:/uefiLoader: ipxe.efi, ipxeDir:/' "$WORK/no-uefi-loader/p.yaml"; rm "$WORK/no-uefi-loader/ipxe/ipxe.efi"
mistake no-uefi-loader "p.yaml: bootFiles.uefiLoader: \"ipxe.efi\" not found in $WORK/no-uefi-loader/ipxe" netboot
setup "$WORK/loader-symlink"; rm "$WORK/loader-symlink/ipxe/snponly.efi"; echo efi > "$WORK/loader-symlink/snponly.efi"
ln -s "$WORK/loader-symlink/snponly.efi" "$WORK/loader-symlink/ipxe/snponly.efi"
mistake loader-symlink "p.yaml: bootFiles.uefiLoader: \"snponly.efi\" in $WORK/loader-symlink/ipxe resolves outside it (a symlink)" netboot
# Debian's iPXE folder as installed (package ipxe): its ipxe.efi is a symlink to
# /boot/ipxe.efi, which the servers serve (SYSTEM_IPXE_LOADERS); a symlink elsewhere is not.
setup "$WORK/debian-ipxe"; sed -i "s#ipxeDir: [^,]*,#ipxeDir: /usr/lib/ipxe,#" "$WORK/debian-ipxe/p.yaml"
check "debian-ipxe: /usr/lib/ipxe/ipxe.efi is a symlink to /boot/ipxe.efi here" \
    test "$(readlink /usr/lib/ipxe/ipxe.efi)" = /boot/ipxe.efi
run_check debian-ipxe
check "debian-ipxe: check-config accepts ipxeDir /usr/lib/ipxe as installed (got $CODE)" [ "$CODE" = 0 ]
check "debian-ipxe: and has nothing to say about ipxe.efi" \
    bash -c "! grep -q ipxe.efi '$ERR'"
setup "$WORK/no-assets-dir"; rm -r "$WORK/no-assets-dir/assets"
mistake no-assets-dir "p.yaml: bootFiles.assetsDir: $WORK/no-assets-dir/assets does not exist" netboot
setup "$WORK/no-kernel"; rm "$WORK/no-kernel/assets/vmlinuz"
mistake no-kernel "p.yaml: boot.kernel: \"vmlinuz\" not found in $WORK/no-kernel/assets" netboot
setup "$WORK/no-initrd"; rm "$WORK/no-initrd/assets/stage2.img"
mistake no-initrd "p.yaml: boot.initrd: \"stage2.img\" not found in $WORK/no-initrd/assets" netboot
setup "$WORK/no-inventory"; rm -r "$WORK/no-inventory/machines"
mistake no-inventory "p.yaml: inventory.directory: $WORK/no-inventory/machines does not exist" netboot
setup "$WORK/no-state-dir"; sed -i "s#stateFile: .*#stateFile: $WORK/no-state-dir/gone/state.yaml#" "$WORK/no-state-dir/p.yaml"
mistake no-state-dir "p.yaml: stateFile: its folder $WORK/no-state-dir/gone does not exist" netboot
setup "$WORK/host-bits"; sed -i 's#subnet: 10.77.0.0/24#subnet: 10.77.0.5/24#' "$WORK/host-bits/p.yaml"
mistake host-bits "p.yaml: subnet: 10.77.0.5/24 has host bits set: write the network, 10.77.0.0/24" netboot
setup "$WORK/https-image"; sed -i 's#url: "http://10.77.0.1:8081/node#url: "https://10.77.0.1:8081/node#' "$WORK/https-image/p.yaml"
mistake https-image "p.yaml: image.url: \"https://10.77.0.1:8081/node.img.zst\" must be an http:// URL" netboot
setup "$WORK/unknown-key"; echo "leaseTme: 600" >> "$WORK/unknown-key/p.yaml"
mistake unknown-key "unknown field \`leaseTme\`" netboot

# --- mistakes in the Machine folder: check-config names file, document and Machine ----------
# (netboot serves the other Machines and logs these; the folder's own tests are in Rust)
setup "$WORK/misspelt"; sed -i 's/  hostname: node2/  hostnme: node2/' "$WORK/misspelt/machines/node2.yaml"
mistake misspelt "$WORK/misspelt/machines/node2.yaml, document 1 (Machine node2): unknown field spec.hostnme"
setup "$WORK/role"; echo "  role: worker" >> "$WORK/role/machines/node2.yaml"
mistake role "$WORK/role/machines/node2.yaml, document 1 (Machine node2): unknown field spec.role"
setup "$WORK/syntax"; printf -- '---\nspec: [unclosed\n' >> "$WORK/syntax/machines/more.yaml"
mistake syntax "$WORK/syntax/machines/more.yaml, document 3: YAML syntax error, the rest of the file is not read"
setup "$WORK/outside"; sed -i 's/10.77.0.20/10.78.0.20/' "$WORK/outside/machines/node2.yaml"
mistake outside "$WORK/outside/machines/node2.yaml, document 1 (Machine node2): spec.ipAddress: 10.78.0.20 is not a host address of subnet 10.77.0.0/24"
setup "$WORK/bad-mac"; sed -i 's/"52:54:00:12:34:56"/"52-54-00-12-34-56"/' "$WORK/bad-mac/machines/node2.yaml"
mistake bad-mac "(Machine node2): spec.macAddress: \"52-54-00-12-34-56\" is not six colon-separated pairs of hex digits"
setup "$WORK/duplicate"; sed -i 's/"52:54:00:12:34:57"/"52:54:00:12:34:56"/' "$WORK/duplicate/machines/more.yaml"
mistake duplicate "$WORK/duplicate/machines/more.yaml, document 2 (Machine node3): macAddress 52:54:00:12:34:56 is also claimed by Machine node2 ($WORK/duplicate/machines/node2.yaml)"
setup "$WORK/own-https"; sed -i 's#url: "http://10.77.0.1:8081/own#url: "https://10.77.0.1:8081/own#' "$WORK/own-https/machines/more.yaml"
mistake own-https "(Machine node3): spec.image.url: \"https://10.77.0.1:8081/own.img.zst\" is not an http:// URL"
setup "$WORK/disk-hint"; sed -i 's/serial: DISK-B/serial: "disk #2"/' "$WORK/disk-hint/machines/more.yaml"
mistake disk-hint "(Machine node3): spec.rootDevice.serial: \"disk #2\" must be printable ASCII words"
setup "$WORK/no-name"; sed -i 's/metadata: {name: node2}/metadata: {labels: {a: b}}/' "$WORK/no-name/machines/node2.yaml"
mistake no-name "$WORK/no-name/machines/node2.yaml, document 1: metadata.name is missing"

# --- imageserver: bad flags exit 2 before serving --------------------------------------------
imageserver_mistake() {  # NAME MESSAGE ARGS...
    local name=$1 message=$2 code; shift 2
    if timeout 20 "$PROVISIONER" imageserver --listen 127.0.0.1:0 "$@" > "$WORK/$name.out" 2>&1; then code=0; else code=$?; fi
    check "imageserver $name: exit 2 (got $code)" [ "$code" = 2 ]
    check "imageserver $name: says: $message" grep -qF -- "$message" "$WORK/$name.out"
}
imageserver_mistake no-dir "--dir $WORK/nowhere: not a directory" --dir "$WORK/nowhere"
imageserver_mistake bad-upstream "--upstream: \"https://10.77.0.1:8000/\" is not an http://HOST:PORT/ URL" --dir "$WORK/good" --upstream https://10.77.0.1:8000/
imageserver_mistake no-laptop "no laptop: section" --dir "$WORK/good" --bootstrap --config "$WORK/good/p.yaml"
imageserver_mistake bad-seed-dir "--bootstrap $WORK/noseed: not a directory" --dir "$WORK/good" --bootstrap "$WORK/noseed"

# --- cloud-config and --help -------------------------------------------------------------------
if "$PROVISIONER" cloud-config node --config "$WORK/misspelt/p.yaml" --machine node2 > "$WORK/cc.out" 2>&1; then code=0; else code=$?; fi
check "cloud-config node of a rejected machine: exit 2 (got $code)" [ "$code" = 2 ]
check "and says why: file, document and reason" grep -qF "machine \"node2\" is not served: $WORK/misspelt/machines/node2.yaml, document 1 (Machine node2): unknown field spec.hostnme" "$WORK/cc.out"
if "$PROVISIONER" cloud-config node --config "$WORK/good/p.yaml" --machine node9 > "$WORK/cc9.out" 2>&1; then code=0; else code=$?; fi
check "cloud-config node of an unknown machine says which are served" grep -qF "no Machine named \"node9\" in the manifests of $WORK/good/machines (served: node2, node3)" "$WORK/cc9.out"
check "cloud-config node offers user-data and meta-data only" bash -c "'$PROVISIONER' cloud-config node --help | grep -q 'possible values: user-data, meta-data]'"
check "cloud-config node --file network-config is a usage error (exit 2)" bash -c "'$PROVISIONER' cloud-config node --config '$WORK/good/p.yaml' --machine node2 --file network-config >/dev/null 2>&1; [ \$? = 2 ]"
for cmd in "check-config" "cloud-config node" "cloud-config laptop" "netboot"; do
    # shellcheck disable=SC2086
    check "$cmd --help explains --config" bash -c "'$PROVISIONER' $cmd --help | grep -A1 -- '--config <CONFIG>' | grep -q 'Configuration file'"
done
check "--log-level is offered" bash -c "'$PROVISIONER' netboot --help | grep -q -- '--log-level <FILTER>'"
check "a bad --log-level is a usage error (exit 2)" bash -c "'$PROVISIONER' --log-level 'info,=[' check-config --config '$WORK/good/p.yaml' >/dev/null 2>&1; [ \$? = 2 ]"
finish

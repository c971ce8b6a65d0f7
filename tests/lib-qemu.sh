# QEMU boot helpers for the privileged end-to-end tests (sourced after tests/lib.sh and
# `netns_up`). Guests always run under TCG, inside the test's server namespace, on a tap
# enslaved to br0; their serial console goes to $WORK/<name>.serial.
#
#   qemu_kernel                      newest /boot/vmlinuz-* (prints the path)
#   qemu_mk_initrd OUT MARKER [cmdline]
#                                    busybox initramfs whose /init prints MARKER, then powers off;
#                                    with "cmdline", the kernel command line first
#   qemu_start NAME FW MAC TAP [QEMU ARGS...]
#                                    FW: seabios (pc, iPXE NIC ROM) | ovmf (q35, OVMF PXE: NIC ROM
#                                    disabled) | ovmf-ipxe-rom (q35, OVMF with QEMU's EFI iPXE ROM) |
#                                    ovmf-http (q35, OVMF's own UEFI HTTP Boot only: its PXE off);
#                                    every OVMF kind runs with the firmware's IPv6 stack off
#                                    sets QEMU_PID and QEMU_T0 (epoch seconds, fractional)
#   qemu_wait NAME REGEX TIMEOUT     waits up to TIMEOUT more seconds for REGEX on the serial
#                                    console; sets QEMU_ELAPSED (seconds from qemu_start to the
#                                    first match); 1 on timeout, or when the VM exited without it
#   qemu_stop NAME                   stops the VM (no-op if it already exited)
#   qemu_boot NAME FW MAC TAP REGEX TIMEOUT [QEMU ARGS...]
#                                    start + wait + stop; sets QEMU_ELAPSED
#   qemu_time_of NAME REGEX          seconds from QEMU start to the first serial line matching REGEX
#   qemu_serial NAME                 path of the serial log: "[  secs] line" (tests/serial-ts.py)
#   qemu_tail NAME [N]               last N lines of the serial log, for failure reports
#   qemu_line_span NAME REGEX        "START END" of the first matching serial line (slow lines)
#   ra_start                         IPv6 router advertisements on br0 (dnsmasq RA only)
#   ra_min_start                     minimal RAs (lifetime 0, no prefix) answering solicitations

OVMF_CODE=${OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
OVMF_VARS=${OVMF_VARS:-/usr/share/OVMF/OVMF_VARS_4M.fd}
QEMU_MEM=${QEMU_MEM:-512}
declare -A _QEMU_PIDS=()

qemu_kernel() {
    local k
    k=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
    [ -n "$k" ] || { log "no /boot/vmlinuz-* (install linux-image-amd64)"; return 1; }
    echo "$k"
}

qemu_mk_initrd() {
    local out=$1 marker=$2 root show=:
    if [ "${3:-}" = cmdline ]; then
        show='echo "cmdline: $(/bin/busybox cat /proc/cmdline)"'
    fi
    root=$(mktemp -d "$WORK/initrd.XXXXXX")
    mkdir -p "$root"/{bin,proc,sys,dev}
    cp /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    cat > "$root/init" <<EOF
#!/bin/sh
/bin/busybox mount -t proc proc /proc
$show
echo "$marker uptime=\$(/bin/busybox cut -d' ' -f1 /proc/uptime)"
/bin/busybox poweroff -f
EOF
    chmod +x "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
    rm -rf "$root"
}

qemu_serial() { echo "$WORK/$1.serial"; }

qemu_tail() { tail -n "${2:-15}" "$(qemu_serial "$1")" 2>/dev/null; }

qemu_start() {
    local name=$1 fw=$2 mac=$3 tap=$4; shift 4
    local nic="virtio-net-pci,netdev=n0,mac=$mac,bootindex=1" fwargs=()
    case "$fw" in
        seabios)
            # graphics=off: SeaBIOS mirrors the VGA text of SeaBIOS and iPXE onto the serial port
            fwargs=(-machine pc,graphics=off -boot n) ;;
        ovmf|ovmf-ipxe-rom|ovmf-http)
            cp "$OVMF_VARS" "$WORK/$name.vars.fd"
            fwargs=(-machine q35
                -drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE"
                -drive "if=pflash,format=raw,unit=1,file=$WORK/$name.vars.fd"
                # IPv6 off in the firmware, as an operator turns it off in a machine's setup: when
                # PXEv4 returns (netboot's `exit 1` for an imaged machine) OVMF would otherwise try
                # PXEv6 and HTTP Boot v6 before the disk, each waiting about a minute for DHCPv6,
                # which nothing here answers. PXEv4 and iPXE's own IPv6 are not affected.
                -fw_cfg name=opt/org.tianocore/IPv6Support,string=no)
            # without romfile= the "PXE" of OVMF is QEMU's EFI iPXE ROM, not EDK2's own PXE
            if [ "$fw" != ovmf-ipxe-rom ]; then nic="$nic,romfile="; fi
            # PXEv4 off too: the firmware's one network boot option left is HTTP Boot over IPv4
            if [ "$fw" = ovmf-http ]; then
                fwargs+=(-fw_cfg name=opt/org.tianocore/IPv4PXESupport,string=no)
            fi
            ;;
        *) log "qemu_start: unknown firmware $fw"; return 2 ;;
    esac
    : > "$WORK/$name.serial"
    QEMU_T0=$(date +%s.%N)
    QEMU_PID=$(start_in_srv "qemu-$name" python3 "$REPO/tests/serial-ts.py" "$WORK/$name.serial" -- \
        qemu-system-x86_64 -accel tcg -m "$QEMU_MEM" -display none -monitor none -no-reboot \
        -serial stdio "${fwargs[@]}" -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" \
        -device "$nic" "$@")
    _QEMU_PIDS[$name]=$QEMU_PID
    log "qemu $name ($fw, $mac on $tap) started, pid $QEMU_PID"
}

qemu_wait() {
    local name=$1 regex=$2 timeout=$3 pid=${_QEMU_PIDS[$1]:-}
    QEMU_ELAPSED=""
    if wait_for ${pid:+-p "$pid"} "$timeout" qemu_time_of "$name" "$regex"; then
        QEMU_ELAPSED=$(qemu_time_of "$name" "$regex")
        return 0
    fi
    if [ -n "$pid" ] && ! alive "$pid"; then
        log "qemu $name exited without /$regex/"
    else
        log "qemu $name: no /$regex/ within ${timeout}s"
    fi
    return 1
}

# qemu_time_of NAME REGEX: seconds (from QEMU start) of the first serial line matching REGEX
qemu_time_of() {
    local t
    t=$(grep -aE -m1 -- "$2" "$(qemu_serial "$1")" 2>/dev/null | sed -nE 's/^\[ *([0-9.]+)\].*/\1/p')
    [ -n "$t" ] && echo "$t"
}

qemu_stop() {
    local pid=${_QEMU_PIDS[$1]:-}
    [ -n "$pid" ] && stop_pid "$pid"
    unset "_QEMU_PIDS[$1]"
}

qemu_boot() {
    local name=$1 fw=$2 mac=$3 tap=$4 regex=$5 timeout=$6; shift 6
    qemu_start "$name" "$fw" "$mac" "$tap" "$@" || return 1
    local rc=0
    qemu_wait "$name" "$regex" "$timeout" || rc=1
    qemu_stop "$name"
    return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Boot servers for a netboot test, two interchangeable backends with the same HTTP layout
# (/ipxe/<mac-with-hyphens>, /boot/<iPXE binary>, /assets/<file>) and the same DHCP decisions:
#   provisioner  target/debug/provisioner netboot --config DIR/provisioner.yaml
#   dnsmasq      reference: dnsmasq (DHCP for known MACs only + TFTP of /usr/lib/ipxe) and
#                busybox httpd serving a copy of that layout
#
#   boot_setup DIR MARKER            DIR/assets/{vmlinuz,initrd.img} (newest /boot kernel and a
#                                    marker initrd), empty DIR/machines/
#   boot_add_machine DIR NAME MAC IP [FIELD: VALUE]...
#                                    a Machine manifest DIR/machines/NAME.yaml (hostname NAME,
#                                    the arguments add spec fields)
#   boot_write_config DIR [KEY: VALUE]...
#                                    DIR/provisioner.yaml (lib.sh's write_config: serverAddress
#                                    $SRV_IP, HTTP port $BOOT_HTTP_PORT, boot cmdline
#                                    $BOOT_CMDLINE, initrd $BOOT_INITRD; the arguments add keys)
#   backend_start BACKEND DIR        starts the servers in the server namespace and waits until
#                                    the HTTP port answers and they all still run (a server left
#                                    holding the ports fails the start); sets BACKEND_PIDS
#   backend_stop                     stops them
# Variables: BOOT_HTTP_PORT (8080), BOOT_CMDLINE ("console=ttyS0 quiet"), IPXE_DIR
# (/usr/lib/ipxe), UEFI_LOADER (snponly.efi), REF_TUNED (1: the dnsmasq backend sends IPv6 router
# advertisements and iPXE option 175.176=1, the known iPXE speed-ups; 0: plain),
# REF_DNSMASQ_EXTRA (extra dnsmasq.conf lines for the reference backend).
# ---------------------------------------------------------------------------------------------
BOOT_HTTP_PORT=${BOOT_HTTP_PORT:-8080}
BOOT_CMDLINE=${BOOT_CMDLINE:-console=ttyS0 quiet}
IPXE_DIR=${IPXE_DIR:-/usr/lib/ipxe}
UEFI_LOADER=${UEFI_LOADER:-snponly.efi}
REF_TUNED=${REF_TUNED:-1}
BACKEND_PIDS=()

boot_setup() {
    local dir=$1 marker=$2 kernel
    mkdir -p "$dir/assets" "$dir/machines"
    kernel=$(qemu_kernel)
    cp "$kernel" "$dir/assets/vmlinuz"
    qemu_mk_initrd "$dir/assets/initrd.img" "$marker"
    : > "$dir/machines.list"
    log "assets: $kernel + initrd ($(stat -c %s "$dir/assets/initrd.img") bytes) printing $marker"
}

boot_add_machine() {
    local dir=$1 name=$2 mac=$3 ip=$4; shift 4
    MACHINES=$dir/machines write_machine "$name" "$mac" "$ip" "hostname: $name" "$@"
    echo "$name $mac $ip" >> "$dir/machines.list"
}

boot_write_config() {
    local dir=$1; shift
    write_config "$dir/provisioner.yaml" "gateway: $SRV_IP" "dnsServers: [$SRV_IP]" "leaseTime: 3600" \
        "bootFiles: {ipxeDir: $IPXE_DIR, uefiLoader: $UEFI_LOADER, biosLoader: undionly.kpxe, assetsDir: $dir/assets}" \
        "boot: {kernel: vmlinuz, initrd: ${BOOT_INITRD:-initrd.img}, cmdline: \"$BOOT_CMDLINE\"}" \
        "listen: {dhcp: \"0.0.0.0:67\", tftp: \"0.0.0.0:69\", http: \"$SRV_IP:$BOOT_HTTP_PORT\"}" \
        "inventory: {directory: $dir/machines}" "$@"
}

# _ref_http_tree DIR: the HTTP layout of our server, as plain files for busybox httpd
_ref_http_tree() {
    local dir=$1 www=$1/www name mac ip base="http://$SRV_IP:$BOOT_HTTP_PORT"
    rm -rf "$www"; mkdir -p "$www/ipxe" "$www/boot" "$www/assets"
    cp "$dir"/assets/* "$www/assets/"
    cp "$IPXE_DIR/snponly.efi" "$IPXE_DIR/ipxe.efi" "$IPXE_DIR/undionly.kpxe" "$www/boot/"
    while read -r name mac ip; do
        cat > "$www/ipxe/${mac//:/-}" <<EOF
#!ipxe
# $name $mac
kernel $base/assets/vmlinuz initrd=initrd.img ${BOOT_CMDLINE//\{name\}/$name}
initrd $base/assets/initrd.img
boot
EOF
    done < "$dir/machines.list"
}

_ref_dnsmasq_conf() {
    local dir=$1 name mac ip n=0 base="http://$SRV_IP:$BOOT_HTTP_PORT"
    {
        echo "port=0"
        echo "interface=br0"
        echo "bind-interfaces"
        echo "no-ping"
        echo "dhcp-authoritative"
        echo "dhcp-leasefile=$dir/dnsmasq.leases"
        # static: answer only the MACs below, as our server answers only known machines
        echo "dhcp-range=$SUBNET_PREFIX.0,static,255.255.255.0,1h"
        echo "dhcp-option=option:router,$SRV_IP"
        echo "dhcp-option=option:dns-server,$SRV_IP"
        echo "enable-tftp"
        echo "tftp-root=$IPXE_DIR"
        echo "dhcp-userclass=set:ipxe,iPXE"
        echo "dhcp-match=set:efi64,option:client-arch,7"
        echo "dhcp-match=set:efi64,option:client-arch,9"
        echo "dhcp-match=set:bios,option:client-arch,0"
        echo "dhcp-boot=tag:!ipxe,tag:efi64,$UEFI_LOADER,,$SRV_IP"
        echo "dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe,,$SRV_IP"
        if [ "$REF_TUNED" = 1 ]; then
            echo "enable-ra"
            echo "dhcp-range=fd77::,ra-only,64"
            echo "dhcp-option=tag:ipxe,encap:175,176,1"
        fi
        # extra config lines, one per line (experiments: e.g. "dhcp-option-force=tag:efi64,60,PXEClient")
        [ -n "${REF_DNSMASQ_EXTRA:-}" ] && printf '%s\n' "$REF_DNSMASQ_EXTRA"
        while read -r name mac ip; do
            n=$((n + 1))
            echo "dhcp-host=$mac,$ip,$name,set:m$n"
            echo "dhcp-boot=tag:ipxe,tag:m$n,$base/ipxe/${mac//:/-}"
        done < "$dir/machines.list"
    } > "$dir/dnsmasq.conf"
}

# _backend_ready: every backend process still runs and the HTTP port answers
_backend_ready() {
    local p
    for p in "${BACKEND_PIDS[@]}"; do alive "$p" || return 1; done
    in_srv bash -c "exec 3<>/dev/tcp/$SRV_IP/$BOOT_HTTP_PORT" 2>/dev/null
}

backend_start() {
    local backend=$1 dir=$2 p
    BACKEND_PIDS=()
    case "$backend" in
    provisioner)
        [ -x "$PROVISIONER" ] || { log "no $PROVISIONER (cargo build -p agent)"; return 1; }
        boot_write_config "$dir"
        BACKEND_PIDS+=("$(start_in_srv provisioner env RUST_LOG="${RUST_LOG:-info}" \
            "$PROVISIONER" netboot --config "$dir/provisioner.yaml")") ;;
    dnsmasq)
        _ref_http_tree "$dir"
        _ref_dnsmasq_conf "$dir"
        rm -f "$dir/dnsmasq.leases"
        BACKEND_PIDS+=("$(start_in_srv ref-dnsmasq dnsmasq -C "$dir/dnsmasq.conf" \
            --keep-in-foreground --user=root --group=root --log-dhcp --log-facility=-)")
        BACKEND_PIDS+=("$(start_in_srv ref-httpd busybox httpd -f -v -p "$SRV_IP:$BOOT_HTTP_PORT" \
            -h "$dir/www")") ;;
    *) log "unknown backend $backend (provisioner|dnsmasq)"; return 1 ;;
    esac
    wait_for 10 _backend_ready || true
    # One that exited fails the start even when the port answers: something else holds it.
    for p in "${BACKEND_PIDS[@]}"; do
        alive "$p" || { log "backend $backend: pid $p exited"; return 1; }
    done
    _backend_ready || { log "backend $backend: HTTP port $BOOT_HTTP_PORT not listening after 10 s"; return 1; }
    log "backend $backend up (pids ${BACKEND_PIDS[*]})"
}

backend_stop() {
    local p
    for p in "${BACKEND_PIDS[@]}"; do stop_pid "$p"; done
    BACKEND_PIDS=()
}

# ra_start: IPv6 router advertisements on br0 (dnsmasq, RA only: no DHCPv4, no DNS) for
# experiments next to another DHCP server; sets RA_PID. Stop it with stop_pid "$RA_PID".
# RA_EXTRA: extra dnsmasq lines, e.g. "ra-param=br0,10,0" (router lifetime 0: not a default router).
ra_start() {
    cat > "$WORK/ra-dnsmasq.conf" <<EOF
port=0
interface=br0
bind-interfaces
enable-ra
dhcp-range=fd77::,ra-only,64
dhcp-leasefile=$WORK/ra-dnsmasq.leases
${RA_EXTRA:-}
EOF
    RA_PID=$(start_in_srv ra-dnsmasq dnsmasq -C "$WORK/ra-dnsmasq.conf" --keep-in-foreground \
        --user=root --group=root --log-facility=-)
}

# qemu_line_span NAME REGEX: "START END" seconds of the first serial line matching REGEX (START
# is when its first byte arrived, END when it was completed; equal for fast lines)
qemu_line_span() {
    grep -aE -m1 -- "$2" "$(qemu_serial "$1")" 2>/dev/null \
        | sed -nE 's/^\[ *([0-9.]+)\].*\[from ([0-9.]+)\]$/\2 \1/p; t; s/^\[ *([0-9.]+)\].*/\1 \1/p'
}

# ra_min_start: answer router solicitations on br0 with a minimal RA (router lifetime 0, no
# prefix: tests/ra-responder.py); sets RA_PID.
ra_min_start() {
    RA_PID=$(start_in_srv ra-responder python3 "$REPO/tests/ra-responder.py" br0)
}

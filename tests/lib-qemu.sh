# QEMU boot helpers for the privileged end-to-end tests (sourced after tests/lib.sh and
# `netns_up`). Guests always run under TCG, inside the test's server namespace, on a tap
# enslaved to br0; their serial console goes to $WORK/<name>.serial.
#
#   qemu_kernel                      newest /boot/vmlinuz-* (prints the path)
#   qemu_mk_initrd OUT MARKER        busybox initramfs whose /init prints MARKER, then powers off
#   qemu_start NAME FW MAC TAP [QEMU ARGS...]
#                                    FW: seabios (pc, iPXE NIC ROM) | ovmf (q35, OVMF PXE: NIC ROM
#                                    disabled) | ovmf-ipxe-rom (q35, OVMF with QEMU's EFI iPXE ROM)
#                                    sets QEMU_PID and QEMU_T0 (epoch seconds, fractional)
#   qemu_wait NAME REGEX TIMEOUT     waits for REGEX on the serial console; sets QEMU_ELAPSED
#                                    (seconds from qemu_start to the first match); 1 on timeout/exit
#   qemu_stop NAME                   stops the VM (no-op if it already exited)
#   qemu_boot NAME FW MAC TAP REGEX TIMEOUT [QEMU ARGS...]
#                                    start + wait + stop; prints the elapsed seconds
#   qemu_serial NAME                 path of the serial log
#   qemu_tail NAME [N]               last N lines of the serial log (ANSI stripped), for failures

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
    local out=$1 marker=$2 root
    root=$(mktemp -d "$WORK/initrd.XXXXXX")
    mkdir -p "$root"/{bin,proc,sys,dev}
    cp /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    cat > "$root/init" <<EOF
#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "$marker uptime=\$(/bin/busybox cut -d' ' -f1 /proc/uptime)"
/bin/busybox poweroff -f
EOF
    chmod +x "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
    rm -rf "$root"
}

qemu_serial() { echo "$WORK/$1.serial"; }

qemu_tail() {
    sed -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\r//g' "$(qemu_serial "$1")" 2>/dev/null \
        | grep -v '^\s*$' | tail -n "${2:-15}"
}

qemu_start() {
    local name=$1 fw=$2 mac=$3 tap=$4; shift 4
    local nic="virtio-net-pci,netdev=n0,mac=$mac,bootindex=1" fwargs=()
    case "$fw" in
        seabios)
            # graphics=off: SeaBIOS mirrors the VGA text of SeaBIOS and iPXE onto the serial port
            fwargs=(-machine pc,graphics=off -boot n) ;;
        ovmf|ovmf-ipxe-rom)
            cp "$OVMF_VARS" "$WORK/$name.vars.fd"
            fwargs=(-machine q35
                -drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE"
                -drive "if=pflash,format=raw,unit=1,file=$WORK/$name.vars.fd")
            # without romfile= the "PXE" of OVMF is QEMU's EFI iPXE ROM, not EDK2's own PXE
            [ "$fw" = ovmf ] && nic="$nic,romfile=" ;;
        *) log "qemu_start: unknown firmware $fw"; return 2 ;;
    esac
    : > "$WORK/$name.serial"
    QEMU_T0=$(date +%s.%N)
    QEMU_PID=$(start_in_srv "qemu-$name" qemu-system-x86_64 -accel tcg -m "$QEMU_MEM" \
        -display none -monitor none -no-reboot -serial "file:$WORK/$name.serial" \
        "${fwargs[@]}" -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" -device "$nic" "$@")
    _QEMU_PIDS[$name]=$QEMU_PID
    _PIDS+=("$QEMU_PID") # start_in_srv ran in a command substitution: register for cleanup here
    log "qemu $name ($fw, $mac on $tap) started, pid $QEMU_PID"
}

qemu_wait() {
    local name=$1 regex=$2 timeout=$3 serial pid=${_QEMU_PIDS[$1]:-}
    serial=$(qemu_serial "$name")
    QEMU_ELAPSED=""
    while :; do
        if grep -aqE "$regex" "$serial" 2>/dev/null; then
            QEMU_ELAPSED=$(awk -v a="$QEMU_T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')
            return 0
        fi
        local now
        now=$(awk -v a="$QEMU_T0" -v b="$(date +%s.%N)" 'BEGIN{print int(b-a)}')
        if [ "$now" -ge "$timeout" ]; then log "qemu $name: no /$regex/ within ${timeout}s"; return 1; fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            grep -aqE "$regex" "$serial" 2>/dev/null && continue
            log "qemu $name exited without /$regex/"; return 1
        fi
        sleep 0.1
    done
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
    [ "$rc" = 0 ] && echo "$QEMU_ELAPSED"
    return "$rc"
}

#!/bin/bash
# PXE boot chain benchmark: seconds from QEMU start to the initrd's marker on the serial console,
# with our netboot servers and with the reference (dnsmasq DHCP+TFTP and busybox httpd serving
# the same files), same run, same kernel and initrd, one VM at a time. Also splits the time into
# phases read from the serial console, to show where it goes.
#
# Variants (VARIANTS, default "provisioner provisioner+ra0 dnsmasq"):
#   provisioner     target/debug/provisioner netboot
#   provisioner+ra  the same plus IPv6 router advertisements on br0 (dnsmasq, RA only), to
#                   measure what iPXE's wait for a router advertisement costs
#   provisioner+ra0 the same with a minimal RA instead (router lifetime 0, no prefix;
#                   tests/ra-responder.py): what our server would have to send
#   dnsmasq         reference, tuned: RA + iPXE option 175.176 (no ProxyDHCP wait), no ping
#   dnsmasq-plain   reference without the RA and 175.176 speed-ups
# Paths (PATHS, default "seabios ovmf"): SeaBIOS + iPXE NIC ROM; OVMF PXE + snponly.efi.
# RUNS=1 repetitions; TIMEOUT=120 per boot. Bounded: at most RUNS x paths x variants boots.
set -euo pipefail
TEST_NAME=pxe-chain
. "$(dirname "$0")/../lib.sh"
. "$REPO/tests/lib-qemu.sh"

VARIANTS=${VARIANTS:-provisioner provisioner+ra0 dnsmasq}
PATHS=${PATHS:-seabios ovmf}
RUNS=${RUNS:-1}
TIMEOUT=${TIMEOUT:-120}
MARKER=PROVISIONER-BOOT-OK
declare -A MAC=([seabios]=52:54:00:b0:00:01 [ovmf]=52:54:00:b0:00:02)
declare -A FW=([seabios]=seabios [ovmf]=ovmf)
declare -A RESULT=() LOADED=()

netns_up
add_tap tap0
boot_setup "$WORK/boot" "$MARKER"
boot_add_machine "$WORK/boot" bench-bios "${MAC[seabios]}" "$SUBNET_PREFIX.31"
boot_add_machine "$WORK/boot" bench-uefi "${MAC[ovmf]}" "$SUBNET_PREFIX.32"

# iPXE's line for a finished download: "URL... ok", with a percentage before "ok" when the
# download took long enough for iPXE to show its progress (erased with backspaces).
DONE='\.\.\. ([0-9]+%[^[:alpha:]]*)?ok'
# phases NAME: where the time went, from the serial console
phases() {
    local n=$1 conf nbp script kern
    conf=$(qemu_line_span "$n" 'Configuring \(net0') || true
    nbp=$(qemu_time_of "$n" 'NBP file downloaded') || true
    script=$(qemu_time_of "$n" "/ipxe/[0-9a-f-]+$DONE") || true
    kern=$(qemu_time_of "$n" "vmlinuz$DONE") || true
    printf 'nbp=%s ipxe-dhcp=%s script=%s kernel=%s' "${nbp:--}" \
        "$( [ -n "$conf" ] && awk '{printf "%.2f..%.2f(%.1fs)", $1, $2, $2-$1}' <<<"$conf" || echo -)" \
        "${script:--}" "${kern:--}"
}

for run in $(seq 1 "$RUNS"); do
    for p in $PATHS; do
        for v in $VARIANTS; do
            name="$p-$v-$run"
            backend=${v%%+*}; extra_ra=0; tuned=1
            [ "$v" = provisioner+ra ] && extra_ra=1
            [ "$v" = provisioner+ra0 ] && extra_ra=min
            [ "$v" = dnsmasq-plain ] && { backend=dnsmasq; tuned=0; }
            if ! REF_TUNED=$tuned backend_start "$backend" "$WORK/boot"; then
                fail "$name: $backend did not start"; continue
            fi
            case $extra_ra in 1) ra_start ;; min) ra_min_start ;; esac
            if qemu_boot "$name" "${FW[$p]}" "${MAC[$p]}" tap0 "$MARKER" "$TIMEOUT"; then
                RESULT[$p,$v]="${RESULT[$p,$v]:-} $QEMU_ELAPSED"
                LOADED[$p,$v]="${LOADED[$p,$v]:-} $(qemu_time_of "$name" "vmlinuz$DONE" || true)"
                pass "$name: ${QEMU_ELAPSED}s  $(phases "$name")"
            else
                fail "$name: no marker within ${TIMEOUT}s"
                qemu_tail "$name" 12 >&2
            fi
            [ "$extra_ra" != 0 ] && stop_pid "$RA_PID"
            backend_stop
        done
    done
done

median() { tr ' ' '\n' | { grep . || true; } | sort -n | awk '{a[NR]=$1} END{if(NR) print a[int((NR+1)/2)]}'; }
echo
# table TITLE ARRAY-NAME
table() {
    local -n t=$2
    echo "== $1 (median of $RUNS; load $(cut -d' ' -f1-3 /proc/loadavg))"
    printf '%-8s' path; for v in $VARIANTS; do printf ' %15s' "$v"; done; printf ' %20s\n' "provisioner/dnsmasq"
    for p in $PATHS; do
        printf '%-8s' "$p"
        for v in $VARIANTS; do printf ' %15s' "$(median <<<"${t[$p,$v]:-}")"; done
        ours=$(median <<<"${t[$p,provisioner]:-}"); ref=$(median <<<"${t[$p,dnsmasq]:-}")
        if [ -n "$ours" ] && [ -n "$ref" ]; then
            printf ' %20s\n' "$(awk -v a="$ours" -v b="$ref" 'BEGIN{printf "%.2fx", a/b}')"
        else printf ' %20s\n' -; fi
    done
}
echo
table "seconds from QEMU start to $MARKER" RESULT
# the kernel's own boot under TCG varies a lot with host load; this is the part the servers own
table "seconds from QEMU start to kernel loaded by iPXE (before the initrd, 1 MB)" LOADED
finish

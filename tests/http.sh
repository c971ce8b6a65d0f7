#!/usr/bin/env bash
# `provisioner netboot`'s HTTP server against a real client: the daemon runs in the test's server
# namespace with a config file and a Machine folder, curl in a client namespace bridged to it.
# Only what needs the real binary or curl is here; the HTTP semantics (scripts, ranges, HEAD,
# validators, confinement, methods, framing) are netboot/tests/http.rs, byte by byte. Here: the
# script the daemon renders from its config, files byte-exact through curl, curl's own resume
# (-C -), a 512 MiB file streamed with the process's peak memory far below it, the request log,
# and a clean stop on SIGTERM. Run as root.
TEST_NAME=http
# shellcheck source=tests/lib.sh
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || { echo "FAIL $TEST_NAME: must run as root"; exit 1; }
for tool in curl sha256sum dd ip; do
    command -v "$tool" >/dev/null || { echo "FAIL $TEST_NAME: $tool not installed"; exit 1; }
done
[ -x "$PROVISIONER" ] || { echo "FAIL $TEST_NAME: $PROVISIONER not built (cargo build -p agent)"; exit 1; }

PORT=8080
BASE="http://$SRV_IP:$PORT"
MAC=52:54:00:12:34:56
CLIENT_IP=$SUBNET_PREFIX.50

# Fixtures: random kernel/initrd and an iPXE binary.
mkdir -p "$WORK/assets" "$WORK/ipxe"
head -c 3000000 /dev/urandom >"$WORK/assets/vmlinuz"
head -c 1000001 /dev/urandom >"$WORK/assets/initrd.img"
head -c 65536 /dev/urandom >"$WORK/ipxe/snponly.efi"
stub_boot_files "$WORK/ipxe" undionly.kpxe
KERNEL="$WORK/assets/vmlinuz"
write_machine node2 "$MAC" "$SUBNET_PREFIX.20"
write_config "$WORK/provisioner.yaml" "leaseTime: 600" \
    "bootFiles: {ipxeDir: $WORK/ipxe, assetsDir: $WORK/assets}" \
    'boot: {kernel: vmlinuz, initrd: initrd.img, cmdline: "console=ttyS0 hostname={hostname}"}' \
    "listen: {dhcp: \"0.0.0.0:67\", tftp: \"$SRV_IP:69\", http: \"$SRV_IP:$PORT\"}"

netns_up
CLIENT=$(add_client cl)
ip netns exec "$CLIENT" ip addr add "$CLIENT_IP/24" dev eth0
in_cl() { ip netns exec "$CLIENT" "$@"; }
SERVER_PID=$(RUST_LOG=info start_in_srv server "$PROVISIONER" netboot --config "$WORK/provisioner.yaml")
SERVER_LOG="$WORK/server.log"
answers() { in_cl curl -s -o /dev/null --max-time 1 "$BASE/"; }
if ! wait_for -p "$SERVER_PID" 10 answers; then
    fail "server answers on $BASE"
    cat "$SERVER_LOG" >&2
    finish
fi

sha() { sha256sum | cut -d' ' -f1; }
# The server's log as plain text, whatever the logger's colour setting.
server_log_has() { sed 's/\x1b\[[0-9;]*m//g' "$SERVER_LOG" | grep -qE "$1"; }

# --- the iPXE script the daemon renders from its config and the machine folder ---------------
printf '%s\n' '#!ipxe' "# node2 $MAC" \
    "kernel $BASE/assets/vmlinuz initrd=initrd.img console=ttyS0 hostname=node2" \
    "initrd $BASE/assets/initrd.img" boot >"$WORK/script.want"
in_cl curl -sS -f --max-time 10 "$BASE/ipxe/52-54-00-12-34-56" >"$WORK/script.got" || true
check "script for a known MAC has the exact content" cmp -s "$WORK/script.want" "$WORK/script.got"
code=$(in_cl curl -s -o /dev/null --max-time 10 -w '%{http_code}' "$BASE/ipxe/52-54-00-99-99-99" || true)
check "a MAC outside the folder is 404 ($code)" [ "$code" = 404 ]

# --- files through curl ------------------------------------------------------------------------
got=$(in_cl curl -sS -f --max-time 30 "$BASE/assets/vmlinuz" | sha || true)
check "kernel sha256 equals the source" [ "$got" = "$(sha <"$KERNEL")" ]
got=$(in_cl curl -sS -f --max-time 30 "$BASE/boot/snponly.efi" | sha || true)
check "/boot/ file sha256 equals the source" [ "$got" = "$(sha <"$WORK/ipxe/snponly.efi")" ]
# curl's own resume of an interrupted download (it asks for the rest with a Range).
dd if="$KERNEL" of="$WORK/resumed" bs=1M count=1 status=none
in_cl curl -sS --max-time 30 -C - -o "$WORK/resumed" "$BASE/assets/vmlinuz" || true
check "curl -C - resumes to the exact file" [ "$(sha <"$WORK/resumed")" = "$(sha <"$KERNEL")" ]
check "the resume was a Range request (206 in the log)" wait_for 10 server_log_has 'path=/assets/vmlinuz.*status=206|status=206.*path=/assets/vmlinuz'

# A 512 MiB (sparse) image is streamed: the server's peak memory stays far below its size.
truncate -s 512M "$WORK/assets/big.img"
got=$(in_cl curl -sS -f --max-time 120 -o /dev/null -w '%{size_download} %{speed_download}' "$BASE/assets/big.img" || true)
log "512 MiB download: ${got% *} bytes at ${got#* } B/s"
check "512 MiB image downloads completely" [ "${got% *}" = 536870912 ]
hwm_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$SERVER_PID/status")
log "server peak RSS: $hwm_kb KiB"
check "server peak RSS stays under 100 MiB while streaming 512 MiB ($hwm_kb KiB)" [ "${hwm_kb:-999999}" -lt 102400 ]

# --- logs and shutdown ---------------------------------------------------------------------
check "request log names the machine and MAC" wait_for 10 server_log_has \
    'machine="?node2"?.*mac="?52:54:00:12:34:56|mac="?52:54:00:12:34:56"?.*machine="?node2'
check "request log has status and bytes" wait_for 10 server_log_has \
    'status=200.*bytes=536870912|bytes=536870912.*status=200'

kill -TERM "$SERVER_PID"
check "server stops within 10 s of SIGTERM" wait_for 10 not alive "$SERVER_PID"
check "server logged a clean HTTP stop" server_log_has "HTTP server stopped"
if [ "$FAILURES" -ne 0 ]; then log "server log:"; tail -n 40 "$SERVER_LOG" >&2; fi
finish

#!/usr/bin/env bash
# The HTTP server against a real client: the server runs in the test's server namespace, curl
# in a client namespace bridged to it. Run as root.
#
# Server: `provisioner netboot --config …` when that binary has the subcommand, else the
# netboot example `http_server`. Force one with HTTP_SERVER=agent or HTTP_SERVER=example.
TEST_NAME=http
# shellcheck source=tests/lib.sh
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || { echo "FAIL $TEST_NAME: must run as root"; exit 1; }
for tool in curl sha256sum dd ip; do
    command -v "$tool" >/dev/null || { echo "FAIL $TEST_NAME: $tool not installed"; exit 1; }
done

PORT=8080
BASE="http://$SRV_IP:$PORT"
MAC=52:54:00:12:34:56
CLIENT_IP=$SUBNET_PREFIX.50

mode=${HTTP_SERVER:-auto}
if [ "$mode" = auto ]; then
    if [ -x "$PROVISIONER" ] && "$PROVISIONER" netboot --help >/dev/null 2>&1; then
        mode=agent
    else
        mode=example
    fi
fi
log "server: $mode"

# Fixtures: random kernel/initrd, an iPXE binary, a subdirectory and a secret outside the roots.
mkdir -p "$WORK/assets/sub" "$WORK/ipxe" "$WORK/machines"
head -c 3000000 /dev/urandom >"$WORK/assets/vmlinuz"
head -c 1000001 /dev/urandom >"$WORK/assets/initrd.img"
head -c 65536 /dev/urandom >"$WORK/ipxe/snponly.efi"
stub_boot_files "$WORK/ipxe" undionly.kpxe
echo "not for clients" >"$WORK/secret"
KERNEL="$WORK/assets/vmlinuz"

case $mode in
agent)
    api_version=$(sed -n 's/.*API_VERSION: &str = "\(.*\)";/\1/p' "$REPO/agent/src/machines/folder.rs")
    cat >"$WORK/machines/node2.yaml" <<EOF
apiVersion: ${api_version:-provisioner.dev/v1alpha1}
kind: Machine
metadata:
  name: node2
spec:
  macAddress: "$MAC"
  ipAddress: $SUBNET_PREFIX.20
EOF
    cat >"$WORK/provisioner.yaml" <<EOF
interface: br0
serverAddress: $SRV_IP
subnet: $SUBNET_PREFIX.0/24
leaseTime: 600
bootFiles:
  ipxeDir: $WORK/ipxe
  assetsDir: $WORK/assets
boot:
  kernel: vmlinuz
  initrd: initrd.img
  cmdline: "console=ttyS0 hostname={hostname}"
listen:
  dhcp: 0.0.0.0:67
  tftp: $SRV_IP:69
  http: $SRV_IP:$PORT
inventory:
  directory: $WORK/machines
EOF
    server=("$PROVISIONER" netboot --config "$WORK/provisioner.yaml")
    ;;
example)
    if command -v cargo >/dev/null; then
        (cd "$REPO" && cargo build -q -p netboot --example http_server)
    fi
    bin="$REPO/target/debug/examples/http_server"
    [ -x "$bin" ] || { echo "FAIL $TEST_NAME: $bin not built"; exit 1; }
    server=("$bin" "$SRV_IP:$PORT" "$WORK/ipxe" "$WORK/assets" "$BASE" vmlinuz initrd.img
        "console=ttyS0 hostname={hostname}" "node2,$MAC,$SUBNET_PREFIX.20")
    ;;
*) echo "FAIL $TEST_NAME: HTTP_SERVER must be agent, example or auto"; exit 1 ;;
esac

netns_up
CLIENT=$(add_client cl)
ip netns exec "$CLIENT" ip addr add "$CLIENT_IP/24" dev eth0
in_cl() { ip netns exec "$CLIENT" "$@"; }
# Not in $(...): start_in_srv records the PID for the cleanup trap in this shell.
RUST_LOG=info start_in_srv server "${server[@]}" >/dev/null
SERVER_PID=$(cat "$WORK/server.pid")
SERVER_LOG="$WORK/server.log"

# Wait (at most 10 s) until the server answers.
for _ in $(seq 1 100); do
    in_cl curl -s -o /dev/null --max-time 1 "$BASE/" && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
if ! in_cl curl -s -o /dev/null --max-time 2 "$BASE/"; then
    fail "server answers on $BASE"
    cat "$SERVER_LOG" >&2
    finish
fi

# code ARGS...: the status code curl gets.
code() { in_cl curl -s -o /dev/null --max-time 10 -w '%{http_code}' "$@" || true; }
# status_is WANT ARGS...
status_is() { local want=$1; shift; local got; got=$(code "$@"); [ "$got" = "$want" ] || { log "got $got, want $want: $*"; return 1; }; }
sha() { sha256sum | cut -d' ' -f1; }
header() { tr -d '\r' <"$1" | sed -n "s/^$2: //Ip" | head -n1; }

# --- iPXE scripts --------------------------------------------------------------------------
printf '%s\n' '#!ipxe' "# node2 $MAC" \
    "kernel $BASE/assets/vmlinuz initrd=initrd.img console=ttyS0 hostname=node2" \
    "initrd $BASE/assets/initrd.img" boot >"$WORK/script.want"
in_cl curl -sS -f --max-time 10 -D "$WORK/script.hdr" "$BASE/ipxe/52-54-00-12-34-56" >"$WORK/script.got" || true
check "script for a known MAC has the exact content" cmp -s "$WORK/script.want" "$WORK/script.got"
check "script is text/plain" grep -qi '^content-type: text/plain' "$WORK/script.hdr"
in_cl curl -sS -f --max-time 10 "$BASE/ipxe/$MAC" >"$WORK/script2.got" || true
check "script with a colon MAC is the same" cmp -s "$WORK/script.want" "$WORK/script2.got"
check "unknown MAC is 404" status_is 404 "$BASE/ipxe/52-54-00-99-99-99"
check "malformed MAC is 400" status_is 400 "$BASE/ipxe/not-a-mac"
check "short MAC is 400" status_is 400 "$BASE/ipxe/52-54-00-12-34"

# --- whole files ---------------------------------------------------------------------------
got=$(in_cl curl -sS -f --max-time 30 "$BASE/assets/vmlinuz" | sha || true)
check "kernel sha256 equals the source" [ "$got" = "$(sha <"$KERNEL")" ]
got=$(in_cl curl -sS -f --max-time 30 "$BASE/assets/initrd.img" | sha || true)
check "initrd sha256 equals the source" [ "$got" = "$(sha <"$WORK/assets/initrd.img")" ]
got=$(in_cl curl -sS -f --max-time 30 "$BASE/boot/snponly.efi" | sha || true)
check "/boot/ file sha256 equals the source" [ "$got" = "$(sha <"$WORK/ipxe/snponly.efi")" ]

# A 512 MiB (sparse) image is streamed: the server's peak memory stays far below its size.
truncate -s 512M "$WORK/assets/big.img"
got=$(in_cl curl -sS -f --max-time 60 -o /dev/null -w '%{size_download} %{speed_download}' "$BASE/assets/big.img" || true)
log "512 MiB download: ${got% *} bytes at ${got#* } B/s"
check "512 MiB image downloads completely" [ "${got% *}" = 536870912 ]
hwm_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$SERVER_PID/status")
log "server peak RSS: $hwm_kb KiB"
check "server peak RSS stays under 100 MiB while streaming 512 MiB ($hwm_kb KiB)" [ "${hwm_kb:-999999}" -lt 102400 ]

# --- HEAD ----------------------------------------------------------------------------------
in_cl curl -sS -I --max-time 10 "$BASE/assets/vmlinuz" >"$WORK/head.hdr" || true
check "HEAD is 200" grep -q '^HTTP/1.1 200' "$WORK/head.hdr"
check "HEAD Content-Length is the file size" [ "$(header "$WORK/head.hdr" content-length)" = 3000000 ]
ETAG=$(header "$WORK/head.hdr" etag)
check "HEAD has an ETag" [ -n "$ETAG" ]
check "HEAD has Last-Modified" [ -n "$(header "$WORK/head.hdr" last-modified)" ]
check "HEAD advertises byte ranges" [ "$(header "$WORK/head.hdr" accept-ranges)" = bytes ]
# Raw HEAD: the connection carries the header block and nothing after it.
in_cl timeout 10 bash -c 'exec 3<>"/dev/tcp/$1/$2"
    printf "HEAD /assets/vmlinuz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" >&3
    cat <&3' _ "$SRV_IP" "$PORT" >"$WORK/rawhead" || true
check "raw HEAD response ends right after its headers" \
    sh -c '[ "$(tail -c 4 "$1" | od -An -tx1 | tr -d " \n")" = 0d0a0d0a ]' _ "$WORK/rawhead"
check "raw HEAD response has Content-Length 3000000" grep -qi $'^content-length: 3000000\r$' "$WORK/rawhead"

# --- ranges --------------------------------------------------------------------------------
in_cl curl -sS --max-time 10 -r 1000-70999 -D "$WORK/r1.hdr" -o "$WORK/r1" "$BASE/assets/vmlinuz" || true
dd if="$KERNEL" of="$WORK/r1.want" bs=64k iflag=skip_bytes,count_bytes skip=1000 count=70000 status=none
check "Range a-b is 206" grep -q '^HTTP/1.1 206' "$WORK/r1.hdr"
check "Range a-b Content-Range" [ "$(header "$WORK/r1.hdr" content-range)" = "bytes 1000-70999/3000000" ]
check "Range a-b bytes equal dd of the source" cmp -s "$WORK/r1" "$WORK/r1.want"
in_cl curl -sS --max-time 10 -r 2999000- -o "$WORK/r2" "$BASE/assets/vmlinuz" || true
dd if="$KERNEL" of="$WORK/r2.want" bs=64k iflag=skip_bytes skip=2999000 status=none
check "Range a- bytes equal dd of the source" cmp -s "$WORK/r2" "$WORK/r2.want"
in_cl curl -sS --max-time 10 -r -4321 -o "$WORK/r3" "$BASE/assets/vmlinuz" || true
dd if="$KERNEL" of="$WORK/r3.want" bs=64k iflag=skip_bytes skip=$((3000000 - 4321)) status=none
check "Range -n bytes equal dd of the source" cmp -s "$WORK/r3" "$WORK/r3.want"
in_cl curl -s --max-time 10 -r 5000000- -D "$WORK/r4.hdr" -o /dev/null "$BASE/assets/vmlinuz" || true
check "unsatisfiable Range is 416" grep -q '^HTTP/1.1 416' "$WORK/r4.hdr"
check "416 has Content-Range bytes */len" [ "$(header "$WORK/r4.hdr" content-range)" = "bytes */3000000" ]
check "several ranges get the whole file (200)" status_is 200 -r 0-1,5-6 "$BASE/assets/vmlinuz"
# curl's own resume of an interrupted download.
dd if="$KERNEL" of="$WORK/resumed" bs=1M count=1 status=none
in_cl curl -sS --max-time 30 -C - -o "$WORK/resumed" "$BASE/assets/vmlinuz" || true
check "curl -C - resumes to the exact file" [ "$(sha <"$WORK/resumed")" = "$(sha <"$KERNEL")" ]

# --- conditional requests ------------------------------------------------------------------
check "If-None-Match with the ETag is 304" status_is 304 -H "If-None-Match: $ETAG" "$BASE/assets/vmlinuz"
check "If-None-Match with another tag is 200" status_is 200 -H 'If-None-Match: "other"' "$BASE/assets/vmlinuz"

# --- confinement and methods ---------------------------------------------------------------
for path in /assets/../../etc/passwd /assets/../secret /boot/../../../etc/passwd /assets/%2e%2e/secret; do
    got=$(code --path-as-is "$BASE$path")
    check "traversal $path is refused ($got)" sh -c '[ "$1" = 400 ] || [ "$1" = 404 ]' _ "$got"
    body=$(in_cl curl -s --max-time 10 --path-as-is "$BASE$path")
    check "traversal $path leaks nothing" sh -c '! printf %s "$1" | grep -qE "root:|not for clients"' _ "$body"
done
check "directory is 404" status_is 404 "$BASE/assets/sub/"
check "directory without slash is 404" status_is 404 "$BASE/assets/sub"
check "assets root is 404" status_is 404 "$BASE/assets/"
check "missing file is 404" status_is 404 "$BASE/assets/nope"
check "NUL in the path is 400" status_is 400 "$BASE/assets/vm%00linuz"
check "bad percent-encoding is 400" status_is 400 "$BASE/assets/%zz"
check "POST is 405" status_is 405 -X POST -d x "$BASE/assets/vmlinuz"
in_cl curl -s --max-time 10 -X PUT -d x -D "$WORK/put.hdr" -o /dev/null "$BASE/ipxe/52-54-00-12-34-56" || true
check "405 names the allowed methods" [ "$(header "$WORK/put.hdr" allow)" = "GET, HEAD" ]

# --- logs and shutdown ---------------------------------------------------------------------
# Plain text whatever the logger's colour setting.
sed 's/\x1b\[[0-9;]*m//g' "$SERVER_LOG" >"$WORK/server.txt"
check "request log names the machine and MAC" grep -qE \
    'machine="?node2"?.*mac="?52:54:00:12:34:56|mac="?52:54:00:12:34:56"?.*machine="?node2' "$WORK/server.txt"
check "request log has status and bytes" grep -qE 'status=206.*bytes=70000|bytes=70000.*status=206' "$WORK/server.txt"

kill -TERM "$SERVER_PID"
stopped=no
gone() { ! kill -0 "$1" 2>/dev/null || [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ]; }
for _ in $(seq 1 100); do gone "$SERVER_PID" && { stopped=yes; break; }; sleep 0.1; done
check "server stops within 10 s of SIGTERM" [ "$stopped" = yes ]
check "server logged a clean HTTP stop" sh -c 'sed "s/\x1b\[[0-9;]*m//g" "$1" | grep -q "HTTP server stopped"' _ "$SERVER_LOG"
if [ "$FAILURES" -ne 0 ]; then log "server log:"; tail -n 40 "$SERVER_LOG" >&2; fi
finish

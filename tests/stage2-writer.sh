#!/usr/bin/env bash
# The stage2 image writer against a loop device, fed by netboot's HTTP server in the test's own
# network namespace: good raw/zstd/xz/gzip images land byte-exact with a readable GPT; truncated,
# corrupt, wrong-hash and wrong-size images fail and leave no partition table (first MiB zero, no
# "EFI PART", no 55AA); a server killed mid-download and restarted is resumed (the download
# throttled so that it cannot be over before the kill, however fast the machine). Run as root.
TEST_NAME=stage2-writer
# shellcheck source=tests/lib.sh
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || { echo "FAIL $TEST_NAME: must run as root"; exit 1; }
for tool in losetup sfdisk zstd xz gzip sha256sum tc curl; do
    command -v "$tool" >/dev/null || { echo "FAIL $TEST_NAME: $tool not installed"; exit 1; }
done

(cd "$REPO" && cargo build -q -p stage2 --example write_image && cargo build -q -p netboot --example http_server)
WRITER=$REPO/target/debug/examples/write_image
SERVER=$REPO/target/debug/examples/http_server
PORT=8080
BASE="http://$SRV_IP:$PORT/assets"

LOOP=
detach() { [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null; cleanup; }
trap detach EXIT

# The image: a real GPT (two partitions) made by sfdisk, 8 MiB of random data in the first
# partition and zeros elsewhere (compressible, like a disk image), 24 MiB and 5 sectors long so
# the size is not a multiple of the chunk size.
mkdir -p "$WORK/assets" "$WORK/ipxe"
echo ok >"$WORK/assets/probe"
IMG=$WORK/image.raw
truncate -s $((24 * 1024 * 1024 + 5 * 512)) "$IMG"
printf 'label: gpt\nsize=12MiB, type=linux\ntype=linux\n' | sfdisk -q "$IMG"
dd if=/dev/urandom of="$IMG" bs=1M seek=1 count=8 conv=notrunc status=none
SIZE=$(stat -c %s "$IMG")
SHA=$(sha256sum "$IMG" | cut -d' ' -f1)
cp "$IMG" "$WORK/assets/image.raw"
zstd -q -3 -c "$IMG" >"$WORK/assets/image.raw.zst"
xz -1 -T1 -c "$IMG" >"$WORK/assets/image.raw.xz"
gzip -1 -c "$IMG" >"$WORK/assets/image.raw.gz"
head -c $(( $(stat -c %s "$WORK/assets/image.raw.zst") / 2 )) "$WORK/assets/image.raw.zst" >"$WORK/assets/truncated.zst"
cp "$WORK/assets/image.raw.zst" "$WORK/assets/corrupt.zst"
# Flip bits in the middle of the compressed stream.
printf '\xff\xff\xff\xff' | dd of="$WORK/assets/corrupt.zst" bs=1 seek=$(( $(stat -c %s "$WORK/assets/corrupt.zst") / 2 )) conv=notrunc status=none

# The target: a 64 MiB loop device (bigger than the image, so its last MiB is not the image's).
truncate -s 64M "$WORK/disk.img"
LOOP=$(losetup --find --show "$WORK/disk.img")
log "target $LOOP"

netns_up
SERVER_PID=
probe() { in_srv curl -s -o /dev/null --max-time 1 "$BASE/probe"; }
start_server() {
    SERVER_PID=$(RUST_LOG=info start_in_srv server "$SERVER" "$SRV_IP:$PORT" "$WORK/ipxe" "$WORK/assets" \
        "http://$SRV_IP:$PORT" vmlinuz initrd.img "console=ttyS0")
    wait_for -p "$SERVER_PID" 10 probe && return 0
    log "server did not start"; cat "$WORK/server.log" >&2; return 1
}
start_server

# write NAME [SHA [SIZE]]: runs the writer in the namespace; output in $WORK/write.log.
write() {
    in_srv "$WRITER" "$BASE/$1" "$LOOP" "${2:-$SHA}" ${3:+"$3"} >"$WORK/write.log" 2>&1
}
bytes_at() { dd if="$LOOP" bs=1 skip="$1" count="$2" status=none | od -An -tx1 | tr -d ' \n'; }
# The writer's one-line result or error.
result() { grep -m1 -E '^(written|Error:)' "$WORK/write.log"; }
image_on_disk() { cmp -n "$SIZE" "$IMG" "$LOOP"; }
gpt_readable() { sfdisk -d "$LOOP" 2>/dev/null | grep -q 'label: gpt'; }
# Not bootable: first MiB all zero, no protective MBR signature, no primary GPT header.
not_bootable() {
    cmp -s -n 1048576 "$LOOP" /dev/zero || { log "first MiB not zero"; return 1; }
    [ "$(bytes_at 510 2)" != 55aa ] || { log "MBR signature left"; return 1; }
    [ "$(bytes_at 512 8)" != 4546492050415254 ] || { log "'EFI PART' left"; return 1; }
    ! gpt_readable
}
# fails_cleanly DESCRIPTION PATTERN ARGS...: a good image is written first, then ARGS must fail
# with PATTERN in the message and leave the disk not bootable.
fails_cleanly() {
    local what=$1 pattern=$2; shift 2
    write image.raw.zst && gpt_readable || { fail "$what: setup write"; return; }
    if write "$@"; then
        fail "$what: writer succeeded"; cat "$WORK/write.log" >&2; return
    fi
    grep -q "$pattern" "$WORK/write.log" || { fail "$what: message lacks '$pattern'"; cat "$WORK/write.log" >&2; }
    check "$what: fails, disk left unbootable" not_bootable
    log "$what: $(result)"
}

for name in image.raw image.raw.zst image.raw.xz image.raw.gz; do
    dd if=/dev/zero of="$LOOP" bs=1M count=64 status=none
    if write "$name" "$SHA" "$SIZE"; then
        log "$name: $(result)"
        check "$name written byte-exact" image_on_disk
        check "$name: GPT readable by sfdisk" gpt_readable
    else
        fail "$name: writer failed"; cat "$WORK/write.log" >&2
    fi
done

fails_cleanly "truncated zstd" "corrupt or truncated" truncated.zst
fails_cleanly "corrupt zstd" "corrupt or truncated\|sha256" corrupt.zst
fails_cleanly "wrong sha256" "sha256 is $SHA, expected" image.raw.zst "$(printf '%064d' 0)"
fails_cleanly "wrong size (too small)" "larger than the expected" image.raw.zst "$SHA" $((SIZE - 512))
fails_cleanly "wrong size (too large)" "expected $((SIZE + 512))" image.raw.zst "$SHA" $((SIZE + 512))
fails_cleanly "missing image" "404" missing.zst

# Server killed (SIGKILL) mid-download and restarted: the writer resumes and the image is exact. The
# namespace's loopback is throttled (tbf, this namespace only) to 4 Mbit/s: the ~8 MiB download
# takes at least 16 s. The server is killed at the writer's first progress line (2 s of data),
# when most of the image is still to come; the throttle is lifted for the rest. The kernel still
# sends what a killed server's socket holds, and with this host's default buffers (MiBs) that
# can be the whole rest: in this namespace they are 64 KiB at most, so the cut is real.
dd if=/dev/zero of="$LOOP" bs=1M count=64 status=none
in_srv sysctl -qw net.ipv4.tcp_wmem="4096 16384 65536" net.ipv4.tcp_rmem="4096 65536 65536"
# The bucket must hold a whole loopback packet (MTU 64 KiB), or such packets never leave.
in_srv tc qdisc add dev lo root tbf rate 4mbit burst 256kb latency 100ms
in_srv "$WRITER" "$BASE/image.raw.zst" "$LOOP" "$SHA" "$SIZE" >"$WORK/write.log" 2>&1 &
writer=$!
check "the download is under way (a progress line)" wait_for -p "$writer" 20 grep -q '^progress: [1-9]' "$WORK/write.log"
# SIGKILL: on SIGTERM the server would let the transfer in flight finish.
kill -KILL "$SERVER_PID"
log "server killed at: $(grep '^progress:' "$WORK/write.log" | tail -n 1)"
in_srv tc qdisc del dev lo root
wait_for 10 not alive "$SERVER_PID" || true
start_server
if wait "$writer"; then
    log "resume: $(result)"
    check "download resumed after a server restart, image exact" image_on_disk
    check "resume happened (not a fresh start)" grep -q "resumed" "$WORK/write.log"
else
    fail "writer did not survive a server restart"; cat "$WORK/write.log" >&2
fi

finish

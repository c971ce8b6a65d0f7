#!/usr/bin/env bash
# Write throughput of the stage2 image writer: a zstd image (512 MiB decompressed by default,
# IMAGE_MIB to change) served by netboot's HTTP server in the benchmark's own namespace, written
# onto a loop device; compared in the same run with `curl | zstd -d | dd conv=fsync` (which,
# unlike the writer, verifies nothing). Prints MB/s of decompressed image, the ratio, and the
# writer's peak resident memory. Run as root. Uses release binaries when they are built
# (tests/bench/run-all.sh builds them), else builds them.
TEST_NAME=stage2-write
# shellcheck source=tests/lib.sh
source "$(dirname "$0")/../lib.sh"

[ "$(id -u)" -eq 0 ] || { echo "FAIL $TEST_NAME: must run as root"; exit 1; }
for tool in losetup zstd curl dd sha256sum /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "FAIL $TEST_NAME: $tool not installed"; exit 1; }
done
IMAGE_MIB=${IMAGE_MIB:-512}

(cd "$REPO" && cargo build -q --release -p stage2 --example write_image \
    && cargo build -q --release -p netboot --example http_server)
WRITER=$REPO/target/release/examples/write_image
SERVER=$REPO/target/release/examples/http_server
PORT=8080
URL="http://$SRV_IP:$PORT/assets/image.raw.zst"

LOOP=
detach() { [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null; cleanup; }
trap detach EXIT

# A disk-like image: half real binaries and libraries from /usr (compress about 3:1), half
# zeros (free space).
mkdir -p "$WORK/assets" "$WORK/ipxe"
IMG=$WORK/image.raw
half=$((IMAGE_MIB / 2))
{
    # head stops reading early: the writers before it die of SIGPIPE, which is expected here.
    (set +o pipefail; find /usr/lib /usr/bin -type f -size +64k -print0 2>/dev/null \
        | xargs -0 cat 2>/dev/null | head -c $((half * 1024 * 1024)))
    head -c $(((IMAGE_MIB - half) * 1024 * 1024)) /dev/zero
} >"$IMG"
SIZE=$(stat -c %s "$IMG")
[ "$SIZE" -eq $((IMAGE_MIB * 1024 * 1024)) ] || { echo "FAIL $TEST_NAME: not enough data under /usr for the image"; exit 1; }
SHA=$(sha256sum "$IMG" | cut -d' ' -f1)
zstd -q -3 -T0 -c "$IMG" >"$WORK/assets/image.raw.zst"
rm -f "$IMG"
log "image: $IMAGE_MIB MiB, zstd $(( $(stat -c %s "$WORK/assets/image.raw.zst") / 1024 / 1024 )) MiB"

truncate -s $((IMAGE_MIB + 64))M "$WORK/disk.img"
LOOP=$(losetup --find --show "$WORK/disk.img")

netns_up
RUST_LOG=warn start_in_srv server "$SERVER" "$SRV_IP:$PORT" "$WORK/ipxe" "$WORK/assets" \
    "http://$SRV_IP:$PORT" vmlinuz initrd.img "console=ttyS0" >/dev/null
for _ in $(seq 1 100); do
    in_srv curl -s -o /dev/null -I --max-time 1 "$URL" && break
    sleep 0.1
done

mbps() { awk -v b="$SIZE" -v s="$1" 'BEGIN { printf "%.1f", b / s / 1e6 }'; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# Same starting point for both: the compressed image in the page cache, the target's dirty
# pages flushed.
in_srv curl -s -o /dev/null "$URL"
sync

t0=$(now)
in_srv /usr/bin/time -f 'peak_rss_kib %M' "$WRITER" "$URL" "$LOOP" "$SHA" "$SIZE" >"$WORK/writer.log" 2>&1 \
    || { echo "FAIL $TEST_NAME: writer failed"; cat "$WORK/writer.log"; exit 1; }
t1=$(now)
ours=$(elapsed "$t0" "$t1")
rss=$(sed -n 's/^peak_rss_kib //p' "$WORK/writer.log")
cmp -s -n "$SIZE" <(zstd -q -d -c "$WORK/assets/image.raw.zst") "$LOOP" \
    || { echo "FAIL $TEST_NAME: written image differs"; exit 1; }

dd if=/dev/zero of="$LOOP" bs=1M count=16 conv=fsync status=none
sync
t0=$(now)
in_srv sh -c 'set -e; curl -s "$1" | zstd -q -d | dd of="$2" bs=1M iflag=fullblock conv=fsync status=none' \
    sh "$URL" "$LOOP"
t1=$(now)
ref=$(elapsed "$t0" "$t1")

printf 'stage2 writer (verified sha256, first MiB last, fsync): %s s, %s MB/s, peak RSS %s MiB\n' \
    "$ours" "$(mbps "$ours")" "$((rss / 1024))"
printf 'curl | zstd -d | dd conv=fsync (no verification):     %s s, %s MB/s\n' "$ref" "$(mbps "$ref")"
awk -v a="$ours" -v b="$ref" 'BEGIN { printf "ratio stage2/reference: %.2f\n", b / a }'

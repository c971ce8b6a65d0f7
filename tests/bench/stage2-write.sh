#!/usr/bin/env bash
# Write throughput of the stage2 image writer: a disk-like image (2 GiB decompressed by default,
# IMAGE_MIB to change) compressed with zstd, served by `provisioner imageserver` in the
# benchmark's own namespace, written onto a loop device (a sparse file under /var/tmp). Same run,
# same image bytes, same device (discarded before every run, dirty pages flushed):
#
#   - the stage2 writer (verifies size and sha256, first MiB last, fsync);
#   - `coreos-installer install --image-url … --insecure` (built from crates.io into
#     /var/tmp/provisioner-bench-tools on first use; NO_COREOS=1 skips it);
#   - `curl | zstd -d | dd conv=fsync` (verifies nothing);
#   - each stage alone, the physical limit of any pipeline here: read (curl → /dev/null),
#     decompress (zstd -d of the cached file → /dev/null), sha256 (the writer's own hashing
#     code, examples/sha256_stream, over the decompressed image in the page cache; it also says
#     whether the CPU has the SHA extensions), write (dd of zeros, conv=fsync,
#     through the page cache and with O_DIRECT, and fio with 4 MiB O_DIRECT writes, 3 and 8 in
#     flight: the fastest counts).
#
# The loop device does direct I/O on its backing file (LOOP_DIRECT_IO=off to turn that off). A
# disk has no page cache behind it: with the backing file's cache in between, nothing reaches
# the disk until a tool's final fsync, whatever the tool does, and the benchmark would compare
# flushes instead of writers.
#
# Each is run ROUNDS times (default 2), interleaved; the best run counts. Prints MB/s of
# decompressed image (1 MB = 10^6 bytes), the ratios, the writer's peak resident memory, and
# for each run the CPU time the whole machine was busy (figures are only comparable on an
# otherwise idle machine: the load average at the start is printed). A pipeline runs its stages
# at once, so it also needs their CPU time at once: the sum of the stages' CPU seconds over the
# machine's CPUs is a second bound, printed beside the slowest stage.
# WRITER_BASELINE=path also runs another build of the write_image example (before/after a change).
# Run as root. Uses release binaries.
TEST_NAME=stage2-write
# shellcheck source=tests/lib.sh
source "$(dirname "$0")/../lib.sh"

[ "$(id -u)" -eq 0 ] || { echo "FAIL $TEST_NAME: must run as root"; exit 1; }
for tool in losetup blkdiscard sfdisk openssl base64 zstd curl dd sha256sum /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "FAIL $TEST_NAME: $tool not installed"; exit 1; }
done
IMAGE_MIB=${IMAGE_MIB:-2048}
ROUNDS=${ROUNDS:-2}
TOOLS_DIR=${TOOLS_DIR:-/var/tmp/provisioner-bench-tools}
# Big files go to /var/tmp (disk), not to a possibly memory-backed /tmp.
DATA=$(mktemp -d /var/tmp/pv-stage2-write.XXXXXX)
# Until teardown takes over (below), a failed or interrupted build leaves no folder behind.
trap 'rm -rf "$DATA"; cleanup' EXIT

(cd "$REPO" && cargo build -q --release -p stage2 --example write_image --example sha256_stream \
    && cargo build -q --release -p agent --bin provisioner)
# WRITER: another build of the write_image example, to compare versions of the writer.
WRITER=${WRITER:-$REPO/target/release/examples/write_image}
PROVISIONER=$REPO/target/release/provisioner
HASHER=$REPO/target/release/examples/sha256_stream
PORT=8081
URL="http://$SRV_IP:$PORT/image.raw.zst"

LOOP=
teardown() {
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    rm -rf "$DATA"
    cleanup
}
trap teardown EXIT

# coreos-installer, the reference installer: built once (single job, lowest priority: it takes
# a while on a small machine) and kept in TOOLS_DIR.
COREOS=$TOOLS_DIR/bin/coreos-installer
if [ "${NO_COREOS:-0}" != 1 ] && [ ! -x "$COREOS" ]; then
    log "building coreos-installer into $TOOLS_DIR (once)"
    nice -n 19 cargo install --locked -j 1 --root "$TOOLS_DIR" coreos-installer >"$WORK/coreos-build.log" 2>&1 \
        || { tail -20 "$WORK/coreos-build.log"; log "coreos-installer did not build; it is left out"; }
fi
# coreos-installer re-reads the partition table (the loop device needs partition scanning) and
# refuses to start without udev ("udevd socket missing": it checks /run/udev/control, then runs
# `udevadm settle`). A host without udevd gets one for coreos-installer's run only, fenced off:
# a private mount namespace with its own /run and no rules (so it touches nothing in /dev), in
# the benchmark's network namespace, where the kernel sends it no device events (uevents go to
# the initial network namespace only). `udevadm settle` then returns at once, as it does on a
# quiet machine; only the wait for udev is left out, not any of coreos-installer's work.
COREOS_RUNS=0
UDEVD=
if [ -x "$COREOS" ] && [ "${NO_COREOS:-0}" != 1 ]; then
    COREOS_RUNS=1
    if [ ! -S /run/udev/control ]; then
        for candidate in /lib/systemd/systemd-udevd /usr/lib/systemd/systemd-udevd; do
            [ -x "$candidate" ] && UDEVD=$candidate && break
        done
        if [ -z "$UDEVD" ]; then
            COREOS_RUNS=0
            log "coreos-installer is left out: it needs udevd, and neither a running one nor systemd-udevd is here"
        fi
    fi
fi
# The image, deterministic: a GPT (fixed GUIDs) and then, every 8 MiB, 2 MiB of pseudo-random
# bytes (incompressible, like compressed or encrypted files), 2 MiB of base64 text of such bytes
# (compressible about 4:3, like text and code) and 4 MiB of zeros (free space). The random
# stream is AES-128-CTR of zeros under a fixed key.
IMG=$DATA/image.raw
log "generating a $IMAGE_MIB MiB image"
{
    exec 3< <(openssl enc -aes-128-ctr -nosalt -K 000102030405060708090a0b0c0d0e0f \
        -iv 0 -in /dev/zero 2>/dev/null)
    for _ in $(seq 1 $((IMAGE_MIB / 8))); do
        dd bs=1M count=2 iflag=fullblock status=none <&3
        dd bs=768K count=2 iflag=fullblock status=none <&3 | base64 -w 0
        head -c 4M /dev/zero
    done
    exec 3<&-
} >"$IMG"
SIZE=$(stat -c %s "$IMG")
[ "$SIZE" -eq $((IMAGE_MIB / 8 * 8 * 1024 * 1024)) ] || { echo "FAIL $TEST_NAME: image generation failed"; exit 1; }
sfdisk -q "$IMG" <<EOF
label: gpt
label-id: 5C2C7F1E-8D3B-4E7A-9F60-2B1D4C3E5A70
size=512MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=1D5E6A2B-3C4D-4E5F-8A9B-0C1D2E3F4A5B, name=boot
type=0FC63DAF-8483-4772-8E79-3D00A5BF5E8A, uuid=2E6F7B3C-4D5E-4F60-9BAC-1D2E3F4A5B6C, name=root
EOF
SHA=$(sha256sum "$IMG" | cut -d' ' -f1)
mkdir -p "$DATA/images"
zstd -q -3 -T0 -c "$IMG" >"$DATA/images/image.raw.zst"
# The decompressed image stays for the sha256 stage (read from the page cache).
ZSIZE=$(stat -c %s "$DATA/images/image.raw.zst")
log "image: $SIZE bytes, zstd -3 $ZSIZE bytes (ratio $(awk -v a="$SIZE" -v b="$ZSIZE" 'BEGIN { printf "%.2f", a / b }'):1), sha256 $SHA"

mkdir -p "$DATA/no-udev-rules"
truncate -s $((IMAGE_MIB + 64))M "$DATA/disk.img"
LOOP_DIRECT_IO=${LOOP_DIRECT_IO:-on}
LOOP=$(losetup --find --show --partscan --direct-io="$LOOP_DIRECT_IO" "$DATA/disk.img")
LOOP_DIO=$(losetup --noheadings --output DIO "$LOOP" | tr -d ' ')

netns_up
start_in_srv imageserver "$PROVISIONER" imageserver --dir "$DATA/images" --listen "$SRV_IP:$PORT" >/dev/null
for _ in $(seq 1 100); do
    in_srv curl -s -o /dev/null -I --max-time 1 "$URL" && break
    sleep 0.1
done
# The compressed image in the page cache for every run.
in_srv curl -sf -o /dev/null "$URL" || { echo "FAIL $TEST_NAME: imageserver does not serve the image"; exit 1; }

now() { date +%s.%N; }
# cpu_busy: CPU seconds spent so far by the whole machine outside idle and I/O wait (user, nice,
# system, irq, softirq, steal). Kernel work done for a run (the loop device's worker, network
# softirqs) belongs to no process, so the machine-wide figure is the one that counts.
cpu_busy() { awk -v hz="$(getconf CLK_TCK)" '/^cpu / { printf "%.2f", ($2 + $3 + $4 + $7 + $8 + $9) / hz }' /proc/stat; }
declare -A CPU
# fresh_target: every writer starts from the same empty (discarded, hence sparse) device with no
# dirty pages of a previous run still being flushed.
fresh_target() { blkdiscard -f "$LOOP"; sync; }
declare -A BEST
# timed NAME CMD...: runs CMD, keeps the best time of NAME; fails the benchmark if CMD fails.
timed() {
    local name=$1; shift
    local t0 t1 s c0 c1 c
    c0=$(cpu_busy)
    t0=$(now)
    "$@" || { echo "FAIL $TEST_NAME: $name failed"; tail -20 "$WORK"/*.log 2>/dev/null; exit 1; }
    t1=$(now)
    c1=$(cpu_busy)
    s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    c=$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')
    log "$name: $s s, machine CPU busy $c s"
    if [ -z "${BEST[$name]:-}" ] || awk -v a="$s" -v b="${BEST[$name]}" 'BEGIN { exit !(a < b) }'; then
        BEST[$name]=$s
        CPU[$name]=$c
    fi
}
verify_target() {
    cmp -s -n "$SIZE" <(zstd -q -d -c "$DATA/images/image.raw.zst") "$LOOP" \
        || { echo "FAIL $TEST_NAME: $1 wrote a different image"; exit 1; }
}

run_stage2() {
    in_srv /usr/bin/time -f 'peak_rss_kib %M user_s %U sys_s %S' "${1:-$WRITER}" "$URL" "$LOOP" "$SHA" "$SIZE" >"$WORK/writer.log" 2>&1
}
run_coreos() {
    if [ -z "$UDEVD" ]; then
        in_srv "$COREOS" install "$LOOP" --image-url "$URL" --insecure >"$WORK/coreos.log" 2>&1
        return
    fi
    # shellcheck disable=SC2016 # expanded by the inner shell
    in_srv unshare --mount --propagation private sh -c '
        set -e
        udevd=$1 empty=$2; shift 2
        mount -t tmpfs -o mode=0755 bench-run /run
        for rules in /etc/udev/rules.d /lib/udev/rules.d /usr/lib/udev/rules.d; do
            [ -d "$rules" ] && mount --bind "$empty" "$rules"
        done
        "$udevd" & pid=$!
        for _ in $(seq 1 100); do [ -S /run/udev/control ] && break; sleep 0.05; done
        rc=0
        "$@" || rc=$?
        kill "$pid"; wait "$pid" || true
        exit "$rc"' sh "$UDEVD" "$DATA/no-udev-rules" \
        "$COREOS" install "$LOOP" --image-url "$URL" --insecure >"$WORK/coreos.log" 2>&1
}
run_shell_pipeline() {
    in_srv sh -c 'set -e; curl -sf "$1" | zstd -q -d | dd of="$2" bs=1M iflag=fullblock conv=fsync status=none' \
        sh "$URL" "$LOOP"
}
read_alone() { in_srv curl -sf -o /dev/null "$URL"; }
decompress_alone() { zstd -q -d -c "$DATA/images/image.raw.zst" >/dev/null; }
hash_alone() {
    "$HASHER" "$IMG" >"$WORK/hash.log" || return 1
    [ "$(awk '{ print $2 }' "$WORK/hash.log")" = "$SHA" ] \
        || { echo "FAIL $TEST_NAME: sha256_stream gave another digest: $(cat "$WORK/hash.log")"; return 1; }
}
write_cached() { dd if=/dev/zero of="$LOOP" bs=1M count=$((SIZE / 1048576)) conv=fsync status=none; }
write_direct() { dd if=/dev/zero of="$LOOP" bs=4M count=$((SIZE / 4194304)) oflag=direct conv=fsync status=none; }
# write_queued DEPTH: what the device does with several writes queued (fio, libaio).
write_queued() {
    fio --name=write-alone --filename="$LOOP" --rw=write --bs=4M --size="$SIZE" --direct=1 \
        --ioengine=libaio --iodepth="$1" --end_fsync=1 --output=/dev/null
}
FIO_DEPTHS=
command -v fio >/dev/null && FIO_DEPTHS="3 8"

LOAD_AT_START=$(cut -d' ' -f1 /proc/loadavg)
awk -v l="$LOAD_AT_START" 'BEGIN { exit !(l > 0.5) }' \
    && log "load average $LOAD_AT_START: something else is running, figures will be low and noisy"
for round in $(seq 1 "$ROUNDS"); do
    log "round $round of $ROUNDS"
    fresh_target; timed stage2 run_stage2
    rss=$(awk '$1 == "peak_rss_kib" { print $2 }' "$WORK/writer.log")
    log "stage2 writer process: $(grep '^peak_rss_kib' "$WORK/writer.log")"
    verify_target "the stage2 writer"
    if [ -n "${WRITER_BASELINE:-}" ]; then
        fresh_target; timed baseline run_stage2 "$WRITER_BASELINE"
        verify_target "the baseline writer"
    fi
    if [ "$COREOS_RUNS" = 1 ]; then
        fresh_target; timed coreos-installer run_coreos
        verify_target coreos-installer
    fi
    fresh_target; timed pipeline run_shell_pipeline
    verify_target "curl | zstd -d | dd"
    timed read read_alone
    timed decompress decompress_alone
    cat "$IMG" >/dev/null # in the page cache, as the writer's decoded chunks are in memory
    timed sha256 hash_alone
    fresh_target; timed write-cached write_cached
    fresh_target; timed write-direct write_direct
    for depth in $FIO_DEPTHS; do
        fresh_target; timed "write-fio-$depth" write_queued "$depth"
    done
done

mbps() { awk -v b="$SIZE" -v s="$1" 'BEGIN { printf "%.1f", b / s / 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b / a }'; }
# Writing alone: the fastest way of writing the device.
BEST[write]=${BEST[write-cached]}
for way in write-direct $(for d in $FIO_DEPTHS; do echo "write-fio-$d"; done); do
    awk -v a="${BEST[$way]}" -v b="${BEST[write]}" 'BEGIN { exit !(a < b) }' && BEST[write]=${BEST[$way]}
done
slowest=read
for stage in decompress sha256 write; do
    awk -v a="${BEST[$stage]}" -v b="${BEST[$slowest]}" 'BEGIN { exit !(a > b) }' && slowest=$stage
done

printf '\nimage %s MiB (zstd %s MiB), best of %s round(s), loop device direct I/O %s, %s CPUs, load average at start %s\n' \
    "$((SIZE / 1048576))" "$((ZSIZE / 1048576))" "$ROUNDS" "$LOOP_DIO" "$(nproc)" "$LOAD_AT_START"
printf 'MB/s of decompressed image, and the CPU seconds the machine was busy during that run:\n'
# row LABEL NAME: one line of the table, if NAME was run.
row() {
    [ -n "${BEST[$2]:-}" ] || return 0
    printf '  %-46s %7s s  %7s MB/s  cpu %6s s\n' "$1" "${BEST[$2]}" "$(mbps "${BEST[$2]}")" "${CPU[$2]}"
}
row "stage2 writer (sha256, first MiB last, fsync)" stage2
row "coreos-installer install --insecure" coreos-installer
row "curl | zstd -d | dd conv=fsync (no checks)" pipeline
row "baseline writer (${WRITER_BASELINE:-})" baseline
row "read alone (curl > /dev/null)" read
row "decompress alone (zstd -d > /dev/null)" decompress
row "sha256 alone (our code, SHA-NI $(awk '{ print $10 }' "$WORK/hash.log"))" sha256
row "write alone (dd zeros bs=1M, page cache)" write-cached
row "write alone (dd zeros bs=4M, O_DIRECT)" write-direct
for depth in $FIO_DEPTHS; do
    row "write alone (fio 4M O_DIRECT, $depth in flight)" "write-fio-$depth"
done
printf 'stage2 writer peak RSS: %s MiB (target < 64)\n' "$((rss / 1024))"
[ -n "${BEST[coreos-installer]:-}" ] && printf 'stage2 / coreos-installer: %s (target >= 1.3)\n' \
    "$(ratio "${BEST[stage2]}" "${BEST[coreos-installer]}")"
printf 'stage2 / curl|zstd|dd: %s\n' "$(ratio "${BEST[stage2]}" "${BEST[pipeline]}")"
[ -n "${BEST[baseline]:-}" ] && printf 'stage2 / baseline writer: %s\n' "$(ratio "${BEST[stage2]}" "${BEST[baseline]}")"
printf 'stage2 / slowest stage alone (%s): %s (target >= 0.90)\n' \
    "$slowest" "$(ratio "${BEST[stage2]}" "${BEST[$slowest]}")"
# The CPU bound: the stages' CPU seconds (write: the fastest way's) spread over every CPU.
write_way=write-cached
for way in write-direct $(for d in $FIO_DEPTHS; do echo "write-fio-$d"; done); do
    [ "${BEST[$way]}" = "${BEST[write]}" ] && write_way=$way
done
cpu_sum=$(awk -v a="${CPU[read]}" -v b="${CPU[decompress]}" -v c="${CPU[sha256]}" -v d="${CPU[$write_way]}" \
    'BEGIN { printf "%.2f", a + b + c + d }')
cpu_bound=$(awk -v s="$cpu_sum" -v n="$(nproc)" 'BEGIN { printf "%.3f", s / n }')
printf 'stages CPU: read %s + decompress %s + sha256 %s + write %s = %s s over %s CPUs: no pipeline here beats %s s (%s MB/s)\n' \
    "${CPU[read]}" "${CPU[decompress]}" "${CPU[sha256]}" "${CPU[$write_way]}" "$cpu_sum" "$(nproc)" "$cpu_bound" "$(mbps "$cpu_bound")"
printf 'stage2 / CPU bound: %s; stage2 CPU %s s\n' "$(ratio "${BEST[stage2]}" "$cpu_bound")" "${CPU[stage2]}"

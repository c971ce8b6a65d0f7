#!/bin/bash
# The fuzz targets (fuzz/fuzz_targets/: DHCP decode + handle, TFTP packets and option
# negotiation, HTTP path decoding and Range parsing, the kernel command-line orders (wire), the
# Machine manifests and provisioner.yaml), with cargo-fuzz and libFuzzer on the nightly
# toolchain: each runs for FUZZ_SECONDS (30 by default), one after the other, niced, from the
# seeds in fuzz/seeds/ and the DHCP packets captured from real firmware
# (netboot/tests/fixtures/dhcp/). Built without a sanitizer (the crates forbid unsafe code)
# and with debug assertions (integer overflow panics). A crash, a panic or a slow input (10 s)
# fails its target; the input is printed and kept in the work directory (KEEP_WORK=1).
# Installs the nightly toolchain (rustup, minimal profile) and cargo-fuzz (crates.io) when
# they are missing. Long runs and the figures measured: README, "Fuzzing".
TEST_NAME=fuzz
# shellcheck source=tests/lib.sh
source "$(dirname "$0")/lib.sh"

SECONDS_EACH=${FUZZ_SECONDS:-30}
TARGETS=(dhcp tftp http_path http_range orders machine_yaml config)
[ -n "${FUZZ_TARGETS:-}" ] && read -ra TARGETS <<<"$FUZZ_TARGETS"
FLAGS=(-s none -a)

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd "$REPO"
t0=$(date +%s)
if ! nice -n 10 cargo +nightly fuzz build "${FLAGS[@]}" >"$WORK/build.log" 2>&1; then
    tail -30 "$WORK/build.log"
    fail "the fuzz targets build"
    finish
fi
log "fuzz targets built in $(( $(date +%s) - t0 )) s"

rows=()
for t in "${TARGETS[@]}"; do
    corpus=$WORK/corpus/$t
    mkdir -p "$corpus" "$WORK/artifacts/$t"
    case $t in
        dhcp) seeds=$REPO/netboot/tests/fixtures/dhcp ;;
        *) seeds=$REPO/fuzz/seeds/$t ;;
    esac
    rc=0
    nice -n 10 cargo +nightly fuzz run "${FLAGS[@]}" "$t" "$corpus" "$seeds" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$WORK/artifacts/$t/" >"$WORK/$t.log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$WORK/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$WORK/$t.log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$WORK/$t.log" | tail -1)
    rows+=("$(printf '%-13s %12s %10s/s   %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}")")
    if [ "$rc" != 0 ]; then
        grep -E 'panicked|ERROR: libFuzzer|SUMMARY' "$WORK/$t.log" | head -5
        for f in "$WORK/artifacts/$t"/*; do
            [ -f "$f" ] && { log "input $f:"; od -c "$f" | head -20; }
        done
    fi
    check "fuzz $t: ${execs:-?} executions in ${SECONDS_EACH}s, no crash (${cov:-no coverage line})" [ "$rc" = 0 ]
done
printf '\n%-13s %12s %12s   %s\n' target executions rate coverage
printf '%s\n' "${rows[@]}"
finish

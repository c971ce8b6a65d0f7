#!/bin/bash
# The fuzz targets (fuzz/fuzz_targets/: DHCP decode + handle, TFTP packets and option negotiation,
# HTTP path decoding and Range parsing, the kernel command-line orders (wire), the Machine
# manifests and provisioner.yaml), with cargo-fuzz and libFuzzer on the nightly toolchain: each
# runs for FUZZ_SECONDS (30 by default), or for FUZZ_RUNS executions when that is set (the long
# runs: FUZZ_RUNS=10000000), one after the other (FUZZ_TARGETS="a b": only those), niced, in one
# process (-jobs=1), from the seeds in fuzz/seeds/ and the DHCP packets captured from real
# firmware (netboot/tests/fixtures/dhcp/). Built without a sanitizer (the crates forbid unsafe
# code) and with debug assertions (integer overflow panics). A crash, a panic or a slow input
# (10 s) fails its target; the input is printed and kept in the work directory (KEEP_WORK=1).
# Prints a table: executions, wall time, rate, and libFuzzer's coverage (cov: edges, ft: features).
# Installs the nightly toolchain (rustup, minimal profile) and cargo-fuzz (crates.io) when they
# are missing. Long runs and the figures measured: README, "Fuzzing".
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

if [ -n "${FUZZ_RUNS:-}" ]; then
    BOUND=(-runs="$FUZZ_RUNS")
    bound="$FUZZ_RUNS executions"
else
    BOUND=(-max_total_time="$SECONDS_EACH")
    bound="${SECONDS_EACH}s"
fi
rows=()
for t in "${TARGETS[@]}"; do
    dir=$WORK/$t
    mkdir -p "$dir/corpus" "$dir/artifacts"
    case $t in
        dhcp) seeds=$REPO/netboot/tests/fixtures/dhcp ;;
        *) seeds=$REPO/fuzz/seeds/$t ;;
    esac
    rc=0
    t0=$(date +%s)
    # -jobs=1: one fuzzing process, whose output libFuzzer writes to fuzz-0.log in the
    # current directory (hence --fuzz-dir and the cd).
    (cd "$dir" && nice -n 10 cargo +nightly fuzz run --fuzz-dir "$REPO/fuzz" "${FLAGS[@]}" "$t" \
        "$dir/corpus" "$seeds" -- "${BOUND[@]}" -jobs=1 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$dir/artifacts/") >"$dir/run.log" 2>&1 || rc=$?
    secs=$(( $(date +%s) - t0 ))
    out=$dir/fuzz-0.log
    [ -f "$out" ] || out=$dir/run.log
    # Not the exit status alone: a crash or panic in the job's log, or an input kept in the
    # artifacts (crash-, timeout-, slow-unit-, oom-), fails the target too.
    if grep -qE '^==[0-9]+== ERROR: libFuzzer|panicked at|^SUMMARY: libFuzzer' "$out" ||
        compgen -G "$dir/artifacts/*" >/dev/null; then
        [ "$rc" != 0 ] || rc=1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$out" | tail -1)
    rows+=("$(printf '%-13s %12s %8ss %10s/s   %s' "$t" "${execs:-?}" "$secs" "${rate:-?}" "${cov:-?}")")
    if [ "$rc" != 0 ]; then
        grep -E 'panicked|ERROR: libFuzzer|SUMMARY' "$out" "$dir/run.log" | head -5
        for f in "$dir/artifacts"/*; do
            [ -f "$f" ] && { log "input $f:"; od -c "$f" | head -20; }
        done
    fi
    check "fuzz $t: ${execs:-?} executions in ${secs}s (bound: $bound), no crash (${cov:-no coverage line})" [ "$rc" = 0 ]
done
printf '\n%-13s %12s %9s %12s   %s\n' target executions time rate coverage
printf '%s\n' "${rows[@]}"
finish

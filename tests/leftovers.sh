#!/bin/bash
# leftovers.sh DIR: after a run of tests (tests/run-all.sh, tests/bench/run-all.sh) that set
# PV_TRACK_DIR=DIR, lists every process a test started that is still running, stops it (by PID)
# and exits 1; exits 0 when there is none. Two records, both written by tests/lib.sh:
#   DIR/pids      "PID START NAME TEST" for every process started through start_in/track_pid;
#                 START (/proc/PID/stat field 22) tells it from a later process with that PID
#   DIR/workdirs  each test's work directory (/tmp/pv-TEST.XXXXXX): a process with one on its
#                 command line was started by that test, whether it was recorded or not
# Nothing else is looked at or touched: other runs on the same machine have other directories.
set -uo pipefail
dir=${1:?usage: leftovers.sh DIR}

start_of() { # the start time of PID, empty when it is gone or a zombie
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    [ "${stat:0:1}" = Z ] && return 0
    set -- $stat
    echo "${20}"
}

declare -A found=() started=()
if [ -f "$dir/pids" ]; then
    while read -r pid start name test; do
        if [ "$(start_of "$pid")" = "$start" ]; then
            found[$pid]="$test: $name"
            started[$pid]=$start
        fi
    done <"$dir/pids"
fi
if [ -f "$dir/workdirs" ]; then
    while read -r work; do
        for pid in $(pgrep -f -- "$work"); do
            [ -n "${found[$pid]:-}" ] && continue
            found[$pid]="$(basename "$work"): its work directory on the command line"
            started[$pid]=$(start_of "$pid")
        done
    done <"$dir/workdirs"
fi

[ ${#found[@]} -eq 0 ] && exit 0
for pid in "${!found[@]}"; do
    echo "LEFT RUNNING pid $pid (${found[$pid]}): $(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")"
    kill "$pid" 2>/dev/null
done
ours() { [ -n "${started[$1]}" ] && [ "$(start_of "$1")" = "${started[$1]}" ]; }
for _ in $(seq 1 50); do
    left=0
    for pid in "${!found[@]}"; do ours "$pid" && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.1
done
for pid in "${!found[@]}"; do ours "$pid" && kill -9 "$pid" 2>/dev/null; done
echo "${#found[@]} process(es) left running by the tests: stopped now"
exit 1

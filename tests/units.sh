#!/bin/bash
# The systemd units as systemd reads them: `systemd-analyze verify` is clean for every unit in
# units/ (ExecStart pointed at the binary we built, since it is not installed on this host), and
# `systemd-analyze security --offline` rates netboot.service at exposure 2.0 or lower. Prints
# the full security table so the remaining exposures are visible in the CI log.
TEST_NAME=units
. "$(dirname "$0")/lib.sh"

mkdir -p "$WORK/units"
cp "$REPO"/units/*.socket "$REPO"/units/*.service "$REPO"/units/*.path "$WORK/units/" 2>/dev/null || true
# D-Bus activation files share the .service suffix but are not systemd units.
rm -f "$WORK"/units/dev.provisioner.*.service
sed -i "s|/usr/bin/provisioner|$PROVISIONER|g" "$WORK"/units/*
out=$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no "$WORK"/units/* 2>&1) || true
[ -n "$out" ] && log "systemd-analyze verify said:"$'\n'"$out"
check "systemd-analyze verify is clean for $(ls "$WORK/units" | tr '\n' ' ')" [ -z "$out" ]

for unit in netboot.service; do
    table=$(systemd-analyze security --offline=true --no-pager "$WORK/units/$unit" 2>&1) || true
    printf '%s\n' "$table" | grep -v '^✓'
    level=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$table")
    check "$unit exposure ${level:-unknown} <= 2.0" awk -v l="${level:-99}" 'BEGIN {exit !(l <= 2.0)}'
done
finish

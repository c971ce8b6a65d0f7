#!/bin/bash
# The controller's live tests (agent/src/cluster/tests/live/) against real Kubernetes: etcd,
# kube-apiserver and kube-controller-manager from the Kubernetes bundle (tests/lib-kube.sh),
# on 127.0.0.1 only, started, restarted and stopped by the tests themselves. A missing bundle
# fails the test. Prints each live test as PASS/FAIL and the figures the tests measure (API
# server readiness, the 1000-Machine start-up).
source "$(dirname "$0")/lib.sh"
source "$REPO/tests/lib-kube.sh"

started=$(date +%s)
if ! bin=$(kube_unpack); then
    fail "the Kubernetes bundle is found and its sha256s match (KUBERNETES_BUNDLE, or ../shared/kubernetes beside the repository)"
    finish
fi
pass "Kubernetes bundle unpacked and verified ($bin, $(($(date +%s) - started)) s)"

# The control planes' temporary directories go under $WORK: what is left running afterwards
# can be told from everything else on this machine by that path.
mkdir -p "$WORK/tmp"
log=$WORK/cargo-test.log
tests_started=$(date +%s)
status=0
(cd "$REPO" && TMPDIR=$WORK/tmp KUBERNETES_BIN=$bin cargo test -p agent --lib --locked -- \
    --ignored cluster::tests::live --skip cluster::tests::live::bench --test-threads=1 \
    --show-output) >"$log" 2>&1 || status=$?
log "cargo test: exit $status after $(($(date +%s) - tests_started)) s"

ran=0
while read -r name result; do
    ran=$((ran + 1))
    if [ "$result" = ok ]; then pass "$name"; else fail "$name"; fi
done < <(sed -n 's/^test \(cluster::tests::live::[a-z_:]*\) \.\.\. \(ok\|FAILED\)$/\1 \2/p' "$log")
# The figures the tests print (lines of their own, between the test lines).
grep -E '^(control plane|[0-9]+ Machines|  +[0-9]+ (get|list|watch|patch|create|delete)|agent saw|kube-apiserver restarted|caught up|status writes|CRD re-applied|kubectl get|NAME +PHASE|live-p )' "$log" || true
check "the live tests ran (6 expected, $ran seen) and cargo test passed" \
    test "$ran" -ge 6 -a "$status" -eq 0
if [ "$status" -ne 0 ]; then
    grep -E 'panicked|FAILED|^failures' "$log" | head -20
    tail -40 "$log"
fi
leftover=$(pgrep -f "$WORK/tmp/" || true)
check "no process of the control planes left running" test -z "$leftover"
for pid in $leftover; do stop_pid "$pid"; done
log "kube-live: $(($(date +%s) - started)) s in all"
finish

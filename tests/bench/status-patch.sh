#!/bin/bash
# 1000 Machines against a mock API server (in process, tower-test): time from a phase change in
# netboot's status store to that Machine's status patch reaching the API server (median, p99;
# one change at a time, then 800 at once), and the resident memory of the process. No network,
# no root needed. The benchmark is an ignored test of the agent (cluster::tests::bench).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo test --release --locked -p agent --lib -- --ignored --exact \
    cluster::tests::bench::status_patch_latency_1000_machines --nocapture 2>&1 |
    grep -E '^(machines|first status|phase change|resident memory|test result)'

#!/bin/bash
# Taking over a machine's provisioning from another host on the LAN, and flooding the logs.
#
# node3 is reserved at .23. An attacker namespace at .50 (its own MAC) forges a DHCP REQUEST with
# node3's MAC (netboot ACKs it: anyone can), then asks for node3's iPXE script: no token. With
# node3's real token (as if sniffed) it can neither report nor fetch meta-data or user-data.
# The real node3 (a client namespace with its MAC) takes its lease with udhcpc and, from its
# address, gets its script and token, reports Imaging while the attacker floods HTTP (user-data
# requests with node3's token), DHCP (DISCOVERs with node3's MAC, relayed packets from an address
# that is no configured relay, forged RELEASEs) and TFTP (write requests), then Imaged and fetches
# its user-data once right after the floods. netboot logs to a stand-in for journald's socket
# that drops records the way journald's default rate limit does (10000 per 30 s): every phase
# record must still be there (without netboot's own limits the floods' lines exceed that).
# Each refused HTTP request is either logged or counted in a "suppressed" line; the lines
# logged stay within their budgets for the time the floods took. Prints a table of the attacks;
# with ATTACK_ROWS=FILE it also writes them there in tests/attack.sh's columns (attack, load,
# figures, legitimate client, result; tab-separated), each row passing when its checks did:
# tests/attack.sh runs this test at its end and prints every attack of issue 11 in one table.
# Run as root after `cargo build -p agent`. Packages: busybox-static, curl, python3.
TEST_NAME=attack-hijack
. "$(dirname "$0")/lib.sh"

[ -x "$PROVISIONER" ] || { echo "FAIL $TEST_NAME: $PROVISIONER not built (cargo build -p agent)"; exit 1; }
N_HTTP=${N_HTTP:-8000}
N_DHCP=${N_DHCP:-5000}
N_RELEASE=${N_RELEASE:-500}
N_TFTP=${N_TFTP:-2000}

# checkr ROW DESCRIPTION CMD...: check, counted for a row of the table (verdict ROW...).
declare -A ROW_FAILED=()
checkr() {
    local row=$1 before=$FAILURES
    shift
    check "$@"
    [ "$FAILURES" = "$before" ] || ROW_FAILED[$row]=1
}
verdict() { local r; for r in "$@"; do [ -z "${ROW_FAILED[$r]:-}" ] || { echo FAIL; return; }; done; echo PASS; }

netns_up
MAC=52:54:00:cc:00:23
HMAC=${MAC//:/-}
IP=$SUBNET_PREFIX.23
ATTACKER=$SUBNET_PREFIX.50
SHA=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
BASE="http://$SRV_IP"
mkdir -p "$WORK/assets"
head -c 4096 /dev/urandom >"$WORK/assets/vmlinuz"
stub_boot_files "$WORK/assets" undionly.kpxe snponly.efi stage2.img
write_machine node3 "$MAC" "$IP"
write_config "$WORK/provisioner.yaml" "routerAdvertisements: false" \
    "boot: {kernel: vmlinuz, initrd: stage2.img, cmdline: console=ttyS0}" \
    "image: {url: \"http://$SRV_IP:8081/node.raw\", sha256: $SHA}" \
    "stateFile: $WORK/state.yaml"

# netboot with its stderr as "the journal stream", in a private mount namespace whose
# /run/systemd/journal/socket is the listener (as tests/journald.sh does). The listener and
# netboot write their PIDs; both are stopped by PID.
cat >"$WORK/inner.sh" <<EOF
set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal
python3 "$REPO/tests/journal-listener.py" /run/systemd/journal/socket "$WORK/journal.txt" 600 30:10000 &
echo \$! > "$WORK/listener.pid"
for _ in \$(seq 1 50); do [ -S /run/systemd/journal/socket ] && break; sleep 0.1; done
exec 2>"$WORK/stderr.log"
export JOURNAL_STREAM=\$(stat -L -c '%d:%i' /proc/self/fd/2)
echo \$\$ > "$WORK/netboot.pid"
exec "$PROVISIONER" netboot --config "$WORK/provisioner.yaml"
EOF
ip netns exec "$NS_SRV" unshare --mount --propagation private bash "$WORK/inner.sh" &
wait_for 10 test -s "$WORK/netboot.pid" || true
for name in listener netboot; do
    [ -s "$WORK/$name.pid" ] && track_pid "$(cat "$WORK/$name.pid")" "$name"
done
checkr node3 "netboot is ready, logging to the journal socket" wait_for 10 grep -q "netboot ready" "$WORK/journal.txt"

add_client vic "$MAC" >/dev/null; VICTIM=pv-cvic-$$
add_client atk >/dev/null; ATK=pv-catk-$$
ip netns exec "$ATK" ip addr add "$ATTACKER/24" dev eth0
atk() { ip netns exec "$ATK" "$@"; }
vic() { ip netns exec "$VICTIM" "$@"; }
# http_code NS CURL-ARGS...: the status code of one request
http_code() { local ns=$1; shift; ip netns exec "$ns" curl -s --max-time 10 -o "$WORK/body" -w '%{http_code}' "$@" || true; }
hijack_codes=() stolen_codes=() node3_codes=()  # the status codes of each step, for the table
REFUSED=0  # HTTP requests this test expects refused (each must be logged or counted as suppressed)
refused() { REFUSED=$((REFUSED + 1)); }
phase() { sed -n '/^  node3:/,/^  [^ ]/p' "$WORK/state.yaml" 2>/dev/null | sed -n 's/^    phase: //p'; }
phase_is() { [ "$(phase)" = "$1" ]; }
report() {  # NS TOKEN JSON: the status code
    http_code "$1" -X POST -H "Authorization: Bearer $2" -H 'Content-Type: application/json' \
        --data "$3" "$BASE/report/$HMAC"
}

# --- 1. the hijack of the issue: curl /ipxe/<node3's mac> from .50 ------------------------------
atk python3 "$REPO/tests/dhcp-client.py" eth0 "$MAC" request --requested "$IP" --server-id "$SRV_IP" \
    >"$WORK/forged-ack.out"
checkr hijack "the attacker's forged REQUEST with node3's MAC is ACKed (DHCP cannot tell)" grep -qx type=ack "$WORK/forged-ack.out"
code=$(http_code "$ATK" "$BASE/ipxe/$HMAC"); refused; hijack_codes+=("$code")
checkr hijack "hijack: GET /ipxe/$HMAC from $ATTACKER after the ACK is refused (403, got $code)" [ "$code" = 403 ]
checkr hijack "hijack: the answer gives the reason and no token" bash -c \
    "grep -q 'not come from the machine.s reserved address' '$WORK/body' && ! grep -q 'provisioner.token' '$WORK/body'"
checkr hijack "hijack: nothing was minted (no token hash in the state file)" bash -c \
    "sed -n '/^  node3:/,\$p' '$WORK/state.yaml' | grep -q 'phase:' && ! grep -q tokenSha256 '$WORK/state.yaml'"
FAKE=$(printf '%064d' 5)
code=$(report "$ATK" "$FAKE" '{"phase":"imaged"}'); refused; hijack_codes+=("$code")
checkr hijack "hijack: a report from $ATTACKER is refused (403, got $code)" [ "$code" = 403 ]
code=$(http_code "$ATK" "$BASE/nocloud/$FAKE/user-data"); refused; hijack_codes+=("$code")
checkr hijack "hijack: user-data for a guessed token is refused (403, got $code)" [ "$code" = 403 ]

# --- 2. the real node3: its lease, then its script from its own address -----------------------
checkr node3 "node3 takes its lease with udhcpc" udhcpc_bind "$VICTIM"
checkr node3 "node3 has its reserved address" bash -c "ip netns exec '$VICTIM' ip -4 addr show eth0 | grep -q 'inet $IP/'"
code=$(http_code "$VICTIM" "$BASE/ipxe/$HMAC"); node3_codes+=("$code")
cp "$WORK/body" "$WORK/script"
TOKEN=$(grep -o 'provisioner\.token=[^ ]*' "$WORK/script" | cut -d= -f2 || true)
checkr node3 "node3 gets its imaging script with a token (200, got $code)" bash -c "[ '$code' = 200 ] && grep -qE '^[0-9a-f]{64}\$' <<<'$TOKEN'"

# --- 3. node3's token in the attacker's hands (sniffed): useless from .50 ----------------------
code=$(report "$ATK" "$TOKEN" '{"phase":"imaged"}'); refused; stolen_codes+=("$code")
checkr token "stolen token: report imaged from $ATTACKER refused (403, got $code)" [ "$code" = 403 ]
code=$(http_code "$ATK" "$BASE/nocloud/$TOKEN/meta-data"); refused; stolen_codes+=("$code")
checkr token "stolen token: meta-data from $ATTACKER refused (403, got $code)" [ "$code" = 403 ]
code=$(http_code "$ATK" "$BASE/nocloud/$TOKEN/user-data"); refused; stolen_codes+=("$code")
checkr token "stolen token: user-data from $ATTACKER refused (403, got $code)" [ "$code" = 403 ]
checkr token "stolen token: node3 is still PXEBooting, no replay recorded" bash -c \
    "[ '$(phase)' = PXEBooting ] && ! grep -q userDataReplayed '$WORK/state.yaml'"

# --- 4. floods from the attacker while node3 provisions ----------------------------------------
cat >"$WORK/flood.py" <<'PYEOF'
"""flood.py KIND COUNT MAC SERVER: sends COUNT datagrams of KIND (discover, relayed, release: DHCP
with chaddr MAC; wrq: TFTP write requests) to SERVER; prints how many answers came back."""
import socket, struct, sys, time
kind, count, mac, server = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3].replace(":", "")), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
# Offers to a client without an address are broadcast to port 68: listen there to count them.
s.bind(("0.0.0.0", 68 if kind == "discover" else 0))
def dhcp(msg_type, ciaddr="0.0.0.0", giaddr="0.0.0.0", sid=None):
    hdr = struct.pack("!BBBBIHH4s4s4s4s16s64s128s4s", 1, 1, 6, 0, 0x5eed, 0, 0,
                      socket.inet_aton(ciaddr), bytes(4), bytes(4), socket.inet_aton(giaddr),
                      mac + bytes(10), bytes(64), bytes(128), b"\x63\x82\x53\x63")
    opts = bytes([53, 1, msg_type])
    if sid:
        opts += bytes([54, 4]) + socket.inet_aton(sid)
    return hdr + opts + b"\xff"
sub = server.rsplit(".", 1)[0]
packet, port = {
    "discover": (dhcp(1), 67),
    "relayed": (dhcp(1, giaddr=sub + ".77"), 67),
    "release": (dhcp(7, ciaddr=sub + ".23", sid=server), 67),
    "wrq": (b"\x00\x02flood.bin\x00octet\x00", 69),
}[kind]
for i in range(count):
    s.sendto(packet, (server, port))
    if i % 200 == 199:
        time.sleep(0.001)  # a burst of 200, then let the receiver breathe: bounded, not paced
answers, deadline = 0, time.monotonic() + 2
s.settimeout(0.2)
while time.monotonic() < deadline:
    try:
        s.recv(2048)
        answers += 1
    except socket.timeout:
        pass
print(answers)
PYEOF
# The stolen token's user-data, refused from .50 before and after node3 is imaged (its script
# is not: once imaged, /ipxe/node3 is the local-boot script, which carries no secret).
for i in $(seq 1 "$N_HTTP"); do printf 'url = "%s/nocloud/%s/user-data"\noutput = "/dev/null"\n' "$BASE" "$TOKEN"; done >"$WORK/flood.curl"
flood_start=$(date +%s.%N)
atk curl -s --max-time 300 -K "$WORK/flood.curl" -w '%{http_code}\n' >"$WORK/flood-http.codes" 2>/dev/null &
p_http=$!
atk python3 "$WORK/flood.py" discover "$N_DHCP" "$MAC" "$SRV_IP" >"$WORK/flood-discover.out" &
p_disc=$!
atk python3 "$WORK/flood.py" relayed "$N_DHCP" "$MAC" "$SRV_IP" >"$WORK/flood-relayed.out" &
p_rel=$!
atk python3 "$WORK/flood.py" release "$N_RELEASE" "$MAC" "$SRV_IP" >"$WORK/flood-release.out" &
p_rls=$!
atk python3 "$WORK/flood.py" wrq "$N_TFTP" "$MAC" "$SRV_IP" >"$WORK/flood-wrq.out" &
p_wrq=$!

# node3 provisions meanwhile, from its own address: Imaging during the floods, Imaged and its
# user-data right after them, when (without rate limits) the floods' lines would have used up
# journald's budget of the current 30 s.
legit_ok=0
for body in '{"phase":"imaging","progress":30}' '{"phase":"imaging","progress":60}'; do
    [ "$(report "$VICTIM" "$TOKEN" "$body")" = 204 ] && legit_ok=$((legit_ok + 1))
done
checkr node3 "node3 is Imaging during the floods" wait_for 10 phase_is Imaging
wait "$p_http" "$p_disc" "$p_rel" "$p_rls" "$p_wrq" || true
flood_end=$(date +%s.%N)
for body in '{"phase":"imaging","progress":100}' '{"phase":"imaged"}'; do
    [ "$(report "$VICTIM" "$TOKEN" "$body")" = 204 ] && legit_ok=$((legit_ok + 1))
done
checkr node3 "node3's four reports are accepted, during and after the floods ($legit_ok/4)" [ "$legit_ok" = 4 ]
checkr node3 "node3 is Imaged" wait_for 10 phase_is Imaged
code=$(http_code "$VICTIM" "$BASE/nocloud/$TOKEN/user-data"); node3_codes+=("$code")
checkr node3 "node3 gets its user-data from its address (200, got $code)" bash -c "[ '$code' = 200 ] && head -1 '$WORK/body' | grep -qx '#cloud-config'"
code=$(http_code "$VICTIM" "$BASE/nocloud/$TOKEN/user-data"); refused; node3_codes+=("$code")
checkr node3 "node3's user-data is served once (second fetch 403, got $code)" [ "$code" = 403 ]
flood_s=$(awk -v a="$flood_start" -v b="$flood_end" 'BEGIN{printf "%.1f", b-a}')
http_403=$(grep -cx 403 "$WORK/flood-http.codes" || true)
http_all=$(wc -l <"$WORK/flood-http.codes")
REFUSED=$((REFUSED + http_403))
checkr http "HTTP flood: all $N_HTTP user-data requests with node3's token from $ATTACKER refused ($http_403 × 403 of $http_all answers)" \
    [ "$http_403" = "$N_HTTP" ]
checkr node3 "node3 still Imaged after the floods" [ "$(phase)" = Imaged ]

# --- 5. the journal -----------------------------------------------------------------------------
# analyse: counts per kind of line and suppressed counts per site, from the captured records.
analyse() {
    python3 - "$WORK/journal.txt" <<'PYEOF'
import sys
records = [dict(l.split("=", 1) for l in r.split("\n") if "=" in l)
           for r in open(sys.argv[1]).read().split("\n\n") if r.strip()]
count = lambda pred: sum(1 for r in records if pred(r))
msg = lambda r: r.get("MESSAGE", "")
suppressed = {}
for r in records:
    if "SUPPRESSED" in r and "SITE" in r:
        suppressed[r["SITE"]] = suppressed.get(r["SITE"], 0) + int(r["SUPPRESSED"])
print("records", len(records))
print("http_refused_lines", count(lambda r: msg(r).startswith("HTTP request refused")))
print("dhcp_node3_lines", count(lambda r: r.get("MACHINE") == "node3" and msg(r).startswith(("DHCP reply sent", "DHCP lease event"))))
print("dhcp_refused_lines", count(lambda r: msg(r).startswith("DHCP packet refused")))
print("tftp_refused_lines", count(lambda r: msg(r).startswith("TFTP write request refused")))
for site in ["http refused", "dhcp machine", "dhcp refused", "tftp refused"]:
    print("suppressed_" + site.replace(" ", "_"), suppressed.get(site, 0))
phases = [r for r in records if r.get("MACHINE") == "node3" and "MESSAGE_ID" in r]
print("phases", " ".join(r.get("PREVIOUS_PHASE", "?") + ">" + r.get("PHASE", "?") + ":" + r["MESSAGE_ID"] for r in phases))
PYEOF
}
val() { sed -n "s/^$1 //p" "$WORK/analysis"; }
# Each refused request or packet is a line or counted in its site's next "suppressed" report,
# written at most 10 s (netboot::lograte::REPORT_PERIOD) after the first line it counts.
past_report_period() { [ "$(awk -v a="$flood_end" -v b="$(date +%s.%N)" 'BEGIN{printf "%d", b-a}')" -ge 11 ]; }
all_accounted() {
    analyse >"$WORK/analysis"
    [ $(( $(val http_refused_lines) + $(val suppressed_http_refused) )) -ge "$REFUSED" ]
}
wait_for 20 past_report_period || true
wait_for 30 all_accounted || true
stop_pid "$(cat "$WORK/netboot.pid")"
analyse >"$WORK/analysis"
log "journal: $(tr '\n' ' ' <"$WORK/analysis")"
dropped=$(cat "$WORK/journal.txt.dropped" 2>/dev/null || echo missing)
checkr journal "no record dropped by journald's default rate limit (dropped: $dropped)" [ "$dropped" = 0 ]
# The phase records, with the MESSAGE_IDs the README documents.
id() { grep "^| $1 |" "$REPO/README.md" | grep -o '[0-9a-f]\{32\}' | head -n 1; }
expected="new>Pending:$(id Pending) Pending>PXEBooting:$(id PXEBooting) PXEBooting>Imaging:$(id Imaging) Imaging>Imaged:$(id Imaged)"
checkr journal "every phase record of node3 is in the journal, in order: $(val phases | sed 's/:[0-9a-f]*//g')" \
    [ "$(val phases)" = "$expected" ]
checkr journal "the log never shows the token" bash -c "! grep -q '$TOKEN' '$WORK/journal.txt' '$WORK/stderr.log'"
lines=$(val http_refused_lines); supp=$(val suppressed_http_refused)
checkr http "each refused HTTP request is logged or counted as suppressed ($lines + $supp = $REFUSED)" \
    [ $((lines + supp)) = "$REFUSED" ]
checkr http "refused HTTP requests are logged with peer, machine and mac" bash -c \
    "awk -v RS= '/MESSAGE=HTTP request refused/ && /PEER=$ATTACKER:/ && /MACHINE=node3/ && /MAC=$MAC/' '$WORK/journal.txt' | grep -q ."
# Budgets (netboot::lograte, set in the servers): burst + rate × seconds the floods and the wait took.
secs=$(awk -v a="$flood_start" -v b="$(date +%s.%N)" 'BEGIN{printf "%d", b-a+2}')
within() { [ "$1" -le $(( $2 + $3 * secs )) ]; }
checkr http "refused-request lines within their budget (≤ 50 + 5/s over ${secs}s: $lines)" within "$lines" 50 5
checkr dhcp "node3's DHCP lines within its budget (≤ 20 + 1/s: $(val dhcp_node3_lines))" within "$(val dhcp_node3_lines)" 20 1
checkr dhcp "refused DHCP packet lines within their budget (≤ 50 + 5/s: $(val dhcp_refused_lines))" within "$(val dhcp_refused_lines)" 50 5
checkr tftp "TFTP refusal lines within their budget (≤ 50 + 5/s: $(val tftp_refused_lines))" within "$(val tftp_refused_lines)" 50 5
checkr dhcp "the DHCP packets forged by the attacker were all refused, none recorded (no DhcpReleased)" bash -c \
    "! grep -q 'EVENT=DhcpReleased' '$WORK/journal.txt'"

printf '\n%-52s %8s %8s %8s %9s %10s\n' "attack (from $ATTACKER unless said)" sent refused served "log lines" suppressed
row() { printf '%-52s %8s %8s %8s %9s %10s\n' "$@"; }
row "forged DHCP REQUEST with node3's MAC" 1 0 1 - -
row "GET /ipxe/node3 after that ACK (hijack)" 1 1 0 - -
row "report + user-data with a guessed token" 2 2 0 - -
row "report + meta-data + user-data with node3's token" 3 3 0 - -
row "HTTP flood: GET user-data with node3's token" "$N_HTTP" "$http_403" $((http_all - http_403)) - -
row "  all refused HTTP requests (incl. above, replay)" "$REFUSED" "$REFUSED" 0 "$lines" "$supp"
row "DHCP flood: DISCOVER with node3's MAC (offers seen)" "$N_DHCP" 0 "$(cat "$WORK/flood-discover.out")" "$(val dhcp_node3_lines)" "$(val suppressed_dhcp_machine)"
dhcp_refused=$(( $(val dhcp_refused_lines) + $(val suppressed_dhcp_refused) ))
row "DHCP flood: relayed, giaddr not a relay" "$N_DHCP" - 0 - -
row "DHCP flood: RELEASE for node3 (ciaddr .23)" "$N_RELEASE" - 0 - -
row "  the two above, as netboot counted them (*)" $((N_DHCP + N_RELEASE)) "$dhcp_refused" 0 "$(val dhcp_refused_lines)" "$(val suppressed_dhcp_refused)"
row "TFTP flood: WRQ (error answers seen)" "$N_TFTP" "$(cat "$WORK/flood-wrq.out")" 0 "$(val tftp_refused_lines)" "$(val suppressed_tftp_refused)"
# node3's script, its four reports (204 each) and its two user-data fetches (200, then 403).
node3_served=$(( legit_ok + $(printf '%s\n' "${node3_codes[@]:0:2}" | grep -cx 200 || true) ))
node3_refused=$(printf '%s\n' "${node3_codes[@]:2}" | grep -cx 403 || true)
row "node3 itself, from $IP: script, 4 reports, user-data x2" 7 "$node3_refused" "$node3_served" - -
printf 'floods took %ss; journal records: %s, dropped by the journald rate limit: %s\n' "$flood_s" "$(val records)" "$dropped"
printf '(*) refused = logged + suppressed; fewer than sent when the kernel dropped datagrams of the burst\n\n'

# The same attacks in tests/attack.sh's columns: attack, load, figures, legitimate client, result.
if [ -n "${ATTACK_ROWS:-}" ]; then
    legit="node3: $node3_served/6 served, $(phase)"
    codes() { local IFS=/; echo "$*"; }
    {
        printf '%s\t%s\t%s\t%s\t%s\n' hijack "forged ACK + /ipxe/node3 from .50" \
            "script, report, user-data: $(codes "${hijack_codes[@]}"); no token minted" "$legit" "$(verdict hijack node3)"
        printf '%s\t%s\t%s\t%s\t%s\n' "stolen token" "node3's token, from .50" \
            "report, meta-data, user-data: $(codes "${stolen_codes[@]}"); no replay" "$legit" "$(verdict token node3)"
        printf '%s\t%s\t%s\t%s\t%s\n' "HTTP refusals" "$N_HTTP user-data GETs from .50" \
            "$http_403 x 403; all $REFUSED refused: $lines logged + $supp suppressed" "$legit" "$(verdict http node3)"
        printf '%s\t%s\t%s\t%s\t%s\n' "DHCP floods" "$N_DHCP+$N_DHCP+$N_RELEASE DHCP from .50" \
            "DISCOVER: $(cat "$WORK/flood-discover.out") offers; relayed+RELEASE: $dhcp_refused refused, 0 recorded" "$legit" "$(verdict dhcp node3)"
        printf '%s\t%s\t%s\t%s\t%s\n' "TFTP WRQs" "$N_TFTP write requests from .50" \
            "$(cat "$WORK/flood-wrq.out") errors seen; $(val tftp_refused_lines) logged + $(val suppressed_tftp_refused) suppressed" "$legit" "$(verdict tftp node3)"
        printf '%s\t%s\t%s\t%s\t%s\n' "log flood" "all of the above, ${flood_s}s" \
            "journald limit 10000/30s: $(val records) records, $dropped dropped; $(val phases | wc -w)/4 phases" "$legit" "$(verdict journal node3)"
    } >>"$ATTACK_ROWS"
fi

finish

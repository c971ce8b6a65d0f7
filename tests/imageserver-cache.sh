#!/usr/bin/env bash
# The bootstrap imageserver and the laptop's pull-through cache, with curl as the client, in
# namespaces this test creates. Run as root.
#
#   srv namespace ($SRV_IP:8000)   the operator's host: `provisioner imageserver --dir ART
#                                  --bootstrap SEED` (artifacts + the laptop's NoCloud seed)
#   laptop namespace (:8081)       `provisioner imageserver --dir CACHE --upstream http://$SRV_IP:8000/`
#   node namespace                 curl, as stage2 and cloud-init would
#
# Checks: the seed fetched the way cloud-init 22.4 does (meta-data, user-data, vendor-data),
# also rendered from a configuration (--bootstrap --config); a miss fetched once (concurrent
# clients included), byte-exact, then served from the cache with Range/ETag after the
# bootstrap imageserver is gone; a wrong sha256 upstream is a 502 that leaves nothing in the
# cache; traversal refused.
TEST_NAME=imgcache
# shellcheck source=tests/lib.sh
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || { echo "FAIL $TEST_NAME: must run as root"; exit 1; }
for tool in curl sha256sum ip python3 cmp; do
    command -v "$tool" >/dev/null || { echo "FAIL $TEST_NAME: $tool not installed"; exit 1; }
done
[ -x "$PROVISIONER" ] || { echo "FAIL $TEST_NAME: build provisioner first ($PROVISIONER)"; exit 1; }

BOOT_PORT=8000
CACHE_PORT=8081
LAPTOP_IP=$SUBNET_PREFIX.10
NODE_IP=$SUBNET_PREFIX.20
BOOT="http://$SRV_IP:$BOOT_PORT"
CACHE_URL="http://$LAPTOP_IP:$CACHE_PORT"
ART=$WORK/artifacts
SEED=$WORK/seed
CACHE=$WORK/cache
mkdir -p "$ART" "$SEED/laptop" "$CACHE"

# Artifacts as image-builder/build.sh lays them out, with its manifest's shape.
head -c 12000000 /dev/urandom >"$ART/image.raw.zst"
head -c 3000000 /dev/urandom >"$ART/vmlinuz"
head -c 1500000 /dev/urandom >"$ART/stage2.img"
write_manifest() { # write_manifest [WRONG_FILE]: sha256 of WRONG_FILE deliberately wrong
    python3 - "$ART" "${1:-}" <<'EOF'
import hashlib, json, os, sys
art, wrong = sys.argv[1:3]
def describe(name):
    data = open(os.path.join(art, name), "rb").read()
    digest = hashlib.sha256(data).hexdigest()
    if name == wrong:
        digest = hashlib.sha256(b"something else").hexdigest()
    return {"file": name, "size": len(data), "sha256": digest}
manifest = {"profile": "debian-test", "image": describe("image.raw.zst"),
            "kernel": describe("vmlinuz"), "initrd": describe("stage2.img")}
open(os.path.join(art, "manifest.json"), "w").write(json.dumps(manifest, indent=2) + "\n")
EOF
}
write_manifest
printf 'instance-id: laptop-1\nlocal-hostname: laptop\n' >"$SEED/laptop/meta-data"
printf '#cloud-config\nhostname: laptop\nruncmd:\n  - [touch, /etc/provisioner/enabled]\n' >"$SEED/laptop/user-data"

netns_up
LAPTOP_NS=$(add_client laptop)
NODE_NS=$(add_client node)
ip netns exec "$LAPTOP_NS" ip addr add "$LAPTOP_IP/24" dev eth0
ip netns exec "$NODE_NS" ip addr add "$NODE_IP/24" dev eth0

wait_ready() { wait_for 10 grep -q "imageserver ready" "$WORK/$1.log"; } # NAME
from_node() { ip netns exec "$NODE_NS" curl -sS --max-time 30 "$@"; }
from_laptop() { ip netns exec "$LAPTOP_NS" curl -sS --max-time 30 "$@"; }
status_of() { from_node -o /dev/null -w '%{http_code}' "$@"; }
# upstream_gets PATH: the bootstrap imageserver's GETs of PATH from the laptop's cache.
upstream_gets() { grep -cE "peer=$LAPTOP_IP:[0-9]+ method=GET path=$1 status=200" "$WORK/bootstrap.log" || true; }
# upstream_got PATH: the bootstrap imageserver has logged its GET of PATH (it logs once the
# response is sent, which may be just after the client has it all)
upstream_got() { [ "$(upstream_gets "$1")" -ge 1 ]; }
cache_listing() { (cd "$CACHE" && find . -mindepth 1 | sort | tr '\n' ' '); }

start_in "$NS_SRV" bootstrap "$PROVISIONER" imageserver --dir "$ART" --bootstrap "$SEED" --listen "$SRV_IP:$BOOT_PORT" >/dev/null
check "bootstrap imageserver is ready" wait_ready bootstrap
start_in "$LAPTOP_NS" cache "$PROVISIONER" imageserver --dir "$CACHE" --upstream "$BOOT/" --listen "$LAPTOP_IP:$CACHE_PORT" >/dev/null
check "laptop's imageserver (pull-through) is ready" wait_ready cache

# --- the seed, as cloud-init 22.4's NoCloud (ds=nocloud-net;s=$BOOT/nocloud/laptop/) asks ----
UA="Cloud-Init/22.4.2"
for f in meta-data user-data; do
    from_laptop -A "$UA" -o "$WORK/got-$f" -w '%{http_code}' "$BOOT/nocloud/laptop/$f" >"$WORK/code-$f"
    check "seed: $f is 200 and byte-exact" bash -c "[ \"\$(cat '$WORK/code-$f')\" = 200 ] && cmp -s '$WORK/got-$f' '$SEED/laptop/$f'"
done
code=$(from_laptop -A "$UA" -o "$WORK/got-vd" -w '%{http_code}' "$BOOT/nocloud/laptop/vendor-data")
check "seed: vendor-data is an empty 200 (a 404 makes cloud-init 22.4 retry for 10 s)" \
    bash -c "[ '$code' = 200 ] && [ ! -s '$WORK/got-vd' ]"
check "seed: network-config not provided: 404" \
    [ "$(from_laptop -o /dev/null -w '%{http_code}' "$BOOT/nocloud/laptop/network-config")" = 404 ]
check "seed: another machine's name: 404" \
    [ "$(from_laptop -o /dev/null -w '%{http_code}' "$BOOT/nocloud/node9/user-data")" = 404 ]
check "seed: traversal out of the seed refused (400)" \
    [ "$(from_laptop --path-as-is -o /dev/null -w '%{http_code}' "$BOOT/nocloud/../seed/laptop/user-data")" = 400 ]
check "seed fetches logged with the client's address and the file" wait_for 10 \
    grep -qE "peer=$LAPTOP_IP:[0-9]+ method=GET path=/nocloud/laptop/user-data status=200 .*machine=laptop" "$WORK/bootstrap.log"

# --bootstrap --config: the seed rendered from the laptop: section (name = its hostname).
start_in "$NS_SRV" bootstrap-config "$PROVISIONER" imageserver --dir "$ART" --bootstrap \
    --config "$REPO/provisioner.yaml.example" --listen "$SRV_IP:8002" >/dev/null
check "bootstrap imageserver with --config is ready" wait_ready bootstrap-config
"$PROVISIONER" cloud-config laptop --config "$REPO/provisioner.yaml.example" >"$WORK/rendered-user-data"
from_laptop -A "$UA" -o "$WORK/got-rendered" "http://$SRV_IP:8002/nocloud/seed/user-data"
check "rendered seed: user-data is what 'provisioner cloud-config laptop' prints" \
    cmp -s "$WORK/got-rendered" "$WORK/rendered-user-data"
check "rendered seed: meta-data names the laptop" \
    bash -c "ip netns exec '$LAPTOP_NS' curl -fsS 'http://$SRV_IP:8002/nocloud/seed/meta-data' | grep -q 'local-hostname: *\"\\?seed'"

# --- pull-through: a miss is fetched once, then a hit ---------------------------------------
t0=$(date +%s%N)
from_node -o "$WORK/img1" "$CACHE_URL/image.raw.zst"
t1=$(date +%s%N)
check "miss: image served byte-exact through the cache" cmp -s "$WORK/img1" "$ART/image.raw.zst"
check "miss: the image is now in the cache directory, nothing else" \
    [ "$(cache_listing)" = "./image.raw.zst " ]
check "miss: the log says it was checked against the manifest's sha256" wait_for 10 \
    grep -q 'fetched from upstream into the cache.*checked="manifest sha256"' "$WORK/cache.log"
t2=$(date +%s%N)
from_node -o "$WORK/img2" "$CACHE_URL/image.raw.zst"
t3=$(date +%s%N)
check "hit: byte-exact" cmp -s "$WORK/img2" "$ART/image.raw.zst"
wait_for 10 upstream_got /image.raw.zst || true
check "hit: the bootstrap imageserver was asked once" [ "$(upstream_gets /image.raw.zst)" = 1 ]
log "12 MB image: miss $(((t1 - t0) / 1000000)) ms, hit $(((t3 - t2) / 1000000)) ms"

# Concurrent misses share one download.
# (a plain `wait` would also wait for the servers this shell started)
fetches=()
for i in 1 2 3 4; do
    from_node -o "$WORK/vmlinuz.$i" "$CACHE_URL/vmlinuz" &
    fetches+=($!)
done
wait "${fetches[@]}" || true
ok=1
for i in 1 2 3 4; do cmp -s "$WORK/vmlinuz.$i" "$ART/vmlinuz" || ok=0; done
check "4 concurrent misses: all byte-exact" [ "$ok" = 1 ]
wait_for 10 upstream_got /vmlinuz || true
check "4 concurrent misses: one upstream GET" [ "$(upstream_gets /vmlinuz)" = 1 ]

# --- the operator's host goes away ----------------------------------------------------------
stop_pid "$(cat "$WORK/bootstrap.pid")"
check "bootstrap imageserver stopped" bash -c "! ip netns exec '$NODE_NS' curl -s --max-time 2 -o /dev/null '$BOOT/vmlinuz'"
from_node -o "$WORK/img3" -D "$WORK/img3.hdr" "$CACHE_URL/image.raw.zst"
check "upstream gone: cached image still served byte-exact" cmp -s "$WORK/img3" "$ART/image.raw.zst"
size=$(stat -c %s "$ART/image.raw.zst")
range_ok() { # range_ok RANGE START COUNT
    local hdr=$WORK/range.hdr
    from_node -r "$1" -o "$WORK/range" -D "$hdr" "$CACHE_URL/image.raw.zst" || return 1
    grep -q '^HTTP/1.1 206' "$hdr" || return 1
    grep -qi "^content-range: bytes $2-$(($2 + $3 - 1))/$size" "$hdr" || return 1
    cmp -s "$WORK/range" <(tail -c +"$(($2 + 1))" "$ART/image.raw.zst" | head -c "$3")
}
check "upstream gone: Range 0-0" range_ok 0-0 0 1
check "upstream gone: Range 1000000-1999999" range_ok 1000000-1999999 1000000 1000000
check "upstream gone: Range -4096 (suffix)" range_ok -4096 $((size - 4096)) 4096
check "upstream gone: Range 11999990- (to the end)" range_ok 11999990- 11999990 $((size - 11999990))
check "upstream gone: Range beyond the end is 416" [ "$(status_of -r "$size-" "$CACHE_URL/image.raw.zst")" = 416 ]
etag=$(grep -i '^etag:' "$WORK/img3.hdr" | cut -d' ' -f2 | tr -d '\r')
check "upstream gone: If-None-Match with the ETag is 304" \
    [ "$(status_of -H "If-None-Match: $etag" "$CACHE_URL/image.raw.zst")" = 304 ]
check "upstream gone: a file never fetched is a 502" [ "$(status_of "$CACHE_URL/stage2.img")" = 502 ]
check "upstream gone: nothing half-written in the cache" \
    [ "$(cache_listing)" = "./image.raw.zst ./vmlinuz " ]

# --- a corrupt upstream: wrong sha256 ----------------------------------------------------------
write_manifest stage2.img
start_in "$NS_SRV" bootstrap2 "$PROVISIONER" imageserver --dir "$ART" --bootstrap "$SEED" --listen "$SRV_IP:$BOOT_PORT" >/dev/null
check "bootstrap imageserver is back (with a wrong sha256 for stage2.img)" wait_ready bootstrap2
check "wrong sha256 upstream: 502" [ "$(status_of "$CACHE_URL/stage2.img")" = 502 ]
check "wrong sha256 upstream: the reason is logged" wait_for 10 grep -q 'stage2.img.*sha256 mismatch' "$WORK/cache.log"
check "wrong sha256 upstream: no file, no temporary file left" \
    [ "$(cache_listing)" = "./image.raw.zst ./vmlinuz " ]
write_manifest
from_node -o "$WORK/stage2" "$CACHE_URL/stage2.img"
check "manifest fixed upstream: fetched and byte-exact" cmp -s "$WORK/stage2" "$ART/stage2.img"

# --- confinement --------------------------------------------------------------------------------
check "traversal ../ refused (400)" [ "$(status_of --path-as-is "$CACHE_URL/../../etc/passwd")" = 400 ]
check "traversal %2e%2e refused (400)" [ "$(status_of --path-as-is "$CACHE_URL/%2e%2e/etc/passwd")" = 400 ]
check "hidden (temporary) names are never served (404)" [ "$(status_of "$CACHE_URL/.fetch-x")" = 404 ]
check "no directory listing (404)" [ "$(status_of "$CACHE_URL/")" = 404 ]
finish

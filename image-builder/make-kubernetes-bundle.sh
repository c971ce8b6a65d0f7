#!/bin/bash
# Makes a Kubernetes bundle (image-builder/README.md, "Kubernetes bundle") from the official
# release binaries, where the internet is reachable; the kubeadm profiles then build images
# from it with no network access to Kubernetes at all.
#
#   image-builder/make-kubernetes-bundle.sh --version v1.32.0 --release-url URL \
#       --etcd-url URL --out DIR [--images]
#
#   --release-url URL  base of the Kubernetes release downloads, as the Kubernetes
#                      documentation gives it: the binaries are fetched from
#                      URL/VERSION/bin/linux/amd64/NAME and checked against NAME.sha256 there
#   --etcd-url URL     base of the etcd release downloads: URL/vX.Y.Z/etcd-vX.Y.Z-linux-amd64.tar.gz
#                      (the version kubeadm asks for, from `kubeadm config images list`) and
#                      its SHA256SUMS beside it
#   --images           also copy every image `kubeadm config images list` names, CoreDNS
#                      included, from its registry into DIR/images/ (skopeo, docker-archive
#                      with the image's name); the image builder then imports them as they are
#                      instead of making them from the binaries
#
# The pause image has no released binary: without --images the bundle has no `pause` and the
# image builder stops; give --images, or put a pause binary built from the Kubernetes tree
# (build/pause) into DIR and add its line to SHA256SUMS.
#
# Not tested where this script lives: that network reaches no Kubernetes release download and
# no registry. Needs curl, zstd, tar, sha256sum, and skopeo for --images.
set -euo pipefail

VERSION= RELEASE_URL= ETCD_URL= OUT= IMAGES=0
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --version) VERSION=$2; shift 2 ;;
        --release-url) RELEASE_URL=${2%/}; shift 2 ;;
        --etcd-url) ETCD_URL=${2%/}; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --images) IMAGES=1; shift ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[ -n "$VERSION" ] && [ -n "$RELEASE_URL" ] && [ -n "$ETCD_URL" ] && [ -n "$OUT" ] || usage
case $VERSION in v[0-9]*.[0-9]*.[0-9]*) ;; *) echo "--version: a release such as v1.32.0" >&2; exit 2 ;; esac
for tool in curl zstd tar sha256sum; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 1; }
done
[ "$IMAGES" = 0 ] || command -v skopeo >/dev/null || { echo "--images needs skopeo" >&2; exit 1; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# fetch URL FILE: downloads with retries, failing on HTTP errors.
fetch() { curl -fsSL --retry 3 -o "$2" "$1"; }

for name in kubeadm kubelet kubectl kube-apiserver kube-controller-manager kube-scheduler kube-proxy; do
    url=$RELEASE_URL/$VERSION/bin/linux/amd64/$name
    echo "fetching $url" >&2
    fetch "$url" "$work/$name"
    fetch "$url.sha256" "$work/$name.sha256"
    [ "$(sha256sum "$work/$name" | cut -d' ' -f1)" = "$(tr -d ' \n' < "$work/$name.sha256")" ] \
        || { echo "$name: sha256 does not match $url.sha256" >&2; exit 1; }
    chmod 0755 "$work/$name"
done

# etcd: the version kubeadm of this release runs (registry.k8s.io/etcd:3.5.16-0 → v3.5.16).
etcd_tag=$("$work/kubeadm" config images list --kubernetes-version "$VERSION" | sed -n 's|.*/etcd:||p')
etcd_version=v${etcd_tag%-*}
tarball=etcd-$etcd_version-linux-amd64.tar.gz
echo "fetching $ETCD_URL/$etcd_version/$tarball" >&2
fetch "$ETCD_URL/$etcd_version/$tarball" "$work/$tarball"
fetch "$ETCD_URL/$etcd_version/SHA256SUMS" "$work/etcd.SHA256SUMS"
(cd "$work" && grep " $tarball\$" etcd.SHA256SUMS | sha256sum -c --quiet -) \
    || { echo "$tarball: sha256 does not match its SHA256SUMS" >&2; exit 1; }
tar -xzf "$work/$tarball" -C "$work" --strip-components=1 "etcd-$etcd_version-linux-amd64/etcd" \
    "etcd-$etcd_version-linux-amd64/etcdctl"

: > "$OUT/SHA256SUMS"
for name in kubeadm kubelet kubectl kube-apiserver kube-controller-manager kube-scheduler kube-proxy etcd etcdctl; do
    (cd "$work" && sha256sum "$name") >> "$OUT/SHA256SUMS"
    zstd -q -19 -f "$work/$name" -o "$OUT/$name.zst"
done

if [ "$IMAGES" = 1 ]; then
    mkdir -p "$OUT/images"
    for image in $("$work/kubeadm" config images list --kubernetes-version "$VERSION"); do
        file=$(basename "${image%:*}").tar
        echo "copying $image" >&2
        skopeo copy --override-os linux --override-arch amd64 "docker://$image" \
            "docker-archive:$OUT/images/$file:$image"
    done
fi
echo "bundle for Kubernetes $VERSION in $OUT" >&2

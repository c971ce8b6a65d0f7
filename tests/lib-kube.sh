# The Kubernetes bundle (sourced, not run; needs only bash, zstd and sha256sum): a directory of
# zstd-compressed Kubernetes and etcd binaries with a SHA256SUMS of the decompressed files
# (`NAME.zst` for each NAME listed there).
#
#   kube_bundle_dir   prints the bundle directory: $KUBERNETES_BUNDLE when set, else the first of
#                     REPO/../shared/kubernetes, the same beside the git origin when origin is a
#                     local path, and shared/kubernetes in any parent directory of the repository
#   kube_unpack       unpacks the bundle once into a cache directory keyed by its SHA256SUMS,
#                     checks every file's sha256 (each time: a mismatch fails) and prints the
#                     directory of the binaries
#
# Both print the reason to stderr and return 1 when they cannot.

KUBE_CACHE_ROOT=${KUBE_CACHE_ROOT:-/var/tmp/provisioner-test-cache}
_KUBE_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

_kube_is_bundle() { [ -f "$1/SHA256SUMS" ]; }

kube_bundle_dir() {
    local dir url parent
    if [ -n "${KUBERNETES_BUNDLE:-}" ]; then
        # Named explicitly: a wrong name is an error, not a reason to look elsewhere.
        _kube_is_bundle "$KUBERNETES_BUNDLE" || {
            echo "KUBERNETES_BUNDLE=$KUBERNETES_BUNDLE has no SHA256SUMS" >&2
            return 1
        }
        (cd "$KUBERNETES_BUNDLE" && pwd)
        return
    fi
    local candidates=("$_KUBE_REPO/../shared/kubernetes")
    # A clone of a local repository (git clone /path/to/repo): the bundle beside the origin.
    url=$(git -C "$_KUBE_REPO" remote get-url origin 2>/dev/null || true)
    url=${url#file://}
    case "$url" in
        /*) candidates+=("$url/../shared/kubernetes") ;;
        ./* | ../*) candidates+=("$_KUBE_REPO/$url/../shared/kubernetes") ;;
    esac
    parent=$(dirname "$_KUBE_REPO")
    while :; do
        candidates+=("${parent%/}/shared/kubernetes")
        [ "$parent" = / ] && break
        parent=$(dirname "$parent")
    done
    for dir in "${candidates[@]}"; do
        if _kube_is_bundle "$dir"; then
            (cd "$dir" && pwd)
            return
        fi
    done
    echo "no Kubernetes bundle found (set KUBERNETES_BUNDLE); looked in: ${candidates[*]}" >&2
    return 1
}

kube_unpack() {
    local bundle key dir tmp name
    bundle=$(kube_bundle_dir) || return 1
    key=$(sha256sum "$bundle/SHA256SUMS" | cut -c1-16)
    dir=$KUBE_CACHE_ROOT/kubernetes-$key
    if [ ! -f "$dir/SHA256SUMS" ]; then
        mkdir -p "$KUBE_CACHE_ROOT"
        tmp=$(mktemp -d "$KUBE_CACHE_ROOT/.kubernetes-$key.XXXXXX") || return 1
        while read -r _ name; do
            [ -n "$name" ] || continue
            if ! zstd -q -d -f "$bundle/$name.zst" -o "$tmp/$name"; then
                echo "cannot unpack $bundle/$name.zst" >&2
                rm -rf "$tmp"
                return 1
            fi
            chmod 0755 "$tmp/$name"
        done <"$bundle/SHA256SUMS"
        cp "$bundle/SHA256SUMS" "$tmp/SHA256SUMS"
        # Another run may have unpacked the same bundle meanwhile: keep the first.
        mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
    fi
    if ! (cd "$dir" && sha256sum --quiet --strict -c SHA256SUMS >&2); then
        echo "sha256 mismatch in $dir (unpacked from $bundle): remove it to unpack again" >&2
        return 1
    fi
    echo "$dir"
}

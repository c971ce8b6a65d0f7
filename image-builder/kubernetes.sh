# Kubernetes from a bundle directory, for the kubeadm profiles (sourced by a profile, which is
# sourced by build.sh: `die`, `step`, `$OUT` and `$KUBERNETES_BUNDLE` come from there).
#
# The bundle (format in image-builder/README.md, "Kubernetes bundle"): the kubeadm, kubelet,
# kubectl, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, pause and etcd
# binaries, each plain or zstd-compressed (NAME.zst), a SHA256SUMS of the plain files, and
# optionally images/*.tar, image archives imported as they are (CoreDNS, say).
#
# What goes into the image:
#   /usr/bin/{kubeadm,kubelet,kubectl}, kubelet.service + kubelet.service.d/10-kubeadm.conf
#   /etc/containerd/config.toml (systemd cgroups, the bundle's pause image, Debian's CNI dir)
#   every image `kubeadm config images list` names, made here from the bundle's binaries as OCI
#     archives (umoci), plus the bundle's own archives, imported into containerd's k8s.io
#     namespace at build time (/var/lib/containerd: containerd runs in the rootfs for that);
#     /usr/share/provisioner/kubernetes/images.txt lists "NAME ARCHIVE" per line
#   provisioner-kubernetes-images.service: checks at boot, before the kubelet and cloud-init's
#     final stage (kubeadm) run, that every listed image is in containerd
#   modules-load.d and sysctl.d for kubeadm's preflight (br_netfilter, overlay, ip_forward)
#   provisioner-pod-network.path: `provisioner pod-network` once the kubelet has a kubeconfig

KUBE_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The node tools, always from binaries; the images' binaries only where the bundle's images/
# does not carry that image.
KUBE_NODE_BINARIES=(kubeadm kubelet kubectl)
KUBE_IMAGE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy pause etcd)

# bundle_image_names: the names the bundle's images/*.tar carry, one per line.
bundle_image_names() {
    local file
    for file in "$KUBERNETES_BUNDLE"/images/*.tar; do
        [ -f "$file" ] && archive_names "$file"
    done
    return 0
}

# kube_binaries: the binaries this bundle must have.
kube_binaries() {
    local names b
    names=$(bundle_image_names)
    printf '%s\n' "${KUBE_NODE_BINARIES[@]}"
    for b in "${KUBE_IMAGE_BINARIES[@]}"; do
        printf '%s\n' "$names" | grep -q "/$b:" || echo "$b"
    done
}

# kubernetes_preflight: the bundle and the tools, before anything is built.
kubernetes_preflight() {
    [ -n "$KUBERNETES_BUNDLE" ] || die "profile $PROFILE needs --kubernetes DIR (a Kubernetes bundle, see image-builder/README.md)"
    [ -d "$KUBERNETES_BUNDLE" ] || die "--kubernetes $KUBERNETES_BUNDLE: no such directory"
    [ -f "$KUBERNETES_BUNDLE/SHA256SUMS" ] || die "--kubernetes $KUBERNETES_BUNDLE: no SHA256SUMS"
    local b
    for b in umoci zstd python3 tar; do
        command -v "$b" >/dev/null || die "$b is not installed (tests/install-deps.sh installs it)"
    done
    for b in $(kube_binaries); do
        [ -f "$KUBERNETES_BUNDLE/$b" ] || [ -f "$KUBERNETES_BUNDLE/$b.zst" ] \
            || die "--kubernetes $KUBERNETES_BUNDLE: no $b (or $b.zst), and no images/*.tar carries its image"
        grep -qE "^[0-9a-f]{64}  \*?$b\$" "$KUBERNETES_BUNDLE/SHA256SUMS" \
            || die "--kubernetes $KUBERNETES_BUNDLE: SHA256SUMS has no line for $b"
    done
}

# kubernetes_unpack DIR: the bundle's binaries, decompressed and checked against SHA256SUMS.
kubernetes_unpack() {
    local dest=$1 b binaries
    mkdir -p "$dest"
    binaries=$(kube_binaries)
    for b in $binaries; do
        if [ -f "$KUBERNETES_BUNDLE/$b.zst" ]; then
            zstd -q -d -f "$KUBERNETES_BUNDLE/$b.zst" -o "$dest/$b"
        else
            cp "$KUBERNETES_BUNDLE/$b" "$dest/$b"
        fi
        chmod 0755 "$dest/$b"
    done
    (cd "$dest" && grep -E "  \*?($(echo $binaries | tr ' ' '|'))\$" "$KUBERNETES_BUNDLE/SHA256SUMS" \
        | sha256sum --quiet -c -) || die "the bundle's binaries do not match its SHA256SUMS"
}

# archive_names FILE: the image names an image archive carries (OCI index annotations, or a
# docker-archive's RepoTags).
archive_names() {
    python3 - "$1" <<'EOF'
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    names = t.getnames()
    if "index.json" in names:
        for m in json.load(t.extractfile("index.json")).get("manifests", []):
            a = m.get("annotations", {})
            name = a.get("io.containerd.image.name") or a.get("org.opencontainers.image.ref.name")
            if name:
                print(name)
    elif "manifest.json" in names:
        for m in json.load(t.extractfile("manifest.json")):
            for tag in m.get("RepoTags") or []:
                print(tag)
EOF
}

# oci_archive NAME STAGE OUT [ENTRYPOINT]: an OCI archive of one layer holding the tree STAGE,
# named NAME for containerd (index annotation io.containerd.image.name; the tag as
# org.opencontainers.image.ref.name). umoci writes the layout; tar makes it one file.
oci_archive() {
    local name=$1 stage=$2 out=$3 entrypoint=${4:-}
    local tag=${name##*:} layout
    layout=$(mktemp -d "$OUT/oci.XXXXXX")
    umoci init --layout "$layout/l"
    umoci new --image "$layout/l:$tag"
    umoci insert --image "$layout/l:$tag" "$stage" /
    local config=(--architecture amd64 --os linux --author provisioner-image-builder
        --config.env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin)
    [ -n "$entrypoint" ] && config+=(--config.entrypoint "$entrypoint")
    umoci config --image "$layout/l:$tag" "${config[@]}"
    umoci gc --layout "$layout/l"
    python3 - "$layout/l/index.json" "$name" <<'EOF'
import json, sys
path, name = sys.argv[1:3]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = name
json.dump(index, open(path, "w"))
EOF
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$layout/l" \
        -cf "$out" oci-layout index.json blobs
    rm -rf "$layout"
}

# copy_with_libs ROOT STAGE FILE...: FILE (a path inside ROOT) and the shared libraries it
# loads, resolved by ROOT's own loader, into the same paths under STAGE.
copy_with_libs() {
    local root=$1 stage=$2 f lib
    shift 2
    for f in "$@"; do
        mkdir -p "$stage$(dirname "$f")"
        cp -L "$root$f" "$stage$f"
        for lib in $(chroot "$root" ldd "$f" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
            [ -e "$stage$lib" ] && continue
            mkdir -p "$stage$(dirname "$lib")"
            cp -L "$root$lib" "$stage$lib"
        done
    done
}

# kubernetes_images ROOT BIN: the images kubeadm asks for, from the bundle's binaries and
# archives, into ROOT/usr/share/provisioner/kubernetes/{images/,images.txt}.
kubernetes_images() {
    local root=$1 bin=$2 dir=$root/usr/share/provisioner/kubernetes
    local version stage name base tag file
    mkdir -p "$dir/images"
    : > "$dir/images.txt"
    version=$("$bin/kubeadm" version -o short)
    # The bundle's own archives first: an image they carry is not made from a binary.
    declare -A from_bundle=()
    for file in "$KUBERNETES_BUNDLE"/images/*.tar; do
        [ -f "$file" ] || continue
        cp "$file" "$dir/images/"
        for name in $(archive_names "$file"); do
            from_bundle[$name]=1
            echo "$name $(basename "$file")" >> "$dir/images.txt"
        done
    done
    for name in $("$bin/kubeadm" config images list --kubernetes-version "$version" 2>/dev/null); do
        [ -n "${from_bundle[$name]:-}" ] && continue
        base=${name%:*}; base=${base##*/}; tag=${name##*:}
        stage=$(mktemp -d "$OUT/stage.XXXXXX")
        mkdir -p "$stage/usr/local/bin"
        case $base in
            kube-apiserver|kube-controller-manager|kube-scheduler|kube-proxy)
                [ "$("$bin/$base" --version 2>/dev/null)" = "Kubernetes $tag" ] \
                    || die "kubeadm wants $name but the bundle's $base is $("$bin/$base" --version 2>&1 | head -n 1)"
                cp "$bin/$base" "$stage/usr/local/bin/"
                if [ "$base" = kube-proxy ]; then
                    # kube-proxy programs the node's rules with iptables (nf_tables backend, as
                    # the host's Debian iptables) and clears conntrack entries with conntrack.
                    copy_with_libs "$root" "$stage" /usr/sbin/xtables-nft-multi /usr/sbin/conntrack
                    local x
                    for x in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
                        ln -sf xtables-nft-multi "$stage/usr/sbin/$x"
                    done
                    local xt=/usr/lib/x86_64-linux-gnu/xtables
                    [ -d "$root$xt" ] || die "no $xt in the rootfs (iptables)"
                    copy_with_libs "$root" "$stage" $(cd "$root" && ls -d ."$xt"/*.so | sed 's/^\.//')
                fi
                file=$base.tar
                oci_archive "$name" "$stage" "$dir/images/$file"
                ;;
            etcd)
                # Debian's etcd links glibc: the image carries the rootfs's loader and libc.
                local want=${tag%-*}
                "$bin/etcd" --version 2>/dev/null | grep -qx "etcd Version: $want" \
                    || die "kubeadm wants $name but the bundle's etcd is $("$bin/etcd" --version 2>&1 | head -n 1)"
                cp "$bin/etcd" "$root/tmp/etcd.build"
                copy_with_libs "$root" "$stage" /tmp/etcd.build
                mv "$stage/tmp/etcd.build" "$stage/usr/local/bin/etcd"
                rm -rf "$stage/tmp" "$root/tmp/etcd.build"
                file=etcd.tar
                oci_archive "$name" "$stage" "$dir/images/$file"
                ;;
            pause)
                cp "$bin/pause" "$stage/pause"
                file=pause.tar
                oci_archive "$name" "$stage" "$dir/images/$file" /pause
                ;;
            coredns)
                # Not part of the Kubernetes tree: only a bundle's images/ can bring it.
                echo "    $name: not in the bundle (no images/*.tar carries it); kubeadm init skips its addon" >&2
                rm -rf "$stage"
                continue
                ;;
            *) die "kubeadm asks for $name, which the bundle cannot make" ;;
        esac
        rm -rf "$stage"
        echo "$name $file" >> "$dir/images.txt"
    done
    sort -o "$dir/images.txt" "$dir/images.txt"
    sed 's/^/    /' "$dir/images.txt" >&2
}

# kubernetes_preload ROOT: imports the archives listed in images.txt into ROOT's containerd
# store, by running ROOT's own containerd in ROOT (private mount namespace: proc, tmpfs /run and
# /tmp, /sys read-only; unmounted when it ends), then removes the archives. Importing at boot
# instead cost about 30 s per image on a machine emulated without KVM, on every node's first
# boot.
kubernetes_preload() {
    local root=$1
    unshare --mount --propagation private bash -euo pipefail -c '
        root=$1
        mount -t proc proc "$root/proc"
        mount -t tmpfs tmpfs "$root/run"
        mount -t tmpfs tmpfs "$root/tmp"
        mount --rbind -o ro /sys "$root/sys"
        chroot "$root" /usr/bin/containerd > "$root/tmp/containerd.log" 2>&1 &
        pid=$!
        stop() { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; }
        trap stop EXIT
        for _ in $(seq 1 300); do [ -S "$root/run/containerd/containerd.sock" ] && break; sleep 0.1; done
        [ -S "$root/run/containerd/containerd.sock" ] || { tail -n 20 "$root/tmp/containerd.log" >&2; exit 1; }
        while read -r name archive; do
            chroot "$root" ctr -n k8s.io images import "/usr/share/provisioner/kubernetes/images/$archive" >/dev/null
            # The list first, then grep: with ctr piped into grep -q, grep leaves at the first
            # match, ctr dies of SIGPIPE and pipefail failed the check now and then.
            listed=$(chroot "$root" ctr -n k8s.io images ls -q)
            grep -qxF "$name" <<< "$listed" \
                || { echo "importing $archive did not create $name" >&2; exit 1; }
            echo "    $name imported" >&2
        done < "$root/usr/share/provisioner/kubernetes/images.txt"
    ' preload "$root" || die "importing the Kubernetes images into the rootfs's containerd failed"
    rm -rf "$root/usr/share/provisioner/kubernetes/images"
    printf '    containerd store: %s\n' "$(du -sh "$root/var/lib/containerd" | cut -f1)" >&2
}

# kubernetes_install ROOT: everything above into the rootfs ROOT.
kubernetes_install() {
    local root=$1 bin=$OUT/kubernetes.bin
    step "Kubernetes bundle: binaries checked against SHA256SUMS"
    kubernetes_unpack "$bin"
    local b
    for b in kubeadm kubelet kubectl; do install -m 0755 "$bin/$b" "$root/usr/bin/$b"; done
    install -m 0644 "$KUBE_HERE/kubernetes/kubelet.service" "$root/usr/lib/systemd/system/kubelet.service"
    install -D -m 0644 "$KUBE_HERE/kubernetes/10-kubeadm.conf" "$root/usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf"
    install -m 0644 "$KUBE_HERE/kubernetes/provisioner-kubernetes-images.service" "$root/usr/lib/systemd/system/"
    install -D -m 0755 "$KUBE_HERE/kubernetes/import-kubernetes-images" "$root/usr/lib/provisioner/import-kubernetes-images"

    step "Kubernetes images from the bundle (OCI archives, umoci)"
    kubernetes_images "$root" "$bin"
    local pause
    pause=$(awk '$1 ~ /\/pause:/ {print $1}' "$root/usr/share/provisioner/kubernetes/images.txt")
    [ -n "$pause" ] || die "no pause image"
    mkdir -p "$root/etc/containerd"
    sed "s|@PAUSE_IMAGE@|$pause|" "$KUBE_HERE/kubernetes/containerd.toml" > "$root/etc/containerd/config.toml"

    step "Kubernetes images into containerd's store (containerd run in the rootfs)"
    kubernetes_preload "$root"

    step "kubeadm prerequisites, units"
    printf 'overlay\nbr_netfilter\n' > "$root/etc/modules-load.d/kubernetes.conf"
    printf 'net.bridge.bridge-nf-call-iptables = 1\nnet.bridge.bridge-nf-call-ip6tables = 1\nnet.ipv4.ip_forward = 1\n' \
        > "$root/etc/sysctl.d/90-kubernetes.conf"
    mkdir -p "$root/etc/cni/net.d"
    chroot "$root" systemctl enable containerd.service kubelet.service \
        provisioner-kubernetes-images.service provisioner-pod-network.path 2>&1 | sed 's/^/    /' >&2
    # What the image can run, for the operator and the laptop's cloud-config.
    "$bin/kubeadm" version -o short > "$root/usr/share/provisioner/kubernetes/version"
    rm -rf "$bin"
}

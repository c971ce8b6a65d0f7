#!/bin/bash
# Every cloud-init document provisioner renders, checked by the real cloud-init: Debian
# bookworm's cloud-init 22.4, unpacked (never installed as a service) and run with its Python
# dependencies from bookworm. `cloud-init schema --config-file` validates the node user-data
# (without and with kubeadm join parameters, with tricky SSH keys, commands and files) and the
# laptop's (kubeadm init); `cloud-init devel net-convert` parses the laptop's network-config;
# deliberately broken documents must fail both. python3-yaml then reads the kubeadm
# JoinConfiguration / InitConfiguration + ClusterConfiguration inside and checks their fields
# and that every tricky value came through unchanged, and the Kubernetes bundle's own kubeadm
# (tests/lib-kube.sh) validates the rendered InitConfiguration (v1beta4, bridge pod network,
# slow-machine timeouts) and JoinConfiguration (`kubeadm config validate`). No network, no root
# needed beyond fetching the package once (cached).
TEST_NAME=cloud-init
. "$(dirname "$0")/lib.sh"

PY=/usr/bin/python3   # Debian's python3, which has the bookworm modules cloud-init needs
CACHE=${CLOUD_INIT_CACHE:-/var/tmp/provisioner-tests/cloud-init}

# --- cloud-init 22.4 from bookworm, unpacked once into the cache -----------------------------
version=$(apt-cache policy cloud-init | awk '/Candidate:/ {print $2}')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    fail "no cloud-init package in the apt lists (run tests/install-deps.sh)"; finish
fi
log "cloud-init $version (Debian bookworm: 22.4)"
root="$CACHE/$version"
if [ ! -x "$root/usr/bin/cloud-init" ]; then
    mkdir -p "$CACHE/download"
    # _apt cannot write to a root-owned cache directory: download into the work dir.
    (cd "$WORK" && apt-get download -q "cloud-init=$version" >/dev/null 2>&1)
    rm -rf "$root.tmp" && mkdir -p "$root.tmp"
    dpkg-deb -x "$WORK"/cloud-init_*.deb "$root.tmp"
    mv "$root.tmp" "$root"
fi
cloud_init() { PYTHONPATH="$root/usr/lib/python3/dist-packages" "$PY" "$root/usr/bin/cloud-init" "$@"; }
runs() { cloud_init --version 2>&1 | grep -q "${version%%-*}"; }
check "cloud-init $version runs from $root" runs

# valid FILE: cloud-init's schema check passes (exit 0 and its own verdict).
valid() { cloud_init schema --config-file "$1" >"$1.schema" 2>&1 && grep -q '^Valid cloud-config' "$1.schema"; }
invalid() { ! cloud_init schema --config-file "$1" >"$1.schema" 2>&1 && grep -q 'schema errors' "$1.schema"; }

# --- configuration with tricky values, written by python3-yaml from JSON --------------------
mkdir -p "$WORK/machines"
stub_boot_files "$WORK" undionly.kpxe snponly.efi vmlinuz initrd.img
cat > "$WORK/tricky.json" <<'EOF'
{
  "keys": [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0b3Vk plain@host",
    "from=\"10.0.0.0/8\",command=\"echo 'hi' # there\" ssh-ed25519 AAAAC3Nza key: with \"quotes\"",
    "ssh-rsa AAAAB3NzaC1yc2E {{ not.a.template }} {% raw %} - [a, b] &anchor *alias !!tag ünïcödé \\ end"
  ],
  "runcmd": [
    "echo \"a: b\" # c; printf '%s\\n' \"$HOME\"",
    "- not a list: {x: y}\nsecond line",
    "true"
  ],
  "files": [
    {"path": "/etc/odd: name #1", "content": "line 1\n  indented: yes\n---\n\"quoted\"\ttab\n", "permissions": "0640"}
  ]
}
EOF
"$PY" - "$WORK" "$SRV_IP" <<'EOF'
import json, sys, yaml
work, server = sys.argv[1], sys.argv[2]
t = json.load(open(f"{work}/tricky.json"))
base = {
    "interface": "enp1s0", "serverAddress": server, "subnet": "10.77.0.0/24",
    "gateway": "10.77.0.254", "dnsServers": [server, "10.77.0.53"],
    "bootFiles": {"ipxeDir": work, "assetsDir": work},
    "boot": {"kernel": "vmlinuz", "initrd": "initrd.img"},
    "inventory": {"directory": f"{work}/machines"},
    "cloudInit": {"sshAuthorizedKeys": t["keys"], "extraRunCmd": t["runcmd"], "extraWriteFiles": t["files"]},
    "laptop": {"hostname": "seed.lab.example", "macAddress": "52:54:00:00:00:01",
               "kubernetesVersion": "v1.30.2", "podSubnet": "10.244.0.0/16",
               "controlPlaneEndpoint": "api.lab.example:6443",
               "cniManifest": "/usr/share/provisioner/cni/cni.yaml"},
}
yaml.safe_dump(base, open(f"{work}/provisioner.yaml", "w"), allow_unicode=True)
plain = dict(base, cloudInit={"sshAuthorizedKeys": t["keys"][:1]})
yaml.safe_dump(plain, open(f"{work}/plain.yaml", "w"))
for name, mac, ip, host in [("node2", "52:54:00:00:00:02", "10.77.0.20", "node2"),
                            ("node3", "52:54:00:00:00:03", "10.77.0.30", "Node3.lab.example")]:
    yaml.safe_dump({"apiVersion": "provisioner.dev/v1alpha1", "kind": "Machine", "metadata": {"name": name},
                    "spec": {"macAddress": mac, "ipAddress": ip, "hostname": host}},
                   open(f"{work}/machines/{name}.yaml", "w"))
EOF
check "the tricky configuration is accepted" "$PROVISIONER" check-config --config "$WORK/provisioner.yaml"

render() { local out=$1; shift; "$PROVISIONER" cloud-config "$@" > "$WORK/$out"; }
check "render: node2, no cluster" render node-plain.yaml node -c "$WORK/plain.yaml" --machine node2
check "render: node2, tricky hooks" render node-tricky.yaml node -c "$WORK/provisioner.yaml" --machine node2
check "render: node3, example join" render node-join.yaml node -c "$WORK/provisioner.yaml" --machine node3 --example-join
check "render: node3 meta-data" render node-meta.yaml node -c "$WORK/provisioner.yaml" --machine node3 --file meta-data
check "render: laptop user-data" render laptop.yaml laptop -c "$WORK/provisioner.yaml"
check "render: laptop meta-data" render laptop-meta.yaml laptop -c "$WORK/provisioner.yaml" --file meta-data
check "render: laptop network-config" render laptop-net.yaml laptop -c "$WORK/provisioner.yaml" --file network-config

for doc in node-plain node-tricky node-join laptop; do
    check "cloud-init schema: $doc.yaml is valid" valid "$WORK/$doc.yaml"
done

# Negative checks: a schema error must fail.
printf '#cloud-config\nruncmd: 5\n' > "$WORK/broken.yaml"
check "cloud-init schema rejects a broken config (runcmd: 5)" invalid "$WORK/broken.yaml"
sed 's/^preserve_hostname: false$/preserve_hostname: "no such value"/' "$WORK/node-join.yaml" > "$WORK/broken-join.yaml"
check "cloud-init schema rejects our join config with one value made wrong" invalid "$WORK/broken-join.yaml"
sed 's/^    permissions: "0600"$/    permissions: 600/' "$WORK/node-join.yaml" > "$WORK/broken-mode.yaml"
check "cloud-init schema rejects an unquoted (integer) file mode" invalid "$WORK/broken-mode.yaml"

# network-config: cloud-init parses it and renders systemd-networkd files.
net_convert() { rm -rf "$2"; cloud_init devel net-convert -p "$1" -k yaml -d "$2" -D debian -O networkd >"$2.log" 2>&1; }
check "cloud-init net-convert reads the laptop's network-config" net_convert "$WORK/laptop-net.yaml" "$WORK/networkd"
check "networkd: static address, gateway, DNS, matched by MAC" bash -c "cat '$WORK'/networkd/etc/systemd/network/*.network > '$WORK/networkd.all' && grep -qx 'Address=10.77.0.1/24' '$WORK/networkd.all' && grep -qx 'Gateway=10.77.0.254' '$WORK/networkd.all' && grep -qx 'DNS=10.77.0.53' '$WORK/networkd.all' && grep -qix 'MACAddress=52:54:00:00:00:01' '$WORK/networkd.all'"
printf 'version: 2\nethernets:\n  eth0:\n    addresses: 5\n' > "$WORK/broken-net.yaml"
rejected() { ! net_convert "$1" "$2"; }
check "cloud-init net-convert rejects a broken network-config" rejected "$WORK/broken-net.yaml" "$WORK/networkd-broken"

# The kubeadm documents inside, and the tricky values, read back by python3-yaml.
check "kubeadm configurations and values read back with python3-yaml" "$PY" - "$WORK" <<'EOF'
import json, sys, yaml
work = sys.argv[1]
t = json.load(open(f"{work}/tricky.json"))
load = lambda name: yaml.safe_load(open(f"{work}/{name}"))
files = lambda doc: {f["path"]: f for f in doc["write_files"]}
problems = []
def expect(what, got, want):
    if got != want:
        problems.append(f"{what}: got {got!r}, want {want!r}")

plain = load("node-plain.yaml")
text = open(f"{work}/node-plain.yaml").read()
expect("plain: hostname", plain["hostname"], "node2")
expect("plain: no-join comment", "# No join parameters (no cluster inventory)" in text, True)
expect("plain: no join file", "/etc/kubernetes/kubeadm-join.yaml" in files(plain), False)
expect("plain: no kubeadm", "kubeadm" in json.dumps(plain["runcmd"]), False)
expect("plain: first command reports joining", plain["runcmd"][0][:2], ["/usr/local/libexec/provisioner-report", "joining"])
expect("plain: report url", files(plain)["/var/lib/provisioner/report-url"]["content"], "http://10.77.0.1/report/52-54-00-00-00-02")
expect("plain: token file mode", files(plain)["/var/lib/provisioner/report-token"]["permissions"], "0600")

tricky = load("node-tricky.yaml")
expect("tricky: keys", tricky["ssh_authorized_keys"], t["keys"])
expect("tricky: extra commands after the report", tricky["runcmd"][1:1 + len(t["runcmd"])], t["runcmd"])
f = files(tricky)[t["files"][0]["path"]]
expect("tricky: file content", f["content"], t["files"][0]["content"])
expect("tricky: file mode", f["permissions"], "0640")

join = load("node-join.yaml")
expect("join: hostname", join["hostname"], "Node3")
expect("join: fqdn", join["fqdn"], "Node3.lab.example")
jf = files(join)["/etc/kubernetes/kubeadm-join.yaml"]
expect("join: mode", jf["permissions"], "0600")
jc = yaml.safe_load(jf["content"])
expect("join: apiVersion", jc["apiVersion"], "kubeadm.k8s.io/v1beta3")
expect("join: kind", jc["kind"], "JoinConfiguration")
bt = jc["discovery"]["bootstrapToken"]
expect("join: endpoint", bt["apiServerEndpoint"], "api.lab.example:6443")
expect("join: token", bt["token"], "abcdef.0123456789abcdef")
expect("join: CA hashes", bt["caCertHashes"], ["sha256:" + "0" * 64])
expect("join: node name", jc["nodeRegistration"]["name"], "node3.lab.example")
expect("join: node-ip", jc["nodeRegistration"]["kubeletExtraArgs"], {"node-ip": "10.77.0.30"})
expect("join: kubeadm join runs", any("kubeadm join --config /etc/kubernetes/kubeadm-join.yaml" in " ".join(c) if isinstance(c, list) else False for c in join["runcmd"]), True)

lap = load("laptop.yaml")
expect("laptop: hostname", (lap["hostname"], lap["fqdn"]), ("seed", "seed.lab.example"))
lf = files(lap)
expect("laptop: provisioner.yaml is the config", lf["/etc/provisioner/provisioner.yaml"]["content"], open(f"{work}/provisioner.yaml").read())
expect("laptop: init mode", lf["/etc/kubernetes/kubeadm-init.yaml"]["permissions"], "0600")
init, cluster = list(yaml.safe_load_all(lf["/etc/kubernetes/kubeadm-init.yaml"]["content"]))
expect("init: kinds", (init["kind"], cluster["kind"]), ("InitConfiguration", "ClusterConfiguration"))
expect("init: apiVersions", {init["apiVersion"], cluster["apiVersion"]}, {"kubeadm.k8s.io/v1beta3"})
expect("init: advertise address", init["localAPIEndpoint"]["advertiseAddress"], "10.77.0.1")
expect("init: node name", init["nodeRegistration"]["name"], "seed.lab.example")
expect("cluster: version", cluster["kubernetesVersion"], "v1.30.2")
expect("cluster: pod subnet", cluster["networking"]["podSubnet"], "10.244.0.0/16")
expect("cluster: endpoint", cluster["controlPlaneEndpoint"], "api.lab.example:6443")
cmds = [c for c in lap["runcmd"] if isinstance(c, list)]
init_cmd = [c for c in cmds if c[:2] == ["sh", "-c"] and "exec kubeadm init" in c[2]]
expect("laptop: kubeadm init with its file", len(init_cmd) == 1 and "--config /etc/kubernetes/kubeadm-init.yaml" in init_cmd[0][2], True)
expect("laptop: CNI from the image", ["kubectl", "--kubeconfig", "/etc/kubernetes/admin.conf", "apply", "-f", "/usr/share/provisioner/cni/cni.yaml"] in cmds, True)
order = [json.dumps(c) for c in lap["runcmd"]]
ki = next(i for i, c in enumerate(order) if "kubeadm" in c and "init" in c)
ni = next(i for i, c in enumerate(order) if "netboot.path" in c)
expect("laptop: netboot.path after kubeadm init", ki < ni, True)

meta = load("node-meta.yaml")
expect("node meta-data", meta["local-hostname"], "Node3.lab.example")
lmeta = load("laptop-meta.yaml")
expect("laptop meta-data", (lmeta["local-hostname"], lmeta["instance-id"].startswith("seed.lab.example-")), ("seed.lab.example", True))
for p in problems:
    print(p)
sys.exit(1 if problems else 0)
EOF

# --- the bundle's kubeadm reads what it is given ------------------------------------------------
. "$REPO/tests/lib-kube.sh"
if KBIN=$(kube_unpack); then
    kversion=$("$KBIN/kubeadm" version -o short)
    "$PY" - "$WORK/provisioner.yaml" "$WORK/bridge.yaml" "$kversion" <<'EOF'
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
d["laptop"].pop("cniManifest")
d["laptop"].update(kubernetesVersion=sys.argv[3], controlPlaneTimeout=1800, imageUpstream="http://10.77.0.254:8000/")
yaml.safe_dump(d, open(sys.argv[2], "w"), allow_unicode=True)
EOF
    check "render: laptop user-data, Kubernetes $kversion, bridge pod network" \
        render laptop-bridge.yaml laptop -c "$WORK/bridge.yaml"
    check "cloud-init schema: laptop-bridge.yaml is valid" valid "$WORK/laptop-bridge.yaml"
    # extract DOC PATH OUT: the content of write_files entry PATH of DOC.
    extract() { "$PY" -c 'import sys,yaml; [open(sys.argv[3],"w").write(f["content"]) for f in yaml.safe_load(open(sys.argv[1]))["write_files"] if f["path"] == sys.argv[2]]' "$@" && [ -s "$3" ]; }
    kubeadm_valid() { "$KBIN/kubeadm" config validate --config "$1" >"$1.validate" 2>&1; }
    check "kubeadm $kversion validates the laptop's InitConfiguration + ClusterConfiguration" bash -c \
        "$(declare -f extract kubeadm_valid); PY=$PY KBIN=$KBIN; extract '$WORK/laptop-bridge.yaml' /etc/kubernetes/kubeadm-init.yaml '$WORK/init.yaml' && kubeadm_valid '$WORK/init.yaml'"
    check "kubeadm $kversion validates a node's JoinConfiguration" bash -c \
        "$(declare -f extract kubeadm_valid); PY=$PY KBIN=$KBIN; extract '$WORK/node-join.yaml' /etc/kubernetes/kubeadm-join.yaml '$WORK/join.yaml' && kubeadm_valid '$WORK/join.yaml'"
    sed 's/podSubnet: .*/podSubnet: "not a subnet"/' "$WORK/init.yaml" > "$WORK/init-broken.yaml"
    check "kubeadm rejects the InitConfiguration with one value made wrong" bash -c \
        "! '$KBIN/kubeadm' config validate --config '$WORK/init-broken.yaml' >/dev/null 2>&1"
else
    fail "the Kubernetes bundle unpacks (tests/lib-kube.sh)"
fi

# Inputs that cannot make a valid cloud-config are refused with the key named (exit 2).
"$PY" -c 'import sys,yaml; d=yaml.safe_load(open(sys.argv[1])); d["cloudInit"]["sshAuthorizedKeys"]=["ssh-ed25519 AAAA a\nssh-rsa BBBB evil"]; yaml.safe_dump(d, open(sys.argv[2],"w"))' "$WORK/provisioner.yaml" "$WORK/two-line-key.yaml"
"$PROVISIONER" cloud-config node -c "$WORK/two-line-key.yaml" --machine node2 >/dev/null 2>"$WORK/two-line-key.err" && rc=0 || rc=$?
check "a two-line SSH key is refused (exit 2, key named)" bash -c "[ $rc = 2 ] && grep -q 'cloudInit.sshAuthorizedKeys' '$WORK/two-line-key.err'"
"$PY" -c 'import sys,yaml; d=yaml.safe_load(open(sys.argv[1])); d["laptop"]["hostname"]="seed_1"; yaml.safe_dump(d, open(sys.argv[2],"w"))' "$WORK/provisioner.yaml" "$WORK/bad-host.yaml"
"$PROVISIONER" cloud-config laptop -c "$WORK/bad-host.yaml" >/dev/null 2>"$WORK/bad-host.err" && rc=0 || rc=$?
check "an invalid laptop host name is refused (exit 2, key named)" bash -c "[ $rc = 2 ] && grep -q 'laptop.hostname' '$WORK/bad-host.err'"
finish

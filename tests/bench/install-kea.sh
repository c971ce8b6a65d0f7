#!/bin/bash
# Installs ISC Kea's DHCPv4 server (Debian's kea-dhcp4-server) for the DHCP benchmark without
# letting its service start or stay enabled on the host: a policy-rc.d that refuses every
# start while apt runs (deb-systemd-invoke honours it), then the unit disabled and masked.
# The benchmark runs kea-dhcp4 by hand, in its own namespace, with its own configuration.
set -euo pipefail
if command -v kea-dhcp4 >/dev/null; then exit 0; fi
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created=1
fi
trap '[ "$created" = 1 ] && rm -f "$policy"' EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends kea-dhcp4-server >/dev/null
# Offline when systemd is not running: the unit's links are removed all the same.
[ -d /run/systemd/system ] && { systemctl stop kea-dhcp4-server.service >/dev/null 2>&1 || true; }
systemctl disable kea-dhcp4-server.service >/dev/null 2>&1 || true
systemctl mask kea-dhcp4-server.service >/dev/null 2>&1 || true
command -v kea-dhcp4 >/dev/null

#!/usr/bin/env python3
"""Minimal DHCP client for tests: sends one message, prints the reply's type and options.

usage: dhcp-client.py IFACE MAC TYPE [--requested IP] [--server-id IP] [--ciaddr IP] [--timeout S]
                      [--vendor-class TEXT] [--arch N] [--to IP:PORT] [--port N]
TYPE is discover, request, inform or release. Prints `type=<name>`, `yiaddr=…`, `siaddr=…`,
`file=…` and `from=IP:PORT`, then one `option N=<hex>` line per option of the first reply for
our xid, or `type=none` after the timeout. The interface needs an IPv4 address so the kernel can
send to 255.255.255.255. --vendor-class and --arch add options 60 and 93 (a PXE client);
--to sends to that address instead of 255.255.255.255:67 (a PXE boot server: --to SERVER:4011),
--port is the local port (default 68).
"""
import argparse
import os
import socket
import struct
import sys
import time

TYPES = {"discover": 1, "request": 3, "release": 7, "inform": 8}
NAMES = {2: "offer", 5: "ack", 6: "nak"}


def build(mac, kind, requested, server_id, ciaddr, xid, vendor_class=None, arch=None):
    hdr = struct.pack("!BBBBIHH4s4s4s4s16s64s128s4s", 1, 1, 6, 0, xid, 0, 0x8000,
                      socket.inet_aton(ciaddr), bytes(4), bytes(4), bytes(4),
                      mac + bytes(10), bytes(64), bytes(128), b"\x63\x82\x53\x63")
    opts = bytes([53, 1, TYPES[kind]])
    if requested:
        opts += bytes([50, 4]) + socket.inet_aton(requested)
    if server_id:
        opts += bytes([54, 4]) + socket.inet_aton(server_id)
    if vendor_class:
        opts += bytes([60, len(vendor_class)]) + vendor_class.encode()
    if arch is not None:
        opts += bytes([93, 2]) + struct.pack("!H", arch)
    opts += bytes([55, 4, 1, 3, 6, 12, 255])
    return hdr + opts


def parse(data):
    opts = {}
    i = 240
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        opts[data[i]] = data[i + 2:i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    return opts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("iface")
    p.add_argument("mac")
    p.add_argument("type", choices=TYPES)
    p.add_argument("--requested")
    p.add_argument("--server-id")
    p.add_argument("--ciaddr", default="0.0.0.0")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--vendor-class")
    p.add_argument("--arch", type=int)
    p.add_argument("--to", default="255.255.255.255:67")
    p.add_argument("--port", type=int, default=68)
    a = p.parse_args()
    to_ip, _, to_port = a.to.rpartition(":")
    mac = bytes.fromhex(a.mac.replace(":", ""))
    xid = struct.unpack("!I", os.urandom(4))[0]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, a.iface.encode())
    s.bind(("0.0.0.0", a.port))
    message = build(mac, a.type, a.requested, a.server_id, a.ciaddr, xid, a.vendor_class, a.arch)
    s.sendto(message, (to_ip, int(to_port)))
    deadline = time.monotonic() + a.timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            print("type=none")
            return 0
        s.settimeout(left)
        try:
            data, peer = s.recvfrom(2048)
        except socket.timeout:
            continue
        if len(data) < 240 or data[0] != 2 or struct.unpack("!I", data[4:8])[0] != xid:
            continue
        opts = parse(data)
        kind = opts.get(53, b"\x00")[0]
        print(f"type={NAMES.get(kind, kind)}")
        print(f"yiaddr={socket.inet_ntoa(data[16:20])}")
        print(f"siaddr={socket.inet_ntoa(data[20:24])}")
        print(f"file={data[108:236].split(bytes(1))[0].decode('ascii', 'replace')}")
        print(f"from={peer[0]}:{peer[1]}")
        for code in sorted(opts):
            print(f"option {code}={opts[code].hex()}")
        return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Answer IPv6 router solicitations on one interface with a minimal router advertisement:
router lifetime 0 (not a default router), no prefix, no M/O flags, only the source link-layer
address option. Test helper to measure whether such an RA is enough to end iPXE's IPv6
autoconfiguration wait. Needs CAP_NET_RAW (run as root inside the test namespace).

usage: ra-responder.py IFACE [--lifetime S] [--prefix fd77::/64]
"""
import argparse
import fcntl
import ipaddress
import socket
import struct
import sys

SIOCGIFHWADDR = 0x8927


def hwaddr(iface):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    info = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", iface.encode()[:15]))
    return info[18:24]


def build_ra(mac, lifetime, prefix):
    # type 134, code 0, checksum 0 (the kernel fills it in for ICMPv6 raw sockets),
    # cur hop limit 64, flags 0, router lifetime, reachable 0, retrans 0
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, lifetime, 0, 0)
    ra += struct.pack("!BB", 1, 1) + mac  # source link-layer address
    if prefix:
        net = ipaddress.IPv6Network(prefix)
        # prefix information: on-link + autonomous, valid/preferred lifetimes 1 h
        ra += struct.pack("!BBBBIII", 3, 4, net.prefixlen, 0xC0, 3600, 3600, 0) + net.network_address.packed
    return ra


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("iface")
    ap.add_argument("--lifetime", type=int, default=0)
    ap.add_argument("--prefix")
    a = ap.parse_args()
    ifindex = socket.if_nametoindex(a.iface)
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, a.iface.encode())
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
    mreq = socket.inet_pton(socket.AF_INET6, "ff02::2") + struct.pack("@I", ifindex)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
    ra = build_ra(hwaddr(a.iface), a.lifetime, a.prefix)
    dst = ("ff02::1", 0, 0, ifindex)
    s.sendto(ra, dst)
    print(f"ra-responder: on {a.iface}, lifetime {a.lifetime}, prefix {a.prefix}", file=sys.stderr, flush=True)
    while True:
        data, src = s.recvfrom(2048)
        if data and data[0] == 133:  # router solicitation
            s.sendto(ra, dst)
            print(f"ra-responder: RS from {src[0]} -> RA", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

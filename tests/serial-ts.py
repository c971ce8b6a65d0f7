#!/usr/bin/env python3
"""Run a command (QEMU with `-serial stdio`) and write its output to a file, one line per line,
each prefixed with the seconds since this program started at which the line was completed
(its CR or LF arrived): `[  12.34] text`. ANSI escapes are removed and a carriage return ends a
line too (iPXE and SeaBIOS redraw lines with CR). A line whose text arrived slowly (iPXE's
"Configuring ......... ok", or a marker printed after bytes that had no newline) gets
` [from 10.05]` appended: the time its first byte arrived.

SIGTERM/SIGINT stop the command (process group) and exit; the exit status is the command's.

usage: serial-ts.py OUTFILE -- cmd args...
"""
import os
import re
import select
import signal
import subprocess
import sys
import time

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1bc")


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    out = open(sys.argv[1], "w", buffering=1)
    t0 = time.monotonic()
    child = subprocess.Popen(sys.argv[3:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)

    def stop(_sig, _frm):
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    buf = b""
    first = None  # arrival time of the first byte of the current partial line

    def emit(raw, start):
        text = ANSI.sub(b"", raw).decode("utf-8", "replace").rstrip()
        if not text.strip():
            return
        now = time.monotonic() - t0
        began = f" [from {start:.2f}]" if now - start > 0.3 else ""
        out.write(f"[{now:7.2f}] {text}{began}\n")

    fd = child.stdout.fileno()
    while True:
        try:
            r, _, _ = select.select([fd], [], [], 0.5)
        except InterruptedError:
            continue
        if not r:
            if child.poll() is not None:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if first is None and chunk:
            first = time.monotonic() - t0
        buf += chunk
        while True:
            m = re.search(rb"[\r\n]", buf)
            if not m:
                break
            line, buf = buf[:m.start()], buf[m.end():]
            emit(line, first if first is not None else time.monotonic() - t0)
            first = (time.monotonic() - t0) if buf else None
    if buf:
        emit(buf, first if first is not None else time.monotonic() - t0)
    try:
        rc = child.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        rc = child.wait()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())

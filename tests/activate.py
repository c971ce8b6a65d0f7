#!/usr/bin/env python3
"""Starts a command the way systemd socket activation does, with several named sockets of mixed
types (systemd-socket-activate cannot mix UDP and TCP in one call).

usage: activate.py NAME=udp:ADDR:PORT NAME=tcp:ADDR:PORT ... -- COMMAND ARGS...
The sockets become fds 3, 4, ... with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID set as sd_listen_fds(3)
expects."""
import fcntl
import os
import socket
import sys

sep = sys.argv.index("--")
specs, command = sys.argv[1:sep], sys.argv[sep + 1:]
sockets, names = [], []
for spec in specs:
    name, rest = spec.split("=", 1)
    kind, addr, port = rest.split(":")
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(port)))
    if kind == "tcp":
        s.listen(64)
    sockets.append(s)
    names.append(name)

# Move the sockets out of the way first: dup2 onto the same number would keep O_CLOEXEC.
moved = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100) for s in sockets]
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i, inheritable=True)
env = dict(os.environ, LISTEN_FDS=str(len(sockets)), LISTEN_FDNAMES=":".join(names),
           LISTEN_PID=str(os.getpid()))
os.execvpe(command[0], command, env)

#!/usr/bin/env python3
"""Phase change -> D-Bus signal latency. Runs `busctl monitor` on the bus for PropertiesChanged
signals of machine objects, then sends one DHCP DISCOVER per machine (from this network
namespace, out of IFACE) and times, per machine, the gap between sending the DISCOVER and
receiving the PropertiesChanged that carries its new Phase. The DISCOVER makes netboot offer,
which moves the machine from Pending to PXEBooting. Prints count, median, p99 and max in ms.

usage: dbus-latency.py BUS_ADDRESS IFACE COUNT MAC_PREFIX NAME_FORMAT
  e.g. dbus-latency.py unix:path=/tmp/x/bus eth0 200 52:54:02 m%04d"""
import json
import socket
import struct
import subprocess
import sys
import threading
import time

address, iface, count, mac_prefix, name_format = sys.argv[1:6]
count = int(count)
ROOT = "/dev/provisioner/Netboot1/machine/"

received = {}
ready = threading.Event()
monitor = subprocess.Popen(
    ["stdbuf", "-oL", "busctl", f"--address={address}", "monitor", "--json=short",
     "--match=type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'"],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def collect():
    for line in monitor.stdout:
        now = time.monotonic()
        ready.set()
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        path = msg.get("path", "")
        if path.startswith(ROOT) and '"Phase"' in line and path not in received:
            received[path] = now


threading.Thread(target=collect, daemon=True).start()
time.sleep(1.0)  # busctl subscribes before the first DISCOVER

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
sock.bind(("0.0.0.0", 68))
sent = {}
for i in range(1, count + 1):
    mac = bytes.fromhex(mac_prefix.replace(":", "")) + struct.pack("!BBB", 0, i // 256, i % 256)
    hdr = struct.pack("!BBBBIHH4s4s4s4s16s64s128s4s", 1, 1, 6, 0, 0x1000 + i, 0, 0x8000,
                      bytes(4), bytes(4), bytes(4), bytes(4), mac + bytes(10), bytes(64), bytes(128),
                      b"\x63\x82\x53\x63")
    packet = hdr + bytes([53, 1, 1, 255])
    sent[ROOT + (name_format % i)] = time.monotonic()
    sock.sendto(packet, ("255.255.255.255", 67))
    time.sleep(0.02)
deadline = time.monotonic() + 5
while time.monotonic() < deadline and len(received) < count:
    time.sleep(0.1)
monitor.terminate()

lat = sorted((received[p] - t) * 1000 for p, t in sent.items() if p in received)
if not lat:
    print(f"dbus signal latency: no signals received for {count} phase changes")
    sys.exit(1)
p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
print(f"dbus signal latency over {len(lat)}/{count} phase changes: median {lat[len(lat)//2]:.2f} ms, "
      f"p99 {p99:.2f} ms, max {lat[-1]:.2f} ms (DISCOVER sent -> PropertiesChanged received)")
sys.exit(0 if len(lat) == count else 1)

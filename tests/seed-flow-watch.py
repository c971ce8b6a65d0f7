#!/usr/bin/env python3
"""Runs inside the seed-flow test's "laptop" VM (put there by its cloud-config, started as a
unit before the trigger file is created) and reports, on the serial console, what an operator
would read with systemctl, busctl and journalctl. One line per change, each starting with a tag
and the guest's epoch time:

  PV-UNIT t=… netboot=<ActiveState> path=<netboot.path ActiveState>
  PV-STATUS t=… <the "Status:" line of `systemctl status netboot`>
  PV-DBUS t=… machine=M phase=P progress=N message="…"   (busctl get-property, no auto-start)
  PV-JOURNAL t=… machine=M phase=P previous=Q message_id=ID "MESSAGE"  (journalctl -u netboot
             MACHINE=M: the phase-change records and those about user-data)
  PV-IMAGESERVER t=… "MESSAGE" fields   (journalctl -u imageserver: readiness, upstream fetches)
  PV-SYSTEMCTL …  the whole `systemctl status netboot`, once: when a machine's user-data was
                  served or it reached Joining, Ready or Failed

usage: seed-flow-watch.py CONSOLE MACHINE...   (writes /run/pv-watch.started after the first poll)
"""
import json
import subprocess
import sys
import time

BUS_NAME = "dev.provisioner.Netboot1"
MACHINE_IFACE = "dev.provisioner.Netboot1.Machine"
FINAL = ("Joining", "Ready", "Failed")


def run(*cmd):
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def object_path(name):
    # sd_bus_path_encode: every byte outside [A-Za-z0-9] becomes _xx
    return "/dev/provisioner/Netboot1/machine/" + "".join(
        c if c.isascii() and c.isalnum() else "_%02x" % ord(c) for c in name)


def busctl_value(line):
    # `s "Imaging"` / `u 42`
    kind, _, value = line.partition(" ")
    return json.loads(value) if kind == "s" else value


def main():
    console = open(sys.argv[1], "w", buffering=1)
    machines = sys.argv[2:]
    last = {}
    cursors = {}
    dumped = False

    def say(tag, text):
        console.write("%s t=%.3f %s\n" % (tag, time.time(), text))

    def changed(key, value):
        if last.get(key) == value:
            return False
        last[key] = value
        return True

    first = True
    while True:
        unit = run("systemctl", "show", "-p", "ActiveState", "--value", "netboot.service")
        path = run("systemctl", "show", "-p", "ActiveState", "--value", "netboot.path")
        state = (unit or "?").strip()
        line = "netboot=%s path=%s" % (state, (path or "?").strip())
        if changed("unit", line):
            say("PV-UNIT", line)
        if state in ("active", "reloading", "deactivating"):
            status = run("systemctl", "status", "--no-pager", "-n0", "netboot.service") or ""
            for text in status.splitlines():
                if text.strip().startswith("Status:") and changed("status", text.strip()):
                    say("PV-STATUS", text.strip())
            for name in machines:
                out = run("busctl", "--auto-start=no", "get-property", BUS_NAME, object_path(name),
                          MACHINE_IFACE, "Phase", "Progress", "Message")
                if out:
                    values = out.splitlines()
                    if len(values) == 3:
                        phase, progress, message = (busctl_value(v) for v in values)
                        text = "machine=%s phase=%s progress=%s message=%s" % (
                            name, phase, progress, json.dumps(message))
                        if changed("dbus-" + name, text):
                            say("PV-DBUS", text)
                        if (phase in FINAL or "user-data" in message) and not dumped:
                            dumped = True
                            for text in (run("systemctl", "status", "--no-pager", "-n0",
                                             "netboot.service") or "").splitlines():
                                console.write("PV-SYSTEMCTL %s\n" % text)
                args = ["journalctl", "-q", "-o", "json", "-u", "netboot.service", "MACHINE=" + name]
                if name in cursors:
                    args += ["--after-cursor", cursors[name]]
                for record in (run(*args) or "").splitlines():
                    try:
                        entry = json.loads(record)
                    except ValueError:
                        continue
                    cursors[name] = entry.get("__CURSOR", cursors.get(name))
                    # phase changes, and the user-data fetch (no phase of its own)
                    if "PHASE" not in entry and "user-data" not in str(entry.get("MESSAGE", "")):
                        continue
                    when = int(entry.get("__REALTIME_TIMESTAMP", "0")) / 1e6
                    console.write("PV-JOURNAL t=%.3f machine=%s phase=%s previous=%s message_id=%s %s\n" % (
                        when, name, entry.get("PHASE"), entry.get("PREVIOUS_PHASE", "-"),
                        entry.get("MESSAGE_ID", "-"), json.dumps(entry.get("MESSAGE", ""))))
        # the imageserver's pull-through cache: what it fetched from the bootstrap imageserver
        args = ["journalctl", "-q", "-o", "json", "-u", "imageserver.service"]
        if "imageserver" in cursors:
            args += ["--after-cursor", cursors["imageserver"]]
        for record in (run(*args) or "").splitlines():
            try:
                entry = json.loads(record)
            except ValueError:
                continue
            cursors["imageserver"] = entry.get("__CURSOR", cursors.get("imageserver"))
            message = str(entry.get("MESSAGE", ""))
            if "upstream" in message or "ready" in message:
                fields = " ".join("%s=%s" % (k.lower(), entry[k]) for k in
                                  ("PATH", "BYTES", "ELAPSED_MS", "RATE_MB_S", "ERROR") if k in entry)
                console.write("PV-IMAGESERVER t=%.3f %s %s\n" % (
                    int(entry.get("__REALTIME_TIMESTAMP", "0")) / 1e6, json.dumps(message), fields))
        if first:
            first = False
            open("/run/pv-watch.started", "w").close()
        time.sleep(2)


if __name__ == "__main__":
    main()

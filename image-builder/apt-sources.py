#!/usr/bin/env python3
"""Prints the apt sources of a build host restricted to one suite, as one deb822 file.

usage: apt-sources.py SUITE FILE...

Keeps the entries whose suite is SUITE, SUITE-updates or SUITE-security, with their URIs,
components, options and Signed-By; drops every other suite (SUITE-backports, testing, trixie,
a vendor's "nodistro"...). A host that also lists newer suites, pinned down in its own
/etc/apt/preferences.d, would otherwise hand those suites to mmdebstrap without the pins, and the
image would get their packages (a newer kernel, say). Both formats are read: one-line
(`deb [opts] URI SUITE COMPONENT...`) and deb822 (`Types:/URIs:/Suites:/Components:`).
Exits 1 when nothing is left.
"""
import re
import sys

OPTION_NAMES = {  # one-line option -> deb822 field
    "arch": "Architectures",
    "signed-by": "Signed-By",
    "trusted": "Trusted",
    "lang": "Languages",
    "target": "Targets",
    "check-valid-until": "Check-Valid-Until",
}


def wanted(suite, base):
    return suite in (base, base + "-updates", base + "-security")


def one_line_entries(text):
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = {}
        m = re.match(r"^(deb|deb-src)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
        if not m:
            continue
        kind, options, uri, suite, components = m.groups()
        for option in (options or "").split():
            key, _, value = option.partition("=")
            if key in OPTION_NAMES:
                fields[OPTION_NAMES[key]] = value.replace(",", " ")
        fields.update({"Types": kind, "URIs": uri, "Suites": suite, "Components": components})
        yield fields


def deb822_entries(text):
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += "\n" + line
                continue
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
        if fields.get("Enabled", "yes").lower() == "no" or "URIs" not in fields:
            continue
        yield fields


def main():
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    base = sys.argv[1]
    stanzas = []
    for path in sys.argv[2:]:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        entries = deb822_entries(text) if path.endswith(".sources") else one_line_entries(text)
        for fields in entries:
            suites = [s for s in fields.get("Suites", "").split() if wanted(s, base)]
            if not suites:
                continue
            fields["Suites"] = " ".join(suites)
            stanzas.append("\n".join("%s: %s" % (k, v) for k, v in fields.items()))
    if not stanzas:
        print("no apt source for %s (or -updates, -security) in %s" % (base, " ".join(sys.argv[2:])),
              file=sys.stderr)
        return 1
    print("\n\n".join(stanzas))
    return 0


if __name__ == "__main__":
    sys.exit(main())

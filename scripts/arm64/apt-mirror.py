#!/usr/bin/env python3
"""Print the Debian mirror URI this machine's apt already uses for SUITE.

Reads /etc/apt/sources.list.d/*.sources (deb822) and /etc/apt/sources.list plus
*.list (one-line format), so no mirror host name ever has to live in the repo.
Exit status 1 when no `deb` source for the suite with component `main` exists.

Usage: apt-mirror.py [SUITE] [--keyring]
  --keyring  print the Signed-By keyring of that source instead (may be empty)
"""
import glob
import os
import sys

APT_DIR = os.environ.get("EDGEPIPE_APT_DIR", "/etc/apt")


def deb822_sources():
    """Yield (types, uris, suites, components, signed_by) from *.sources files."""
    for path in sorted(glob.glob(os.path.join(APT_DIR, "sources.list.d", "*.sources"))):
        try:
            text = open(path, encoding="utf-8").read()
        except OSError:
            continue
        for stanza in text.split("\n\n"):
            fields, key = {}, None
            for line in stanza.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if line[0] in " \t" and key:  # continuation line
                    fields[key] += " " + line.strip()
                    continue
                if ":" in line:
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            yield (fields.get("types", "").split(), fields.get("uris", "").split(),
                   fields.get("suites", "").split(), fields.get("components", "").split(),
                   fields.get("signed-by", ""))


def one_line_sources():
    """Yield the same tuples from sources.list and sources.list.d/*.list."""
    paths = [os.path.join(APT_DIR, "sources.list")]
    paths += sorted(glob.glob(os.path.join(APT_DIR, "sources.list.d", "*.list")))
    for path in paths:
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            signed_by = ""
            if words and words[0].startswith("["):
                opts = []
                while words:
                    w = words.pop(0)
                    opts.append(w.strip("[]"))
                    if w.endswith("]"):
                        break
                for opt in opts:
                    if opt.startswith("signed-by="):
                        signed_by = opt.split("=", 1)[1]
            if len(words) >= 3:
                yield ["deb"], [words[0]], [words[1]], words[2:], signed_by


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    suite = args[0] if args else "bookworm"
    for types, uris, suites, components, signed_by in list(deb822_sources()) + list(one_line_sources()):
        if "deb" in types and suite in suites and "main" in components and uris:
            print(signed_by if "--keyring" in argv else uris[0].rstrip("/"))
            return 0
    print(f"no apt source for suite {suite!r} with component main under {APT_DIR}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Prints the pins of a lock file (each with its hash lines) that no wheel in the given directories
provides for this Python and platform, as a requirements file: what .ci/containers.sh downloads
into its wheelhouse, so that the image build installs the lock with no index."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

try:
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # a fresh machine: pip's own copy
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename


def local(directories: list[str]) -> set[tuple[str, str]]:
    supported = set(sys_tags())
    found = set()
    for directory in directories:
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if not name.endswith(".whl"):
                continue
            try:
                project, version, _, tags = parse_wheel_filename(name)
            except ValueError:
                continue
            if tags & supported:
                found.add((str(project), str(version)))
    return found


def main(lock: str, *directories: str) -> None:
    have = local(list(directories))
    entry: list[str] = []
    keep = False
    for line in [*Path(lock).read_text().splitlines(), ""]:
        pin = re.match(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)", line)
        if pin or not line.startswith(" "):
            if keep:
                print("\n".join(entry).rstrip(" \\"))
            entry, keep = [], False
        if pin:
            keep = (canonicalize_name(pin.group(1)), pin.group(2)) not in have
        if pin or (entry and line.lstrip().startswith("--hash")):
            entry.append(line)


if __name__ == "__main__":
    main(*sys.argv[1:])

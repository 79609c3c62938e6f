"""/proc/self/mountinfo, read once the same way everywhere (proc(5)).

A line: "id parent major:minor root mount-point options [optional fields...] - fstype source
super-options". The kernel writes space, tab, newline and backslash in a path as \\ooo (octal); any
other byte as it is, so a path need not be UTF-8: it is decoded as file names are (os.fsdecode,
surrogateescape), never refused, since a host user may mount anything at any name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPED = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    device: str                    # major:minor
    root: str                      # the directory of the filesystem mounted here
    mount_point: str
    options: frozenset[str]        # per-mount options (rw, nosuid, ...)
    fstype: str
    source: str
    super_options: frozenset[str]  # the superblock's options

    @property
    def writable(self) -> bool:
        return "rw" in self.options and "ro" not in self.super_options


def read_mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    with open(path, "rb") as f:
        return parse_mountinfo(f.read())


def parse_mountinfo(data: bytes) -> list[MountEntry]:
    entries = []
    for line in data.splitlines():
        before, separator, after = line.partition(b" - ")
        fields = before.split(b" ")
        if not separator or len(fields) < 6:
            continue
        fstype, source, super_options = (after.split(b" ") + [b"", b"", b""])[:3]
        entries.append(MountEntry(
            device=_decode(fields[2]), root=_decode(fields[3]), mount_point=_decode(fields[4]),
            options=frozenset(_decode(fields[5]).split(",")), fstype=_decode(fstype), source=_decode(source),
            super_options=frozenset(_decode(super_options).split(","))))
    return entries


def _decode(field: bytes) -> str:
    if b"\\" in field:
        field = _ESCAPED.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)
    return os.fsdecode(field)

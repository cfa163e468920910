"""Swap files: left out of every backup.

A swap file holds pages of memory: passwords and keys of whatever ran, and
nothing a restore could use.  Its mtime does not move when the kernel writes
to it, so a backup would keep the first copy forever.  The walk leaves out
the swap files ``/etc/fstab`` of the system names and, when that system is
the running one, those ``/proc/swaps`` lists.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

_OCTAL = re.compile(rb"\\([0-7]{3})")  # how fstab and /proc/swaps write a space, tab, newline or backslash


def _unescape(field: bytes) -> bytes:
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def parse_fstab(text: bytes) -> list[bytes]:
    """The paths of the swap entries in an fstab (devices included)."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not fields[0].startswith(b"#") and fields[2] == b"swap":
            if fields[0].startswith(b"/"):
                found.append(_unescape(fields[0]))
    return found


def parse_proc_swaps(text: bytes) -> list[bytes]:
    """The swap files in ``/proc/swaps`` (partitions left aside)."""
    found = []
    for line in text.splitlines()[1:]:  # a header first
        fields = line.split()
        if len(fields) >= 2 and fields[1] == b"file":
            found.append(_unescape(fields[0]))
    return found


def files(root: str | bytes) -> set[bytes]:
    """The swap files of the system at ``root``, as paths inside it; unreadable tables are skipped."""
    prefix = os.fsencode(root).rstrip(b"/")
    found: set[bytes] = set()
    tables = [(prefix + b"/etc/fstab", parse_fstab)]
    if not prefix:
        tables.append((b"/proc/swaps", parse_proc_swaps))
    for table, parse in tables:
        try:
            with open(table, "rb") as f:
                found.update(parse(f.read()))
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                logger.info("cannot read %s to find swap files: %s", os.fsdecode(table), exc.strerror)
    return found

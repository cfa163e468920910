"""Exclude rules and file lists for other backup tools.

``jwbackup excludes`` tells borg, rsync, restic or tar what *not* to back up:
every installed, unmodified, non-directory path.  Rule syntaxes differ in what
they can express; a path a syntax cannot express exactly (a newline in a
line-based file, trailing white space that the tool strips, bytes the tool
cannot decode) is left out of the rules, so the tool backs it up: a missing
exclusion costs a few bytes, a wrong one loses data.

Each rule format is a function ``path -> bytes | None`` (None: cannot express).
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

from jwbackup.managers import DIR, FILE, SYMLINK, Manifest
from jwbackup.verify import Verifier

logger = logging.getLogger(__name__)

GLOB_SPECIAL = b"*?[\\"
TRAILING_SPACE = (b" ", b"\t", b"\v", b"\f", b"\r")


def owned_unmodified(manifest: Manifest, root: bytes = b"/", verifier: Verifier | None = None) -> Iterator[bytes]:
    """Installed paths, present and unchanged, that are not directories.

    Directories are never excluded: an exclusion of a directory would drop the
    admin's files inside it along with the package's.
    """
    prefix = os.fsencode(root).rstrip(b"/")
    verifier = verifier or Verifier()
    for path, entry in manifest.entries.items():
        if entry.kind == DIR:
            continue
        try:
            mode = os.lstat(prefix + path).st_mode
        except OSError:
            continue  # not on disk: nothing to exclude
        if stat.S_ISDIR(mode):
            continue
        if entry.kind == FILE and not stat.S_ISREG(mode):
            continue
        if entry.kind == SYMLINK and not stat.S_ISLNK(mode):
            continue
        if verifier.changed(prefix + path, entry):
            continue
        yield path


def _escape(path: bytes, special: bytes) -> bytes:
    return b"".join(b"\\" + bytes([c]) if c in special else bytes([c]) for c in path)


def _line_safe(path: bytes) -> bool:
    return b"\n" not in path and b"\r" not in path and not path.endswith(TRAILING_SPACE)


def _utf8(path: bytes) -> bool:
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def borg_rule(path: bytes) -> bytes | None:
    # pf: is a full-path match, looked up in a dict by borg: O(1) per file.
    # borg strips each line and reads the file as UTF-8 text.
    if not _line_safe(path) or not _utf8(path):
        return None
    return b"pf:" + path


def rsync_rule(path: bytes) -> bytes:
    # Anchored at the transfer root.  rsync treats a backslash as an escape only
    # when the pattern holds a wildcard, so escape only then.
    if any(c in b"*?[" for c in path):
        path = _escape(path, GLOB_SPECIAL)
    return b"- " + path


def restic_rule(path: bytes) -> bytes | None:
    # restic trims each line and expands $VARIABLES: $ is written $$.
    if not _line_safe(path) or path.lstrip().startswith(b"#"):
        return None
    return _escape(path, GLOB_SPECIAL).replace(b"$", b"$$")


def tar_rule(path: bytes) -> bytes:
    # For GNU tar -X with --anchored; tar strips the leading slash of members.
    return _escape(path.lstrip(b"/"), GLOB_SPECIAL)


def plain_rule(path: bytes) -> bytes:
    return path


@dataclass(frozen=True)
class Format:
    rule: Callable[[bytes], bytes | None]
    anchored_at_root: bool  # rules name system paths (rsync) instead of real ones
    null_ok: bool  # the tool can read NUL-separated rules


FORMATS = {
    "borg": Format(borg_rule, False, False),
    "rsync": Format(rsync_rule, True, True),
    "restic": Format(restic_rule, False, False),
    "tar": Format(tar_rule, False, True),
    "plain": Format(plain_rule, False, True),
}


@dataclass
class Written:
    rules: int = 0
    unexpressible: int = 0


def write_rules(
    paths: Iterable[bytes], fmt: str, out: BinaryIO, root: bytes = b"/", null: bool = False
) -> Written:
    """Write one rule per path to ``out``; count what could not be expressed."""
    form = FORMATS[fmt]
    prefix = b"" if form.anchored_at_root else os.fsencode(root).rstrip(b"/")
    sep = b"\0" if null else b"\n"
    written = Written()
    buf = []
    for path in paths:
        rule = form.rule(prefix + path)
        if rule is None or (not null and (b"\n" in rule or b"\r" in rule)):
            written.unexpressible += 1
            continue
        buf.append(rule)
        written.rules += 1
        if len(buf) >= 4096:
            out.write(sep.join(buf) + sep)
            buf.clear()
    if buf:
        out.write(sep.join(buf) + sep)
    return written


def write_atomically(path: str, fill: Callable[[BinaryIO], object]) -> object:
    """Write a file through a temporary neighbour and rename it into place.

    A reader (borg, started by borgmatic) sees the old file or the new one,
    never half of one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".jwbackup-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            result = fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return result

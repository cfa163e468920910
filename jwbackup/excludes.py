"""Exclude rules and file lists for other backup tools.

``jwbackup excludes`` tells borg, rsync, restic or tar what *not* to back up:
every installed, unmodified, non-directory path, the swap files, and the
directories of the prune list with all below them.  Rule syntaxes differ in what
they can express, and each tool's reader trims lines on its own terms; every
rule is written so that the tool reads back exactly the path (tested with the
real tools).  A path a syntax cannot express at all (a newline in a
line-based file) is left out of the rules, so the tool backs it up: a missing
exclusion costs a few bytes, a wrong one loses data.

Each rule format is a function ``path -> bytes | None`` (None: cannot express).
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

from jwbackup.errors import UsageError
from jwbackup.managers import DIR, FILE, SYMLINK, Manifest
from jwbackup.paths import Canonicalizer
from jwbackup.select import kindless_match
from jwbackup.verify import Verifier, check

logger = logging.getLogger(__name__)

GLOB_SPECIAL = b"*?[\\"
TRAILING_SPACE = (b" ", b"\t", b"\v", b"\f", b"\r")


def owned_unmodified(manifest: Manifest, root: bytes = b"/", verifier: Verifier | None = None) -> Iterator[bytes]:
    """Installed paths, present and unchanged, that are not directories.

    Directories are never excluded: an exclusion of a directory would drop the
    admin's files inside it along with the package's.
    """
    prefix = os.fsencode(root).rstrip(b"/")
    verifier = verifier or check(manifest, prefix or b"/", "conffiles", cache_file=None)
    canon = Canonicalizer(prefix)
    for path, entry in manifest.items():
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
        if entry.kind is None and not kindless_match(mode, path, canon):
            continue  # the admin's in place of what dpkg installed: see kindless_match
        if verifier.changed(path):
            continue
        yield path


def _escape(path: bytes, special: bytes) -> bytes:
    return b"".join(b"\\" + bytes([c]) if c in special else bytes([c]) for c in path)


def _utf8(path: bytes) -> bool:
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _borg_regex_char(c: str) -> str:
    if c.isascii():
        return c if c.isalnum() or c in "/_-" else f"\\x{ord(c):02x}"
    if 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that is not UTF-8, as borg's surrogateescape sees it
        return f"\\u{ord(c):04x}"
    return c


def borg_rule(path: bytes) -> bytes:
    # borg (and borgmatic 2, which rewrites exclude_from into a patterns file)
    # reads the file as locale text with universal newlines, str.strip()s each
    # line (Unicode white space too) and os.path.normpath()s a pf: pattern.
    # pf: is a dict lookup, O(1) per file; a path those steps would change
    # becomes an anchored re: pattern instead, escaped down to ASCII where it
    # matters and ending in \Z (a $ would also match before a final newline).
    text = path.decode("utf-8", "surrogateescape")
    plain = (
        "\n" not in text and "\r" not in text and text.rstrip() == text
        and posixpath.normpath(text) == text and _utf8(path)
    )
    if plain:
        return b"pf:" + path
    regex = "".join(map(_borg_regex_char, text.lstrip("/")))
    return b"re:^" + regex.encode("utf-8") + b"\\Z"


def borg_directory_rule(path: bytes) -> bytes:
    # The directory and everything below it: borg given exclude patterns
    # alone (borgmatic 1.7) does not enter an excluded directory, and
    # borgmatic 2 makes them "!" (no recursion), but a prefix says so itself.
    rule = borg_rule(path)
    if rule.startswith(b"pf:"):
        return b"pp:" + rule[3:]
    return rule[: -len(b"\\Z")] + b"(?:/|\\Z)"


def rsync_rule(path: bytes) -> bytes:
    # Anchored at the transfer root.  rsync treats a backslash as an escape only
    # when the pattern holds a wildcard, so escape only then.
    if any(c in b"*?[" for c in path):
        path = _escape(path, GLOB_SPECIAL)
    return b"- " + path


def _last_in_class(rule: bytes) -> bytes:
    """Wrap the rule's last byte in ``[...]``, so a line-trimming reader keeps it."""
    return rule[:-1] + b"[" + rule[-1:] + b"]"


def restic_rule(path: bytes) -> bytes | None:
    # restic splits lines on \n, drops a final \r, trims Unicode white space
    # (strings.TrimSpace) and expands $VARIABLES ($$ is a literal $).  Trailing
    # white space survives as a one-character class.
    if b"\n" in path:
        return None
    rule = _escape(path, GLOB_SPECIAL).replace(b"$", b"$$")
    text = path.decode("utf-8", "surrogateescape")
    if text.rstrip() != text:
        last = text[-1].encode("utf-8", "surrogateescape")
        rule = rule[: -len(last)] + b"[" + last + b"]"
    return rule


def tar_rule(path: bytes) -> bytes | None:
    # For GNU tar ``--anchored -X FILE`` (--anchored before -X), archiving
    # absolute paths: tar matches the name it was given, leading slash
    # included.  -X is read line by line even with --null, and trailing
    # ASCII white space is stripped: it survives as a one-character class.
    if b"\n" in path:
        return None
    rule = _escape(path, GLOB_SPECIAL)
    if path.endswith(TRAILING_SPACE):
        rule = _last_in_class(rule)
    return rule


def plain_rule(path: bytes) -> bytes:
    return path


@dataclass(frozen=True)
class Format:
    rule: Callable[[bytes], bytes | None]
    anchored_at_root: bool  # rules name system paths (rsync) instead of real ones
    null_ok: bool  # the tool can read NUL-separated rules
    cr_ok: bool = False  # the rule function has placed any \r where the tool's line reader keeps it
    # A rule for a directory and all below it; by default ``rule``, as rsync,
    # restic and tar do not enter a directory they exclude.
    directory_rule: Callable[[bytes], bytes | None] | None = None


FORMATS = {
    "borg": Format(borg_rule, False, False, cr_ok=True, directory_rule=borg_directory_rule),
    "rsync": Format(rsync_rule, True, True),
    "restic": Format(restic_rule, False, False, cr_ok=True),
    "tar": Format(tar_rule, False, False, cr_ok=True),
    "plain": Format(plain_rule, False, True),
}


@dataclass
class Written:
    rules: int = 0
    unexpressible: int = 0


def write_rules(
    paths: Iterable[bytes], fmt: str, out: BinaryIO, root: bytes = b"/", null: bool = False,
    directories: bool = False,
) -> Written:
    """Write one rule per path to ``out``; count what could not be expressed.

    With ``directories``, each rule leaves out the directory and everything below it.
    """
    form = FORMATS[fmt]
    if null and not form.null_ok:
        raise UsageError(f"{fmt} reads its exclude file line by line; -0 is for rsync and plain")
    prefix = b"" if form.anchored_at_root else os.fsencode(root).rstrip(b"/")
    sep = b"\0" if null else b"\n"
    make_rule = (directories and form.directory_rule) or form.rule
    written = Written()
    buf = []
    for path in paths:
        rule = make_rule(prefix + path)
        if rule is None or (not null and (b"\n" in rule or (b"\r" in rule and not form.cr_ok))):
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


class Replacement:
    """A new file that replaces ``path`` on :meth:`commit`, or vanishes.

    It is written as a temporary neighbour and renamed into place, so a reader
    (borg, started by borgmatic) sees the old file or the new one, never half
    of one; on any failure the old file stays as it was.  An existing file
    keeps its mode, owner and group (an admin who chose them keeps them); a
    new one gets ``mode``, whatever the umask.  Every step raises OSError.
    """

    def __init__(self, path: str, mode: int = 0o644):
        self.path = path
        self.mode = mode
        fd, self._tmp = tempfile.mkstemp(prefix=".jwbackup-", dir=os.path.dirname(os.path.abspath(path)))
        self.file = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.file.flush()
        self._keep_mode(self.file.fileno())
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self._tmp, self.path)
        self._tmp = None

    def discard(self) -> None:
        if self._tmp is None:
            return
        try:
            self.file.close()
        except OSError:
            pass  # a failed flush of what is thrown away anyway
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
        self._tmp = None

    def _keep_mode(self, fd: int) -> None:
        try:
            old = os.stat(self.path)
        except FileNotFoundError:
            os.fchmod(fd, self.mode)
            return
        if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.fchown(fd, old.st_uid, old.st_gid)
            except PermissionError:
                logger.info("%s: cannot keep its owner and group (%d:%d)", self.path, old.st_uid, old.st_gid)
        os.fchmod(fd, stat.S_IMODE(old.st_mode))

    def __enter__(self) -> "Replacement":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def write_atomically(path: str, fill: Callable[[BinaryIO], object], mode: int = 0o644) -> object:
    """Write ``path`` through a :class:`Replacement`; returns what ``fill`` returns."""
    with Replacement(path, mode) as new:
        result = fill(new.file)
        new.commit()
    return result

"""Choosing how a generation is built: rsync, the local linker, or the ssh builder.

``transfer: auto`` (the default) uses :mod:`jwbackup.transfer.linker` when the
destination is a local directory on a filesystem with hard links, xattrs and
POSIX ACLs, and every link-dest is a jwbackup generation on that same
filesystem; otherwise rsync, except as below for ssh and dry runs.
``transfer: rsync`` always uses rsync.  Every builder builds the generation
rsync would (``tests/test_transfer.py`` proves it against the real rsync).

ssh destinations use :mod:`jwbackup.transfer.remote` when the newest
generation's record says when its run started and that it backed up the same
source: a hard-linked copy of that generation at the destination, and rsync
for what changed.  Otherwise rsync over the whole selection.

A dry run, local or over ssh, plans the same way when that record allows and
hands rsync's own dry run only the paths the ssh builder would send: the
unchanged ones would be hard-linked, and rsync would say nothing of them.
"""

from __future__ import annotations

import logging
import os
import posixpath
import struct
from typing import Sequence

from jwbackup import generations
from jwbackup.generations import PARTIAL_SUFFIX
from jwbackup.transfer.linker import ACL_ACCESS, build

logger = logging.getLogger(__name__)

AUTO = "auto"
RSYNC = "rsync"
LINKER = "linker"
REMOTE = "remote"
PREVIEW = "rsync on what changed"  # a dry run planned as REMOTE plans
MODES = (AUTO, RSYNC)
PROBE_PREFIX = ".jwbackup-probe-"

__all__ = ["AUTO", "RSYNC", "LINKER", "REMOTE", "PREVIEW", "MODES", "choose", "build", "probe_filesystem"]


def _is_generation(path: str) -> bool:
    name = posixpath.basename(path.rstrip("/"))
    if name.endswith(PARTIAL_SUFFIX):
        name = name[: -len(PARTIAL_SUFFIX)]
    return generations.parse(name) is not None


# A POSIX ACL in the kernel's xattr form: user::rw- user:4321:r-- group::r-- mask::r-- other::r--
_PROBE_ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in ((0x01, 6, 0xFFFFFFFF), (0x02, 4, 4321), (0x04, 4, 0xFFFFFFFF),
                             (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF))
)


def probe_filesystem(directory: str) -> str | None:
    """None when ``directory``'s filesystem has hard links, xattrs and POSIX ACLs;
    else why not.  Leaves nothing behind."""
    name = os.path.join(directory, f"{PROBE_PREFIX}{os.getpid()}")
    link = name + ".link"
    for path in (name, link):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return f"cannot create a file in {directory}: {exc.strerror}"
    try:
        for what, step in (
            ("hard links", lambda: os.link(name, link, follow_symlinks=False)),
            ("extended attributes", lambda: os.setxattr(fd, "user.jwbackup-probe", b"1")),
            ("trusted extended attributes", lambda: os.setxattr(fd, "trusted.jwbackup-probe", b"1")),
            ("POSIX ACLs", lambda: os.setxattr(fd, ACL_ACCESS, _PROBE_ACL)),
        ):
            try:
                step()
            except OSError as exc:
                return f"no {what} ({exc.strerror})"
        return None
    finally:
        os.close(fd)
        for path in (name, link):
            try:
                os.unlink(path)
            except OSError:
                pass


def _unplannable(previous: dict | None, source: str | None) -> str | None:
    """Why the newest generation's record (``.stats``) cannot be planned
    against (see :mod:`jwbackup.transfer.remote`), or None."""
    if not previous:
        return "no earlier generation with a record"
    if not isinstance(previous.get("started_ns"), int) or previous.get("source") != source:
        return f"{previous.get('name')} was not made by this version from {source}"
    if previous.get("incomplete"):
        # rsync would try again what it could not copy then, and say so
        return f"{previous.get('name')} was committed with files or attributes missing"
    return None


def choose(mode: str, destination, target: str, link_dests: Sequence[str], dry_run: bool = False,
           previous: dict | None = None, source: str | None = None) -> tuple[str, str]:
    """(``LINKER``, ``REMOTE``, ``PREVIEW`` or ``RSYNC``, why) for building ``target`` against ``link_dests``.

    ``previous`` is the newest generation's record (``.stats``), ``source``
    what this run backs up (host and root).
    """
    if mode == RSYNC:
        return RSYNC, "transfer: rsync"
    if dry_run or destination.remote:
        how = "dry run" if dry_run else "over ssh"
        why = _unplannable(previous, source)
        if why is not None:
            return RSYNC, f"{how}, {why}"
        if dry_run:
            return PREVIEW, f"dry run, unchanged entries judged against {previous['name']}"
        return REMOTE, f"over ssh, unchanged entries kept from {previous['name']}"
    directory = os.path.dirname(target.rstrip("/"))
    if os.path.lexists(target):
        return RSYNC, f"{target} exists already"
    try:
        dev = os.stat(directory).st_dev
    except OSError as exc:
        return RSYNC, f"cannot stat {directory}: {exc.strerror}"
    for d in link_dests:
        if not _is_generation(d):
            return RSYNC, f"{d} is not a jwbackup generation"
        try:
            st = os.lstat(d)
        except OSError as exc:
            return RSYNC, f"cannot stat {d}: {exc.strerror}"
        if st.st_dev != dev:
            return RSYNC, f"{d} is on another filesystem"
    why = probe_filesystem(directory)
    if why is not None:
        return RSYNC, f"{directory}: {why}"
    return LINKER, "local destination"


"""Walking the roots and choosing what to back up.

The walk yields every path a backup must hold: whatever the package manager
did not install, plus installed files that were changed since.  A directory is
yielded when it is not owned, or when it must exist to hold something yielded
below it (then just before its first yielded child), so that a consumer such as
``rsync --files-from`` recreates it with its own attributes.

Paths are bytes and absolute as seen from inside the system (``b"/etc/fstab"``);
``root`` is where that system is mounted (``/`` normally).  Symlinks are never
followed.  The walk is iterative: directory depth is bounded by PATH_MAX, not by
Python's recursion limit.
"""

from __future__ import annotations

import logging
import os
import stat
from contextlib import suppress
from dataclasses import dataclass, field
from operator import attrgetter
from typing import AbstractSet, Iterable, Iterator

from jwbackup import cachedir
from jwbackup.errors import JwbackupError
from jwbackup.managers import DIR, FILE, KIND_MASK, KINDS, SYMLINK, Manifest
from jwbackup.paths import Canonicalizer
from jwbackup.verify import Running, Verifier, check

logger = logging.getLogger(__name__)

NO_BACKUP = b".no-backup"
CACHEDIR_TAG = cachedir.TAG_NAME
CACHEDIR_SIGNATURE = cachedir.SIGNATURE
_MARKERS = frozenset({NO_BACKUP, CACHEDIR_TAG})
SWAP_FILE = "swap file"  # why, in Stats.skipped
_NAME = attrgetter("name")


@dataclass
class Stats:
    directories: int = 0  # directories walked
    entries: int = 0  # non-directories met
    selected: int = 0  # paths yielded, directories included
    owned: int = 0  # installed and unmodified: left out
    modified: int = 0  # installed but changed: kept
    skipped: list[tuple[bytes, str]] = field(default_factory=list)  # (path, why): pruned or marked
    unreadable: list[tuple[bytes, str]] = field(default_factory=list)  # (path, why): roots and directories not read


def join(parent: bytes, name: bytes) -> bytes:
    return parent + name if parent == b"/" else parent + b"/" + name


def system_path(root: bytes, real_path: bytes) -> bytes | None:
    """``real_path`` as seen from inside the system at ``root``, or None if outside."""
    root = root.rstrip(b"/")
    if not root:
        return real_path
    if real_path == root:
        return b"/"
    if real_path.startswith(root + b"/"):
        return real_path[len(root) :]
    return None


_NO_KIND, _FILE, _DIR, _SYMLINK = (KINDS.index(k) for k in (None, FILE, DIR, SYMLINK))
_NOTHING: dict[bytes, bytes] = {}  # the records of a directory the manifest does not know


def _owned_dir(record: bytes | None) -> bool:
    """Does ``record`` stand for a directory the package manager installed?"""
    return record is not None and record[0] & KIND_MASK in (_NO_KIND, _DIR)


def kindless_match(mode: int, path: bytes, canon: Canonicalizer) -> bool:
    """Can the non-directory of file type ``mode`` at ``path`` be what a
    package manager that records no kinds (dpkg's lists) installed there?

    dpkg records an md5 for every regular file it installs but a conffile
    (whose md5 is in the status file): a path it lists without one is a
    directory or a symlink.  A regular file there is the admin's (a symlink
    or an empty package directory replaced, ``/etc/os-release`` made a
    file), or cannot be verified (a package without ``.md5sums``, a line of
    it unreadable): it is backed up.  dpkg builds ``.md5sums`` itself for a
    package without one, so on a current system none is left without.

    A symlink matches when it leads to something that is not a directory:
    a package directory that the admin moved elsewhere and linked back
    (``/var/lib/mysql``) is a symlink to a directory, or to nothing while
    that is not mounted, and nothing else tells it from a symlink the
    package shipped.  It is backed up, along with the few symlinks to
    directories or to nothing that packages ship (98 and 21 on a
    workstation with 890 packages).
    """
    if stat.S_ISLNK(mode):
        try:  # every symlink on the way resolved inside the root
            target = os.lstat(canon.root + canon.directory(path)).st_mode
        except OSError:
            return False  # leads nowhere now
        return not (stat.S_ISDIR(target) or stat.S_ISLNK(target))  # a symlink still: a loop
    return not stat.S_ISREG(mode)


def _cachedir_tagged(real_dir: bytes) -> bool:
    """A regular file with the signature; a FIFO or device by that name would block the walk."""
    try:
        fd = os.open(real_dir + b"/" + CACHEDIR_TAG, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, len(CACHEDIR_SIGNATURE)) == CACHEDIR_SIGNATURE
    except OSError:
        return False
    finally:
        os.close(fd)


class _Stated:
    """What the walk asks of an ``os.DirEntry``, answered from an lstat."""

    def __init__(self, st: os.stat_result):
        self._mode = st.st_mode

    def is_file(self, follow_symlinks: bool = True) -> bool:
        return stat.S_ISREG(self._mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self._mode)


class Selector:
    """Chooses the paths to back up under ``root``, against a package manifest."""

    def __init__(
        self,
        manifest: Manifest,
        root: str | bytes = "/",
        prune: Iterable[str | bytes] = (),
        verifier: Verifier | Running | None = None,
        swap_files: Iterable[bytes] = (),
    ):
        self.manifest = manifest
        self.prefix = os.fsencode(root).rstrip(b"/")
        self._canon = Canonicalizer(self.prefix)  # resolves symlinks inside the root
        self.prune = {os.fsencode(p) for p in prune}
        self._swap: dict[bytes, set[bytes]] = {}  # directory -> names of the swap files in it
        for path in map(self._canon, swap_files):
            parent, name = os.path.split(path)
            self._swap.setdefault(parent, set()).add(name)
        # Without a verification pre-pass from the caller: conffiles only, no cache.
        self.verifier = verifier or check(manifest, self.prefix or b"/", "conffiles", cache_file=None)
        self.stats = Stats()
        self._walked: list[bytes] = []  # the roots walked
        self._yielded: set[bytes] = set()  # the installed directories yielded (before something below them)

    def swap_files(self) -> list[bytes]:
        """The swap files the walk leaves out, whether there or not."""
        return sorted(join(directory, name) for directory, names in self._swap.items() for name in names)

    def close(self) -> None:
        """Stop a verification still running alongside (the run ended early)."""
        if isinstance(self.verifier, Running):
            self.verifier.close()

    def select(self, roots: Iterable[str | bytes], directories: bool = True) -> Iterator[bytes]:
        """Every path under ``roots`` that the backup must hold; no duplicates.

        With ``directories=False`` only empty directories are yielded, for
        tools that back up everything below a directory they are given.

        Roots and directories that cannot be read are left out with a
        warning and listed in ``stats.unreadable``, and so is a root holding
        ``.no-backup`` or a cache tag; when no root can be walked at all,
        the walk raises JwbackupError at its end (nothing is committed, no
        generation expires).

        With a verification still running (:class:`~jwbackup.verify.Running`),
        the walk passes over every installed file of the right kind, then
        waits for it and yields the modified ones among them, each after
        the installed directories above it not yielded yet.
        """
        running = self.verifier if isinstance(self.verifier, Running) else None
        modified = frozenset() if running else self.verifier.modified
        for top in sorted({os.fsencode(r) for r in roots}):
            if any(self._covered(top, walked) for walked in self._walked):
                continue  # nested inside a root already walked (not one left out: this one is listed too)
            yield from self._walk(top, directories, modified)
        if not self._walked and self.stats.unreadable:
            raise JwbackupError("nothing to back up: no root can be walked ("
                                + "; ".join(f"{os.fsdecode(p)}: {why}" for p, why in self.stats.unreadable) + ")")
        if running:
            self.verifier = running.result()
            yield from self._passed_over(self.verifier.modified, directories)

    def _covered(self, top: bytes, root: bytes) -> bool:
        """Does the walk of ``root`` meet the root ``top``?  Not when a pruned
        directory lies between them (``/`` and ``/var/cache/keep``)."""
        if top != root and not top.startswith(join(root, b"")):
            return False
        return not any(p.startswith(join(root, b"")) and top.startswith(join(p, b"")) for p in self.prune)

    # The walk keeps two stacks: the directories being listed, and the owned
    # directories entered but not yet yielded (``pending``).  Yielding anything
    # first yields the pending directories, outermost first.  It runs once per
    # entry of the system: the counters are local until it ends.
    def _walk(self, top: bytes, directories: bool, modified: AbstractSet[bytes]) -> Iterator[bytes]:
        prefix = self.prefix
        directory = self.manifest.directory
        stats = self.stats
        yielded = self._yielded
        entries = owned = selected = 0

        try:
            st = os.lstat(prefix + top)
        except OSError as exc:
            logger.warning("root %s cannot be read: %s", os.fsdecode(top), exc.strerror)
            stats.unreadable.append((top, exc.strerror or "unreadable"))
            return
        if not stat.S_ISDIR(st.st_mode):
            why = "not a directory"
            if stat.S_ISLNK(st.st_mode):  # followed nowhere, roots included: name the directory itself
                with suppress(OSError):
                    why = f"a symlink to {os.fsdecode(os.readlink(prefix + top))}, not a directory"
            logger.warning("root %s is %s; skipped", os.fsdecode(top), why)
            stats.unreadable.append((top, why))
            return
        listing = self._enter(top)
        if listing is None:
            marker = next((why for path, why in stats.skipped if path == top), None)
            if marker is not None:  # a listed root left out wholesale: as loud as one that cannot be read
                logger.warning("root %s holds %s; skipped", os.fsdecode(top), marker)
                stats.unreadable.append((top, f"holds {marker}"))
            return
        self._walked.append(top)
        pending: list[bytes] = []
        if _owned_dir(self.manifest.record(top)):
            if directories:
                pending.append(top)
        elif directories or not (listing or top in self._swap):
            stats.selected += 1
            yield top
        base = join(top, b"")
        stack = [(top, base, iter(listing), directory(base) or _NOTHING)]

        try:
            while stack:
                parent, base, children, installed = stack[-1]
                for child in children:  # left, to go down, and taken up again when back
                    name = child.name
                    if child.is_dir(follow_symlinks=False):
                        path = base + name
                        listing = self._enter(path)
                        if listing is None:
                            continue
                        below = path + b"/"
                        stack.append((path, below, iter(listing), directory(below) or _NOTHING))
                        if _owned_dir(installed.get(name)):
                            if directories:
                                pending.append(path)
                            break
                        if not directories and (listing or path in self._swap):
                            break  # listed, it would bring what is below it along: a swap file too
                        down = True
                    else:
                        entries += 1
                        record = installed.get(name)
                        if record is not None:
                            kind = record[0] & KIND_MASK
                            if kind == _FILE:
                                matched = child.is_file(follow_symlinks=False)
                            elif kind == _NO_KIND and not child.is_symlink():
                                matched = not child.is_file(follow_symlinks=False)  # see kindless_match
                            else:
                                matched = self._matches(kind, child, base + name)
                            if matched:
                                if not modified or base + name not in modified:
                                    owned += 1
                                    continue
                                stats.modified += 1
                        path = base + name
                        down = False
                    if pending:
                        selected += len(pending)
                        yielded.update(pending)
                        yield from pending
                        pending.clear()
                    selected += 1
                    yield path
                    if down:
                        break
                else:  # listed to its end
                    stack.pop()
                    if pending and pending[-1] == parent:
                        pending.pop()
        finally:
            stats.entries += entries
            stats.owned += owned
            stats.selected += selected

    def _passed_over(self, modified: AbstractSet[bytes], directories: bool) -> Iterator[bytes]:
        """The paths in ``modified`` that the walk met and left out as installed:
        each after the installed directories above it not yielded yet.

        The walk met a path when every directory from a root walked down to
        it is a directory, not pruned nor skipped; it left it out when it is
        not a directory and of the kind its record says.  A few lstat calls
        each: modified files are few.
        """
        skipped = self.prune | {path for path, _ in self.stats.skipped + self.stats.unreadable}
        for path in sorted(modified):
            top = next((t for t in self._walked if path.startswith(join(t, b""))), None)
            if top is None:
                continue
            above = [top]
            for name in path[len(join(top, b"")):].split(b"/")[:-1]:
                above.append(join(above[-1], name))
            try:
                if any(d in skipped or not stat.S_ISDIR(os.lstat(self.prefix + d).st_mode) for d in above[1:]):
                    continue
                st = os.lstat(self.prefix + path)
            except OSError:
                continue
            record = self.manifest.record(path)
            if record is None or stat.S_ISDIR(st.st_mode) or not self._matches(record[0] & KIND_MASK, _Stated(st), path):
                continue  # the walk went into it, or kept it anyway
            if directories:
                for d in above:
                    if d not in self._yielded and _owned_dir(self.manifest.record(d)):
                        self._yielded.add(d)
                        self.stats.selected += 1
                        yield d
            self.stats.owned -= 1
            self.stats.modified += 1
            self.stats.selected += 1
            yield path

    def _matches(self, kind: int, entry: os.DirEntry, path: bytes) -> bool:
        """Is ``entry`` (not a directory) of the kind (code) its manifest record says?

        A record without a kind (dpkg's): see :func:`kindless_match`.
        """
        if kind == _NO_KIND:
            if entry.is_symlink():
                return kindless_match(stat.S_IFLNK, path, self._canon)
            return not entry.is_file(follow_symlinks=False)
        if kind == _FILE:
            return entry.is_file(follow_symlinks=False)
        if kind == _SYMLINK:
            return entry.is_symlink()
        if kind == _DIR:
            return False  # a directory would have been walked, not judged here
        return not (entry.is_file(follow_symlinks=False) or entry.is_symlink())

    def _without_swap_files(self, path: bytes, listing: list[os.DirEntry]) -> list[os.DirEntry]:
        kept = []
        for entry in listing:
            if entry.name in self._swap[path] and entry.is_file(follow_symlinks=False):
                self.stats.skipped.append((join(path, entry.name), SWAP_FILE))
            else:
                kept.append(entry)
        return kept

    def _enter(self, path: bytes) -> list[os.DirEntry] | None:
        """The listing of directory ``path``, or None when it is not to be walked."""
        real = self.prefix + path
        if path in self.prune:
            self.stats.skipped.append((path, "pruned"))
            return None
        try:
            with os.scandir(real) as it:
                listing = list(it)
        except FileNotFoundError:
            return None  # vanished on a live system
        except OSError as exc:
            logger.warning("cannot list %s: %s", os.fsdecode(path), exc.strerror)
            self.stats.unreadable.append((path, exc.strerror or "unreadable"))
            return None
        self.stats.directories += 1
        if path in self._swap:
            listing = self._without_swap_files(path, listing)
        if _MARKERS.isdisjoint(map(_NAME, listing)):  # in C: almost every directory
            return listing
        for e in listing:
            if e.name == NO_BACKUP:
                self.stats.skipped.append((path, NO_BACKUP.decode()))
                return None
            if e.name == CACHEDIR_TAG and _cachedir_tagged(real):
                self.stats.skipped.append((path, CACHEDIR_TAG.decode()))
                return None
        return listing

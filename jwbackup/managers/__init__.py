"""The package-manager plugin interface and plugin discovery.

A manager is a class registered under the entry-point group
``jwbackup.managers``.  It answers three questions about a system that lives
under ``root`` (``/`` normally, a chroot or mounted disk otherwise):

* ``detect(root)``: is this system managed by me?
* ``manifest(root)``: every path I installed, canonical, with what I recorded
  about it (:class:`Manifest`);
* ``packages(root)``: what is installed, and what was asked for explicitly
  (:class:`Package`), so that a restore knows what to reinstall;
* optionally ``fingerprint(root)``: bytes that change whenever the manifest
  would, read in a fraction of the time the manifest takes (file identities
  and times), or None when it cannot tell right now.  A manager that has it
  gets its manifest kept between runs (:mod:`jwbackup.manifestcache`).

Paths are ``bytes`` and absolute *as seen from inside the system*
(``b"/usr/bin/ls"``), never prefixed with ``root``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import NamedTuple, Protocol

from jwbackup.errors import ManifestError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "jwbackup.managers"

# Kinds of manifest entries.  ``None`` as a kind means the manager does not
# record it (dpkg's *.list files say nothing about file types).
FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
OTHER = "other"


class Digest(NamedTuple):
    algorithm: str  # "md5", as both dpkg and portage record it
    value: str  # lower-case hex


class Entry(NamedTuple):
    """What the package manager recorded about one installed path."""

    kind: str | None
    package: str
    digest: Digest | None = None
    conffile: bool = False
    mtime: int | None = None  # seconds, where the manager records it (portage)
    target: bytes | None = None  # a symlink's target, where the manager records it (portage)


# -- records: how a manifest stores an Entry ---------------------------------------
#
# The manifest is the largest thing a run holds (a system of 1M entries lists
# 600k paths), and an Entry with its Digest costs about 220 bytes.  A manifest
# therefore keeps each path's entry as one bytes object, a *record*:
#
#     flags (1 byte) | package number (uint32 LE) | raw digest | mtime (int64 LE)
#
# flags = kind code | CONFFILE | HAS_MTIME | algorithm code << 5.  The digest
# and the mtime are there only when the flags say so.  A symlink's recorded
# target takes the algorithm code TARGET and ends the record, after the
# mtime: the verification compares it with ``readlink``, as it compares a
# file's digest with its content.  A regular file with an md5 costs one
# 21-byte record; records without a digest or target are shared (all the
# directories of a package are one object).  The walk and the verification
# read records directly; everyone else gets Entry tuples.

KINDS = (None, FILE, DIR, SYMLINK, OTHER)  # index: kind code
KIND_MASK = 0x07
CONFFILE = 0x08
HAS_MTIME = 0x10
ALGORITHMS = (None, "md5", "sha1", "sha256", "sha512")  # index: flags >> 5
DIGEST_SIZES = (0, 16, 20, 32, 64, 0)  # and TARGET's: none, the target follows the mtime
TARGET = len(ALGORITHMS)  # the algorithm code of a record holding a symlink's target
MD5_FILE = KINDS.index(FILE) | ALGORITHMS.index("md5") << 5  # the flags of most records
FREEZE_BATCH = 2048  # directories a builder changes before it freezes them (see Manifest)
RECORD_FORMAT = 1  # the layout above; kept manifests of another are read again
_HEAD = struct.Struct("<BI")
DIGEST_AT = _HEAD.size  # where a record's digest starts
_MTIME = struct.Struct("<q")
_KIND_CODES = {kind: code for code, kind in enumerate(KINDS)}
_ALGORITHM_CODES = {name: code for code, name in enumerate(ALGORITHMS) if name}


def record_digest(record: bytes) -> bytes:
    """The raw digest a record holds (empty when it holds none)."""
    return record[DIGEST_AT:DIGEST_AT + DIGEST_SIZES[record[0] >> 5]]


def record_algorithm(record: bytes) -> str | None:
    """The digest algorithm of a record (None without a digest)."""
    code = record[0] >> 5
    return ALGORITHMS[code] if code != TARGET else None


def record_target(record: bytes) -> bytes | None:
    """The symlink target a record holds, or None."""
    flags = record[0]
    if flags >> 5 != TARGET:
        return None
    return record[DIGEST_AT + _MTIME.size:] if flags & HAS_MTIME else record[DIGEST_AT:]


def split(path: bytes) -> tuple[bytes, bytes]:
    """``path`` as (directory with its trailing slash, name): ``b"/usr/bin/"``,
    ``b"ls"``; ``b"/"`` is (``b"/"``, ``b""``).  The two joined give it back."""
    cut = path.rfind(b"/") + 1
    return path[:cut], path[cut:]


class Manifest(MutableMapping):
    """Every path a package manager installed, keyed by canonical path.

    A mapping of path to :class:`Entry`, stored by directory (``dirs``) as
    records (see above); ``packages`` holds the package names they number.
    """

    # -- storage by directory ----------------------------------------------------
    #
    # Most of a manifest's size was its paths: at 1M entries, 640k paths of 47
    # bytes on average, each a bytes object of 80, in a dict of 20 MB.  The
    # names of one directory are therefore kept as one bytes object, joined by
    # NUL (which no name holds), with a tuple of their records, in the same
    # order:
    #
    #     dirs[b"/usr/bin/"] == (b"ls\0cat\0...", (record_of_ls, record_of_cat, ...))
    #
    # A directory being changed (while the manifest is built, or a path is set
    # or deleted) is a dict of name to record instead, until :meth:`freeze`.
    # Builders freeze between packages once FREEZE_BATCH directories are
    # being changed: the names of all of them at once cost 60 MB at 1M
    # entries, and left the memory that much fragmented after freezing.
    # A manifest that is never frozen is still right, only larger.  The walk
    # asks for one directory's records at a time (:meth:`directory`), the
    # verification for every directory in order (:meth:`listing`).

    def __init__(self, entries: Mapping[bytes, Entry] | None = None, warnings: Iterable[str] = ()):
        self.dirs: dict[bytes, tuple[bytes, tuple[bytes, ...]] | dict[bytes, bytes]] = {}
        self.packages: list[str] = []
        self.warnings: list[str] = list(warnings)
        # What the recorded paths were made canonical through: the symlinks
        # (system path -> target) and the directories that were not symlinks.
        # A kept copy holds while both still are; ``plain`` is dropped once
        # the copy is written.
        self.links: dict[bytes, bytes] = {}
        self.plain: list[bytes] = []
        self._numbers: dict[str, int] = {}
        self._shared: dict[bytes, bytes] = {}
        self._read: tuple[bytes | None, dict[bytes, bytes]] = (None, {})  # the last frozen directory read
        self.changed: list[bytes] = []  # the directories being changed, until :meth:`freeze`
        if entries:
            self.update(entries)
            self.freeze()

    def number(self, package: str) -> int:
        """The number of ``package`` in this manifest's records."""
        number = self._numbers.get(package)
        if number is None:
            number = self._numbers[package] = len(self.packages)
            self.packages.append(package)
        return number

    def head(self, flags: int, package: str) -> bytes:
        """The first bytes of a record: for builders that append digests in bulk."""
        return _HEAD.pack(flags, self.number(package))

    def pack(self, entry: Entry) -> bytes:
        """``entry`` as a record; records without a digest are shared."""
        flags = _KIND_CODES[entry.kind] | (CONFFILE if entry.conffile else 0)
        tail = b""
        if entry.digest is not None:
            algorithm = _ALGORITHM_CODES.get(entry.digest.algorithm)
            if algorithm is None:
                raise ValueError(f"unsupported digest algorithm {entry.digest.algorithm!r}")
            raw = bytes.fromhex(entry.digest.value)
            if len(raw) != DIGEST_SIZES[algorithm]:
                raise ValueError(f"a {entry.digest.algorithm} digest has {DIGEST_SIZES[algorithm]} bytes, not {len(raw)}")
            flags |= algorithm << 5
            tail = raw
        if entry.mtime is not None:
            if not -(1 << 63) <= entry.mtime < 1 << 63:
                raise ValueError(f"mtime {entry.mtime} out of range")
            flags |= HAS_MTIME
            tail += _MTIME.pack(entry.mtime)
        if entry.target is not None:
            if entry.digest is not None or entry.kind != SYMLINK or not entry.target:
                raise ValueError("a target is recorded for a symlink alone, without a digest, and is not empty")
            flags |= TARGET << 5
            tail += entry.target
        record = self.head(flags, entry.package) + tail
        return record if tail else self._shared.setdefault(record, record)

    def directory(self, base: bytes) -> dict[bytes, bytes] | None:
        """The records of the directory ``base`` (with its trailing slash) by name, or None.

        Not to be changed: it may be the manifest's own."""
        names = self.dirs.get(base)
        if names is None or type(names) is dict:
            return names
        return dict(zip(names[0].split(b"\0"), names[1]))

    def record(self, path: bytes) -> bytes | None:
        """The record of ``path``, or None."""
        base, name = split(path)
        if self._read[0] != base:
            names = self.dirs.get(base)
            if names is None:
                return None
            if type(names) is dict:
                return names.get(name)
            self._read = (base, self.directory(base))
        return self._read[1].get(name)

    def listing(self) -> Iterator[tuple[bytes, Iterable[bytes], Iterable[bytes]]]:
        """Every directory as (base, names, their records), in a fixed order."""
        for base, names in self.dirs.items():
            if type(names) is dict:
                yield base, names.keys(), names.values()
            else:
                yield base, names[0].split(b"\0"), names[1]

    def records(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (path, record), in the order of :meth:`listing`."""
        for base, names, records in self.listing():
            yield from zip(map(base.__add__, names), records)

    def changing(self, base: bytes) -> dict[bytes, bytes]:
        """The records of directory ``base`` by name, to change (until :meth:`freeze`)."""
        names = self.dirs.get(base)
        if type(names) is not dict:
            names = self.dirs[base] = self.directory(base) or {}
            self.changed.append(base)
            self._read = (None, {})
        return names

    def freeze(self, at_least: int = 0) -> None:
        """Store every directory being changed compactly again, if there are
        ``at_least`` of them; empty ones go."""
        if len(self.changed) < at_least:
            return
        dirs = self.dirs
        for base in self.changed:
            names = dirs[base]
            if names:
                dirs[base] = (b"\0".join(names), tuple(names.values()))
            else:
                del dirs[base]
        self.changed.clear()

    def entry(self, record: bytes) -> Entry:
        """The :class:`Entry` a record stands for."""
        flags, number = _HEAD.unpack_from(record)
        algorithm = record_algorithm(record)
        digest = record_digest(record)
        return Entry(
            kind=KINDS[flags & KIND_MASK],
            package=self.packages[number],
            digest=Digest(algorithm, digest.hex()) if algorithm else None,
            conffile=bool(flags & CONFFILE),
            mtime=_MTIME.unpack_from(record, DIGEST_AT + len(digest))[0] if flags & HAS_MTIME else None,
            target=record_target(record),
        )

    def get(self, path: bytes, default: Entry | None = None) -> Entry | None:
        record = self.record(path)
        return default if record is None else self.entry(record)

    def items(self) -> Iterator[tuple[bytes, Entry]]:  # type: ignore[override]
        entry = self.entry
        return ((path, entry(record)) for path, record in self.records())

    def __getitem__(self, path: bytes) -> Entry:
        record = self.record(path)
        if record is None:
            raise KeyError(path)
        return self.entry(record)

    def __setitem__(self, path: bytes, entry: Entry) -> None:
        record = self.pack(entry)
        base, name = split(path)
        self.changing(base)[name] = record

    def __delitem__(self, path: bytes) -> None:
        base, name = split(path)
        if self.record(path) is None:
            raise KeyError(path)
        del self.changing(base)[name]

    def __contains__(self, path: object) -> bool:
        return isinstance(path, bytes) and self.record(path) is not None

    def __iter__(self) -> Iterator[bytes]:
        return (path for path, _ in self.records())

    def __len__(self) -> int:
        return sum(len(names) if type(names) is dict else len(names[1]) for names in self.dirs.values())


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    architecture: str | None = None
    manual: bool = True  # installed explicitly (apt-mark manual, portage world)


class Manager(Protocol):
    name: str

    def detect(self, root: str) -> bool: ...

    def manifest(self, root: str) -> Manifest: ...

    def packages(self, root: str) -> list[Package]: ...


def available() -> dict[str, type]:
    """All manager classes registered under the entry-point group, by name."""
    managers = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            managers[ep.name] = ep.load()
        except Exception as exc:  # a broken third-party plugin must not stop a backup
            logger.warning("package manager plugin %r cannot be loaded: %s", ep.name, exc)
    return managers


def detect(root: str = "/", name: str | None = None) -> Manager:
    """The manager of the system under ``root``, or the one called ``name``."""
    managers = available()
    if name is not None:
        if name not in managers:
            raise ManifestError(
                f"unknown package manager {name!r}; known: {', '.join(sorted(managers)) or 'none'}"
            )
        return managers[name]()
    for mgr_name in sorted(managers):
        manager = managers[mgr_name]()
        if manager.detect(root):
            logger.debug("package manager: %s", mgr_name)
            return manager
    raise ManifestError(
        f"no known package manager manages {root} (tried: {', '.join(sorted(managers)) or 'none'})"
    )

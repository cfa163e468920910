"""A manifest read once is kept until the package database changes.

Reading dpkg's database costs 0.4 s at 200k entries and 3 s at 1M, every
run, for a database that changes when packages do.  A manager that can say
cheaply what its manifest is read from (``fingerprint(root)``, see
:mod:`jwbackup.managers`) gets its manifest kept in the cache directory, and
the next run loads it when:

* the fingerprint is the same (dpkg: the identity and times of ``status``,
  ``diversions`` and every file in ``info/``, none changed in the last two
  seconds: a manager returns None while it cannot tell);
* it was written by this version of jwbackup for this manager;
* every symlink the recorded paths were made canonical through still points
  where it did (a changed ``/bin -> usr/bin`` changes what the paths mean),
  and every directory they went through is still not a symlink (an admin who
  moves ``/var/lib/mysql`` away and links it back changes them too);
* every frame's checksum holds.

Anything else rebuilds it from the database.  A manifest is kept only if the
fingerprint did not change while it was read, so a package installed during
the read is never hidden.

Format: a line ``jwbackup-manifest-cache <version> <manager>``, then frames
of (payload length, crc32 of the payload), little-endian, and a marshal
payload: first (fingerprint, jwbackup version, record format, links,
packages, warnings, plain directory count, directory count), then the plain
directories and the manifest's directories (bases, joined names, records) in
chunks, so that neither writing nor reading ever holds a second copy of the
manifest.
"""

from __future__ import annotations

import logging
import marshal
import os
import struct
import zlib
from itertools import islice
from typing import BinaryIO

from jwbackup import __version__, cachedir
from jwbackup.managers import RECORD_FORMAT, Manager, Manifest

logger = logging.getLogger(__name__)

MAGIC = b"jwbackup-manifest-cache"
VERSION = 2  # 1 kept paths whole
CHUNK = 8192  # plain directories per frame
DIR_CHUNK = 1024  # manifest directories per frame: 8k paths
_FRAME = struct.Struct("<II")


class _Stale(Exception):
    """The kept manifest does not hold: why, for the log."""


def cache_file(manager: Manager) -> bytes:
    """The system path of the kept manifest of ``manager``."""
    return cachedir.CACHE_DIR + b"/manifest-" + os.fsencode(manager.name)


def load(manager: Manager, root: str) -> tuple[Manifest, bool]:
    """The manifest of the system at ``root``, and whether it came from the cache."""
    fingerprint = getattr(manager, "fingerprint", None)
    if fingerprint is None:
        return manager.manifest(root), False
    prefix = os.fsencode(root).rstrip(b"/")
    path = prefix + cache_file(manager)
    try:
        before = fingerprint(root)
    except OSError:  # the manager says what is wrong when it reads the database
        before = None
    if before is None:
        return manager.manifest(root), False
    try:
        return _read(path, manager.name, before, prefix), True
    except FileNotFoundError:
        pass
    except _Stale as why:
        logger.info("kept %s manifest not used: %s", manager.name, why)
    except (OSError, EOFError, ValueError, TypeError, AttributeError) as exc:
        logger.warning("kept %s manifest %s ignored: unreadable (%s); reading the package database",
                       manager.name, os.fsdecode(path), exc)
    manifest = manager.manifest(root)
    if fingerprint(root) == before:
        cachedir.save(path, lambda f: _write(f, manager.name, before, manifest), "kept manifest")
    else:
        logger.info("the %s database changed while it was read; its manifest is not kept", manager.name)
    manifest.plain = []  # only the kept copy needs them
    return manifest, False


def _write(f: BinaryIO, name: str, fingerprint: bytes, manifest: Manifest) -> None:
    f.write(b"%s %d %s\n" % (MAGIC, VERSION, os.fsencode(name)))
    _frame(f, (fingerprint, __version__, RECORD_FORMAT, manifest.links, manifest.packages, manifest.warnings,
               len(manifest.plain), len(manifest.dirs)))
    for start in range(0, len(manifest.plain), CHUNK):
        _frame(f, manifest.plain[start:start + CHUNK])
    manifest.freeze()
    dirs = iter(manifest.dirs.items())
    while chunk := list(islice(dirs, DIR_CHUNK)):
        bases, names = zip(*chunk)
        _frame(f, (bases, *zip(*names)))


def _frame(f: BinaryIO, value: object) -> None:
    payload = marshal.dumps(value)
    f.write(_FRAME.pack(len(payload), zlib.crc32(payload)))
    f.write(payload)


def _read(path: bytes, name: str, fingerprint: bytes, prefix: bytes) -> Manifest:
    with open(path, "rb") as f:
        line = f.readline(200)
        if line != b"%s %d %s\n" % (MAGIC, VERSION, os.fsencode(name)):
            if line.startswith(MAGIC + b" "):
                raise _Stale("another format")
            raise ValueError("not a kept manifest")
        kept, version, record_format, links, packages, warnings, plain, count = _unframe(f)
        if (version, record_format) != (__version__, RECORD_FORMAT):
            raise _Stale(f"kept by jwbackup {version}")
        if kept != fingerprint:
            raise _Stale("the package database changed")
        for link, target in links.items():
            try:
                now = os.readlink(prefix + link)
            except OSError:
                now = None
            if now != target:
                raise _Stale(f"the symlink {os.fsdecode(link)} changed")
        for _ in range(_frames(plain, CHUNK)):
            for directory in _unframe(f):
                if os.path.islink(prefix + directory):
                    raise _Stale(f"{os.fsdecode(directory)} is a symlink now")
        manifest = Manifest(warnings=warnings)
        manifest.links = links
        for package in packages:
            manifest.number(package)
        dirs = manifest.dirs
        for _ in range(_frames(count, DIR_CHUNK)):
            bases, names, records = _unframe(f)
            dirs.update(zip(bases, zip(names, records)))
        if len(dirs) != count or f.read(1):
            raise ValueError(f"{len(dirs)} directories where {count} were kept")
    return manifest


def _frames(items: int, chunk: int) -> int:
    return -(-items // chunk)


def _unframe(f: BinaryIO):
    head = f.read(_FRAME.size)
    if len(head) != _FRAME.size:
        raise EOFError("truncated")
    size, crc = _FRAME.unpack(head)
    payload = f.read(size)
    if len(payload) != size or zlib.crc32(payload) != crc:
        raise ValueError("checksum mismatch")
    return marshal.loads(payload)

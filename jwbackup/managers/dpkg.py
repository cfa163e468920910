"""dpkg: what Debian's package manager installed under ``root``.

Reads the admin directory ``<root>/var/lib/dpkg`` as ``dpkg --root`` would:

* ``status`` (through python-debian): installed packages and their conffiles;
* ``info/<pkg>.list`` / ``info/<pkg>:<arch>.list``: every path a package
  installed (directories included, file types not recorded);
* ``info/<pkg>.md5sums``: the md5 of each regular file (a listed path
  without one is a directory or a symlink, or a file nothing verifies: a
  regular file there is backed up, see :func:`jwbackup.select.kindless_match`);
* ``diversions``: paths dpkg installs under another name.

Every path is canonicalised (:class:`jwbackup.paths.Canonicalizer`), so the
``/sbin/...`` that dpkg lists on a merged-/usr system is recorded as
``/usr/sbin/...``.  Anything unreadable or malformed is skipped with a warning
in :attr:`Manifest.warnings` (for the caller to log): garbage may make a file be backed up needlessly,
never left out wrongly.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import posixpath
import re
import struct
import time
from binascii import unhexlify
from contextlib import contextmanager
from itertools import compress, repeat
from operator import itemgetter
from typing import Callable, Iterable, NamedTuple

from jwbackup.cachedir import RACY_NS
from jwbackup.errors import ManifestError
from jwbackup.managers import (
    CONFFILE, FILE, FREEZE_BATCH, KIND_MASK, MD5_FILE, Digest, Entry, Manifest, Package, split,
)
from jwbackup.paths import Canonicalizer

logger = logging.getLogger(__name__)


def _paragraphs(data: bytes, **kwargs):
    """deb822 paragraphs of ``data`` through python-debian.

    Imported here, not at the top: the plugin is loaded on every system, and a
    Gentoo machine need not have python-debian.
    """
    from debian import deb822

    return deb822.Deb822.iter_paragraphs(data.split(b"\n"), use_apt_pkg=False, encoding="latin-1", **kwargs)

ADMIN_DIR = b"var/lib/dpkg"
EXTENDED_STATES = b"var/lib/apt/extended_states"
NOT_INSTALLED_STATES = frozenset({"not-installed", "config-files"})
CONFFILE_FLAGS = frozenset({b"obsolete", b"remove-on-upgrade"})
STATUS_FIELDS = ["Package", "Status", "Version", "Architecture", "Multi-Arch", "Conffiles"]
MAX_LINE_WARNINGS = 10  # per file; the rest are counted in one more warning

_MD5_HEX = re.compile(rb"[0-9a-fA-F]{32}")
# md5sum(1) output, "<md5>  <path>" (or " *" in binary mode), path without the leading "/"
# (dpkg skips any "/" and "./" there).
_MD5SUMS_LINE = re.compile(rb"([0-9a-fA-F]{32}) [ *](.+)", re.S)
_MD5_FIELD = itemgetter(slice(None, 32))
_MD5_SEPARATOR = itemgetter(slice(32, 34))
_MD5_PATH = itemgetter(slice(34, None))
_MD5_SEPARATORS = frozenset({b"  ", b" *"})
_LOWER_HEX = b"0123456789abcdef"
_STAT_ID = struct.Struct("<QQQqq")


class Conffile(NamedTuple):
    path: bytes
    digest: Digest | None  # None: dpkg has no md5 yet ("newconffile")
    obsolete: bool
    remove_on_upgrade: bool = False  # the package no longer ships it; dpkg removes it on upgrade


class StatusPackage(NamedTuple):
    name: str
    version: str
    architecture: str | None
    multi_arch: str | None
    state: str  # the third word of Status: installed, config-files, ...
    conffiles: tuple[Conffile, ...]

    @property
    def installed(self) -> bool:
        return self.state not in NOT_INSTALLED_STATES


class Dpkg:
    """The dpkg manager plugin."""

    name = "dpkg"

    def detect(self, root: str) -> bool:
        return os.path.isfile(_admin(root, b"status"))

    def manifest(self, root: str) -> Manifest:
        return load_manifest(root)

    def fingerprint(self, root: str) -> bytes | None:
        """What the manifest is read from: the identity and times of the status
        and diversions files and of every file in ``info/``.  Any write moves a
        ctime; None while one is too recent to tell a second write from the first."""
        h = hashlib.sha256()
        newest = 0
        info = _admin(root, b"info")
        with os.scandir(info) as it:
            names = sorted(entry.name for entry in it)
        for path in (_admin(root, b"status"), _admin(root, b"diversions"), info,
                     *(os.path.join(info, name) for name in names)):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                h.update(b"-" + path + b"\0")
                continue
            h.update(path + b"\0" + _STAT_ID.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            newest = max(newest, st.st_ctime_ns)
        return None if newest > time.time_ns() - RACY_NS else h.digest()

    def packages(self, root: str) -> list[Package]:
        return installed_packages(root, read_status(_admin(root, b"status")))


def installed_packages(root: str, status: list[StatusPackage]) -> list[Package]:
    """The installed packages among ``status`` (:func:`read_status` of ``root``), each marked manual or not."""
    auto = read_auto_installed(os.path.join(os.fsencode(root), EXTENDED_STATES))
    return [Package(p.name, p.version, p.architecture, manual=not _is_auto(p, auto)) for p in status if p.installed]


def _admin(root: str | bytes, *parts: bytes) -> bytes:
    return os.path.join(os.fsencode(root), ADMIN_DIR, *parts)


# -- status ------------------------------------------------------------------


def read_status(path: bytes) -> list[StatusPackage]:
    """Every package paragraph of the dpkg status file at ``path``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ManifestError(
            f"cannot read the dpkg status file {os.fsdecode(path)}: {exc.strerror}"
        ) from exc
    # latin-1 maps every byte to one character, so conffile names that are not
    # UTF-8 come back unchanged through .encode("latin-1").
    paragraphs = _paragraphs(data, fields=STATUS_FIELDS)
    packages = []
    for para in paragraphs:
        name = para.get("Package")
        status = para.get("Status", "").split()
        if not name or len(status) != 3:
            logger.debug("%s: skipping a paragraph without Package or Status", os.fsdecode(path))
            continue
        packages.append(
            StatusPackage(
                name=name,
                version=para.get("Version", ""),
                architecture=para.get("Architecture"),
                multi_arch=para.get("Multi-Arch"),
                state=status[2],
                conffiles=tuple(parse_conffiles(para.get("Conffiles", ""))),
            )
        )
    return packages


def parse_conffiles(value: str) -> Iterable[Conffile]:
    """The ``Conffiles:`` field: `` <path> <md5> [obsolete] [remove-on-upgrade]`` lines.

    Parsed from the end because the path may contain spaces.
    """
    for line in value.encode("latin-1").split(b"\n"):
        line = line.strip(b" \t")
        if not line:
            continue
        words = line.split(b" ")
        flags = set()
        while len(words) > 2 and words[-1] in CONFFILE_FLAGS:
            flags.add(words.pop())
        if len(words) < 2:
            continue
        md5 = words.pop()
        path = b" ".join(words)
        digest = Digest("md5", md5.decode("ascii").lower()) if _MD5_HEX.fullmatch(md5) else None
        yield Conffile(path, digest, b"obsolete" in flags, b"remove-on-upgrade" in flags)


def removed_conffiles(root: str | bytes, status: list[StatusPackage] | None = None) -> list[bytes]:
    """The conffiles of installed packages that are not on the system at ``root``
    (``status``: its :func:`read_status`, when already read).

    dpkg takes a deleted conffile for an admin's choice and leaves it deleted on
    upgrade, but a fresh install puts it back.  A conffile another package or
    the admin diverted is looked for, and named, under its diverted name.
    """
    diversions = read_diversions(_admin(root, b"diversions"))
    removed = set()
    for package in read_status(_admin(root, b"status")) if status is None else status:
        if not package.installed:
            continue
        for conffile in package.conffiles:
            if conffile.obsolete or conffile.remove_on_upgrade or not conffile.path.startswith(b"/"):
                continue  # not one a fresh install brings
            to, by = diversions.get(conffile.path, (conffile.path, package.name))
            path = conffile.path if by == package.name else to
            if not os.path.lexists(os.path.join(os.fsencode(root), path.lstrip(b"/"))):
                removed.add(path)
    return sorted(removed)


# -- admin-directory files ---------------------------------------------------


def read_diversions(path: bytes) -> dict[bytes, tuple[bytes, str]]:
    """``{from: (to, package)}`` from dpkg's diversions file; package ``":"`` is a local diversion."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ManifestError(
            f"cannot read the dpkg diversions file {os.fsdecode(path)}: {exc.strerror}"
        ) from exc
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) % 3:
        raise ManifestError(
            f"{os.fsdecode(path)}: {len(lines)} lines, not a whole number of three-line diversion records"
        )
    diversions = {}
    for i in range(0, len(lines), 3):
        frm, to, package = lines[i : i + 3]
        if not (frm.startswith(b"/") and to.startswith(b"/") and package):
            raise ManifestError(f"{os.fsdecode(path)}, line {i + 1}: malformed diversion record")
        diversions[frm] = (to, package.decode("utf-8", "replace"))
    return diversions


def read_auto_installed(path: bytes) -> set[tuple[str, str | None]]:
    """``(package, architecture)`` pairs apt marked ``Auto-Installed: 1``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return set()
    except OSError as exc:
        logger.warning(
            "cannot read %s (%s); all packages count as installed manually", os.fsdecode(path), exc.strerror
        )
        return set()
    auto = set()
    for para in _paragraphs(data):
        if para.get("Auto-Installed", "0").strip() == "1" and para.get("Package"):
            auto.add((para["Package"], para.get("Architecture")))
    return auto


def _is_auto(package: StatusPackage, auto: set[tuple[str, str | None]]) -> bool:
    if (package.name, package.architecture) in auto or (package.name, None) in auto:
        return True
    # apt records an Architecture: all package under the native architecture.
    return package.architecture == "all" and any(name == package.name for name, _ in auto)


def _read_info(path: bytes, warn: Callable[[str], None], missing_ok: bool = False) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        if not missing_ok:
            warn(f"{os.fsdecode(path)}: missing; the package's files count as not installed by dpkg")
        return None
    except OSError as exc:
        warn(f"{os.fsdecode(path)}: cannot read: {exc.strerror}")
        return None


def parse_list(data: bytes, path: bytes, warn: Callable[[str], None]) -> list[bytes]:
    """The paths of a ``*.list`` file; lines not starting with ``/`` are skipped with a warning."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if all(map(bytes.startswith, lines, repeat(b"/"))):
        return lines
    bad = [n for n, line in enumerate(lines, 1) if not line.startswith(b"/")]
    _warn_lines(warn, path, bad, "not an absolute path")
    return [line for line in lines if line.startswith(b"/")]


def parse_md5sums(data: bytes, path: bytes, warn: Callable[[str], None]) -> tuple[list[bytes], list[bytes]]:
    """Absolute paths and their md5 hex (lower case) from a ``*.md5sums`` file.

    Bad lines are skipped with a warning.  Well-formed files (all of them, in
    practice) are checked and sliced with C-level map() calls.
    """
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if not lines:
        return [], []
    md5s = list(map(_MD5_FIELD, lines))
    if (
        min(map(len, lines)) > 34
        and set(map(_MD5_SEPARATOR, lines)) <= _MD5_SEPARATORS
        and not b"".join(md5s).translate(None, _LOWER_HEX)
    ):
        paths = list(map(_MD5_PATH, lines))
    else:
        md5s, paths, bad = [], [], []
        for n, line in enumerate(lines, 1):
            match = _MD5SUMS_LINE.fullmatch(line)
            if match:
                md5s.append(match.group(1).lower())
                paths.append(match.group(2))
            elif line:
                bad.append(n)
        _warn_lines(warn, path, bad, "not '<md5>  <path>'")
    if any(map(bytes.startswith, paths, repeat((b"/", b"./")))):
        paths = list(map(_skip_slash_dotslash, paths))
    return list(map(b"/".__add__, paths)), md5s


def _skip_slash_dotslash(path: bytes) -> bytes:
    """``path`` without the ``/`` and ``./`` it starts with, as dpkg reads an
    md5sums line (``./usr/bin/e`` is ``/usr/bin/e``)."""
    while path.startswith((b"/", b"./")):
        path = path[1:]
    return path


def _warn_lines(warn: Callable[[str], None], path: bytes, numbers: list[int], what: str) -> None:
    name = os.fsdecode(path)
    for n in numbers[:MAX_LINE_WARNINGS]:
        warn(f"{name}, line {n}: {what}; line ignored")
    if len(numbers) > MAX_LINE_WARNINGS:
        warn(f"{name}: {len(numbers) - MAX_LINE_WARNINGS} more malformed lines ignored")


# -- the manifest --------------------------------------------------------------

def _richer(a: bytes, b: bytes) -> bool:
    """Does record ``a`` record more than ``b`` (conffile flag, then a kind, then a digest)?"""
    return _richness(a[0]) > _richness(b[0])


def _richness(flags: int) -> tuple[bool, bool, bool]:
    return bool(flags & CONFFILE), bool(flags & KIND_MASK), bool(flags >> 5)


def canonicalize(records: dict[bytes, bytes], canon: Canonicalizer) -> dict[bytes, bytes]:
    """``records`` (absolute paths) re-keyed by canonical path, in place.

    Each parent directory is resolved once, and only the paths whose name
    changes are touched in Python; the rest is C-level set and map work.  A
    listed path that is the parent of another listed path is a directory in
    the package, so it is resolved completely: ``/bin`` listed by a package
    is the directory ``/usr/bin``, not the usrmerge symlink.  When two
    recorded paths meet on one canonical name, the record with more
    information wins.
    """
    keys = list(records)
    parent_of = list(map(itemgetter(0), map(bytes.rpartition, keys, repeat(b"/"))))
    moved = {}
    for parent in set(parent_of):
        resolved = canon.directory(_normal(parent))
        if resolved != (parent or b"/"):
            moved[parent] = resolved
    renamed = set(compress(keys, map(bytes.endswith, keys, repeat((b"/", b"/.", b"/..")))))
    if moved:
        renamed.update(compress(keys, map(moved.__contains__, parent_of)))
        renamed.update(moved.keys() & records.keys())
    popped = [(key, records.pop(key)) for key in sorted(renamed)]  # sorted: the same order every run
    for key, record in popped:
        new = moved.get(key) or canon(key)
        old = records.get(new)
        if old is None or _richer(record, old):
            records[new] = record
    return records


def _normal(directory: bytes) -> bytes:
    if b"//" not in directory and b"/." not in directory:
        return directory or b"/"
    normal = posixpath.normpath(directory or b"/")
    return normal[1:] if normal.startswith(b"//") else normal


@contextmanager
def _gc_paused():
    """Parsing makes many containers (status paragraphs, a dict and lists per
    package), each counted towards a cyclic GC pass; none of them can be freed."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _list_owner(info_names: set[bytes], package: StatusPackage) -> str | None:
    """The info-file stem dpkg uses for ``package``: ``name:arch`` for Multi-Arch: same."""
    qualified = f"{package.name}:{package.architecture}"
    candidates = [qualified, package.name] if package.multi_arch == "same" else [package.name, qualified]
    for owner in candidates:
        if os.fsencode(owner) + b".list" in info_names:
            return owner
    return None


def load_manifest(root: str | bytes) -> Manifest:
    """Every path dpkg installed under ``root``, canonical, with md5s and conffile flags."""
    with _gc_paused():
        return _load_manifest(root)


def _load_manifest(root: str | bytes) -> Manifest:
    manifest = Manifest()

    def warn(message: str) -> None:
        manifest.warnings.append(message)  # logged by whoever loads it, kept or not: once

    info_dir = _admin(root, b"info")
    status = read_status(_admin(root, b"status"))
    diversions = read_diversions(_admin(root, b"diversions"))
    try:
        info_names = set(os.listdir(info_dir))
    except OSError as exc:
        raise ManifestError(
            f"cannot read the dpkg info directory {os.fsdecode(info_dir)}: {exc.strerror}"
        ) from exc

    # Each package's paths are made canonical before they join the rest, in
    # the manifest's directories.
    canon = Canonicalizer(root)
    for package in sorted(status, key=lambda p: (p.name, p.architecture or "")):
        if not package.installed:
            continue
        owner = _list_owner(info_names, package)
        if owner is None:
            warn(
                f"{os.fsdecode(info_dir)}: no .list file for installed package "
                f"{package.name}:{package.architecture}; its files count as not installed by dpkg"
            )
            continue
        owned = _package_records(manifest, package, owner, os.path.join(info_dir, os.fsencode(owner)), warn)
        for frm in sorted(owned.keys() & diversions.keys()):
            to, diverter = diversions[frm]
            if diverter != package.name:
                # dpkg installed this package's ``frm`` as ``to``.
                owned[to] = owned.pop(frm)
        _add(manifest, canonicalize(owned, canon))
        manifest.freeze(at_least=FREEZE_BATCH)

    manifest.freeze()
    manifest.links = canon.links
    manifest.plain = canon.plain()
    return manifest


def _add(manifest: Manifest, owned: dict[bytes, bytes]) -> None:
    """One package's records join the manifest's.  A path listed by an earlier
    package too (a directory, a Multi-Arch: same file) keeps the record with a
    kind that records more."""
    last, names = None, {}
    for path, record in owned.items():
        base, name = split(path)
        if base != last:  # a package lists a directory's files together
            last, names = base, manifest.changing(base)
        old = names.get(name)
        if old is None or not (old[0] & KIND_MASK and _richer(old, record)):
            names[name] = record


def _package_records(
    manifest: Manifest, package: StatusPackage, owner: str, stem: bytes, warn: Callable[[str], None]
) -> dict[bytes, bytes]:
    """What one package's ``.list``, ``.md5sums`` and conffiles say, under the names it ships."""
    data = _read_info(stem + b".list", warn)
    if data is None:
        return {}
    listed = parse_list(data, stem + b".list", warn)
    owned = dict.fromkeys(listed, manifest.pack(Entry(None, owner)))
    data = _read_info(stem + b".md5sums", warn, missing_ok=True)
    if data:
        paths, md5s = parse_md5sums(data, stem + b".md5sums", warn)
        # One bytes object per file, built in C: the record head, then the raw md5.
        files = dict(zip(paths, map(manifest.head(MD5_FILE, owner).__add__, map(unhexlify, md5s))))
        count = len(owned)
        owned.update(files)
        if len(owned) != count:
            for path in files.keys() - set(listed):
                del owned[path]  # dpkg owns what the .list names, nothing else
    for conffile in package.conffiles:
        if not conffile.path.startswith(b"/"):
            warn(f"status: {package.name}: conffile {os.fsdecode(conffile.path)!r} is not absolute; ignored")
        elif conffile.obsolete:
            # The package no longer ships it: the file is the admin's now.
            owned.pop(conffile.path, None)
        else:
            owned[conffile.path] = manifest.pack(Entry(FILE, owner, conffile.digest, conffile=True))
    return owned

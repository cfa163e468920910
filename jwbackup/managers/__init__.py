"""The package-manager plugin interface and plugin discovery.

A manager is a class registered under the entry-point group
``jwbackup.managers``.  It answers three questions about a system that lives
under ``root`` (``/`` normally, a chroot or mounted disk otherwise):

* ``detect(root)``: is this system managed by me?
* ``manifest(root)``: every path I installed, canonical, with what I recorded
  about it (:class:`Manifest`);
* ``packages(root)``: what is installed, and what was asked for explicitly
  (:class:`Package`), so that a restore knows what to reinstall.

Paths are ``bytes`` and absolute *as seen from inside the system*
(``b"/usr/bin/ls"``), never prefixed with ``root``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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


@dataclass
class Manifest:
    """Every path a package manager installed, keyed by canonical path."""

    entries: dict[bytes, Entry] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __contains__(self, path: bytes) -> bool:
        return path in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, path: bytes) -> Entry | None:
        return self.entries.get(path)


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

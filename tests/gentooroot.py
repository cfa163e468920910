"""Build fake Gentoo roots: real files on disk plus a vdb that records them.

    root = GentooRoot(tmp_path / "gentoo")
    root.package("app-misc/foo-1.0",
                 files={b"/usr/bin/foo": b"#!/bin/sh\n"},
                 dirs=[b"/usr/share/foo"],
                 symlinks={b"/usr/bin/f": b"foo"})
    root.world(["app-misc/foo"])
    root.write()
    (root.path / "usr/bin/foo").write_bytes(b"changed")   # now modified

``write()`` creates every file, directory and symlink under ``root.path`` and
writes ``var/db/pkg/<cpv>/`` with CONTENTS (md5 and mtime of what it wrote,
parent directories listed as portage lists them) and the metadata files
vardbapi reads (CATEGORY, PF, SLOT, EAPI, repository, COUNTER, ...).  Every
recorded thing gets the mtime ``root.mtime``.  Paths are bytes, absolute as
seen from inside the system.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

MTIME = 1_700_000_000


@dataclass
class GentooPackage:
    cpv: str
    files: dict[bytes, bytes] = field(default_factory=dict)
    dirs: list[bytes] = field(default_factory=list)
    symlinks: dict[bytes, bytes] = field(default_factory=dict)
    fifos: list[bytes] = field(default_factory=list)
    extra_lines: list = field(default_factory=list)  # raw CONTENTS lines (str or bytes), e.g. garbage
    slot: str = "0"
    repository: str = "gentoo"
    counter: int = 0

    @property
    def category(self) -> str:
        return self.cpv.split("/", 1)[0]

    @property
    def pf(self) -> str:
        return self.cpv.split("/", 1)[1]


class GentooRoot:
    """A fake Gentoo system under ``path``; see the module docstring."""

    def __init__(self, path, mtime: int = MTIME):
        self.path = Path(path)
        self.mtime = mtime
        self.packages: dict[str, GentooPackage] = {}
        self._world: list[str] = []
        self._world_sets: list[str] = []
        self._sets: dict[str, list[str]] = {}
        self._profile_env: dict[str, str] = {}

    def package(self, cpv: str, files=None, dirs=(), symlinks=None, fifos=(), extra_lines=(),
                slot: str = "0", repository: str = "gentoo") -> GentooPackage:
        """Declare an installed package ``cat/name-version``; returns its record."""
        for name in [*(files or {}), *dirs, *(symlinks or {}), *fifos]:
            if not name.startswith(b"/") or b"\n" in name:
                raise ValueError(f"CONTENTS cannot record {name!r}")
        pkg = GentooPackage(
            cpv=cpv,
            files=dict(files or {}),
            dirs=list(dirs),
            symlinks=dict(symlinks or {}),
            fifos=list(fifos),
            extra_lines=list(extra_lines),
            slot=slot,
            repository=repository,
            counter=len(self.packages) + 1,
        )
        self.packages[cpv] = pkg
        return pkg

    def world(self, atoms) -> None:
        """Lines of /var/lib/portage/world (atoms, or @sets)."""
        self._world = list(atoms)

    def world_sets(self, sets) -> None:
        """Lines of /var/lib/portage/world_sets, e.g. ["@desktop"]."""
        self._world_sets = list(sets)

    def set(self, name: str, atoms) -> None:
        """A user set: /etc/portage/sets/<name>."""
        self._sets[name] = list(atoms)

    def profile_env(self, **variables: str) -> None:
        """Variables for /etc/profile.env (what env-update writes), e.g. CONFIG_PROTECT."""
        self._profile_env.update(variables)

    def join(self, path: bytes) -> bytes:
        """The host path of the system path ``path``."""
        return os.fsencode(self.path) + path

    def contents_file(self, cpv: str) -> Path:
        return self.path / "var/db/pkg" / cpv / "CONTENTS"

    def write(self) -> Path:
        """Create files and vdb on disk; returns ``self.path``."""
        self.path.mkdir(parents=True, exist_ok=True)
        for pkg in self.packages.values():
            self._write_package(pkg)
        state = self.path / "var/lib/portage"
        state.mkdir(parents=True, exist_ok=True)
        if self._world:
            (state / "world").write_text("".join(f"{a}\n" for a in self._world))
        if self._world_sets:
            (state / "world_sets").write_text("".join(f"{s}\n" for s in self._world_sets))
        for name, atoms in self._sets.items():
            sets_dir = self.path / "etc/portage/sets"
            sets_dir.mkdir(parents=True, exist_ok=True)
            (sets_dir / name).write_text("".join(f"{a}\n" for a in atoms))
        if self._profile_env:
            (self.path / "etc").mkdir(exist_ok=True)
            (self.path / "etc/profile.env").write_text(
                "".join(f"export {k}='{v}'\n" for k, v in self._profile_env.items())
            )
        return self.path

    def _write_package(self, pkg: GentooPackage) -> None:
        lines: list[bytes] = []
        listed: set[bytes] = set()

        def directory(path: bytes) -> None:
            if path in (b"/", b"") or path in listed:
                return
            directory(posixpath.dirname(path))
            os.makedirs(self.join(path), exist_ok=True)
            listed.add(path)
            lines.append(b"dir " + path)

        for path in pkg.dirs:
            directory(path)
        for path, data in pkg.files.items():
            directory(posixpath.dirname(path))
            host = self.join(path)
            with open(host, "wb") as f:
                f.write(data)
            os.utime(host, (self.mtime, self.mtime))
            md5 = hashlib.md5(data).hexdigest().encode()
            lines.append(b"obj %s %s %d" % (path, md5, self.mtime))
        for path, target in pkg.symlinks.items():
            directory(posixpath.dirname(path))
            host = self.join(path)
            if os.path.lexists(host):
                os.unlink(host)
            os.symlink(target, host)
            os.utime(host, (self.mtime, self.mtime), follow_symlinks=False)
            lines.append(b"sym %s -> %s %d" % (path, target, self.mtime))
        for path in pkg.fifos:
            directory(posixpath.dirname(path))
            host = self.join(path)
            if not os.path.lexists(host):
                os.mkfifo(host)
            lines.append(b"fif " + path)
        lines.extend(line if isinstance(line, bytes) else line.encode() for line in pkg.extra_lines)

        vdb = self.path / "var/db/pkg" / pkg.cpv
        vdb.mkdir(parents=True, exist_ok=True)
        (vdb / "CONTENTS").write_bytes(b"".join(line + b"\n" for line in lines))
        metadata = {
            "CATEGORY": pkg.category,
            "PF": pkg.pf,
            "SLOT": pkg.slot,
            "EAPI": "8",
            "repository": pkg.repository,
            "COUNTER": str(pkg.counter),
            "BUILD_TIME": str(self.mtime),
            "KEYWORDS": "amd64",
            "USE": "",
            "IUSE": "",
            "DEFINED_PHASES": "install",
        }
        for name, value in metadata.items():
            (vdb / name).write_text(value + "\n")

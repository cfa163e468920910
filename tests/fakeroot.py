"""Build small Debian systems in a directory: a dpkg database and the files it lists.

    root = DebianRoot(tmp_path, usrmerge=True)
    root.package("foo", files={b"/usr/bin/foo": b"binary", b"/etc/foo.conf": b"x=1\\n"},
                 conffiles=[b"/etc/foo.conf"])
    root.package("bar", files={b"/bin/bar": b"#!/bin/sh\\n"}, auto=True)
    root.divert(b"/usr/bin/foo", b"/usr/bin/foo.real", package="bar")
    root.write()
    root.path(b"/etc/foo.conf")   # -> b"<tmp_path>/etc/foo.conf", to modify like an admin

``write()`` creates, under the root: ``var/lib/dpkg/{status,diversions,info/*}``,
``var/lib/apt/extended_states``, and every package file with its content
(diverted files at their diverted name), as dpkg would have left them.
``.list`` files name every parent directory too (and ``/.`` first); ``.md5sums``
hold the md5 of each regular file that is not a conffile, as dh_md5sums writes
them.  With ``usrmerge=True`` the root has ``bin``, ``sbin``, ``lib``, ``lib64``
as symlinks into ``usr``, so a package listing ``/bin/foo`` puts it in
``usr/bin/foo``.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass
from typing import Iterable, Mapping

USRMERGE_DIRS = (b"bin", b"sbin", b"lib", b"lib64")


def md5hex(content: bytes) -> str:
    return hashlib.md5(content).hexdigest()


@dataclass
class FakePackage:
    name: str
    version: str
    arch: str
    files: dict[bytes, bytes]
    symlinks: dict[bytes, bytes]
    dirs: list[bytes]
    conffiles: dict[bytes, str | None]
    multi_arch: str | None
    status: str
    auto: bool
    md5sums: bool

    @property
    def state(self) -> str:
        return self.status.split()[-1]

    @property
    def owner(self) -> str:
        """The stem of the package's info files: ``name:arch`` for Multi-Arch: same."""
        return f"{self.name}:{self.arch}" if self.multi_arch == "same" else self.name


class DebianRoot:
    """A fake Debian root under ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, usrmerge: bool = False, arch: str = "amd64"):
        self.root = os.fsencode(os.fspath(path)).rstrip(b"/") or b"/"
        self.usrmerge = usrmerge
        self.arch = arch
        self.packages: list[FakePackage] = []
        self.diversions: list[tuple[bytes, bytes, str | None]] = []

    def package(
        self,
        name: str,
        *,
        files: Mapping[bytes, bytes] = {},
        symlinks: Mapping[bytes, bytes] = {},
        dirs: Iterable[bytes] = (),
        conffiles: Mapping[bytes, str | None] | Iterable[bytes] = (),
        version: str = "1.0-1",
        arch: str | None = None,
        multi_arch: str | None = None,
        status: str = "install ok installed",
        auto: bool = False,
        md5sums: bool = True,
    ) -> FakePackage:
        """Add a package.

        ``files``: regular files and their content; ``symlinks``: path -> link
        target; ``dirs``: directories to list beyond the parents listed anyway.
        ``conffiles``: paths among ``files`` (md5 computed from the content), or
        a mapping path -> the exact text dpkg writes after the path in
        ``Conffiles:`` (``"newconffile"``, ``"<md5> obsolete"``), or ``None`` for
        the computed md5.  ``status`` is dpkg's three words: with
        ``"deinstall ok config-files"`` only the conffiles stay on disk and in
        the ``.list``.  ``auto`` marks it ``Auto-Installed`` for apt.
        """
        if not isinstance(conffiles, Mapping):
            conffiles = dict.fromkeys(conffiles)
        pkg = FakePackage(
            name=name,
            version=version,
            arch=arch or self.arch,
            files=dict(files),
            symlinks=dict(symlinks),
            dirs=list(dirs),
            conffiles=dict(conffiles),
            multi_arch=multi_arch,
            status=status,
            auto=auto,
            md5sums=md5sums,
        )
        self.packages.append(pkg)
        return pkg

    def divert(self, path: bytes, to: bytes, package: str | None = None) -> None:
        """Divert ``path`` to ``to`` for every package but ``package`` (None: a local diversion)."""
        self.diversions.append((path, to, package))

    def path(self, system_path: bytes) -> bytes:
        """Where ``system_path`` (as seen inside the root) is on the host."""
        return self.root + system_path

    def admin(self, *parts: bytes) -> bytes:
        """A path in the dpkg admin directory, e.g. ``admin(b"info", b"foo.list")``."""
        return os.path.join(self.root, b"var/lib/dpkg", *parts)

    def write(self) -> bytes:
        """Create the database and the files; returns the root (bytes)."""
        os.makedirs(self.admin(b"info"), exist_ok=True)
        os.makedirs(self.admin(b"updates"), exist_ok=True)
        os.makedirs(os.path.join(self.root, b"var/lib/apt"), exist_ok=True)
        if self.usrmerge:
            for name in USRMERGE_DIRS:
                os.makedirs(os.path.join(self.root, b"usr", name), exist_ok=True)
                link = os.path.join(self.root, name)
                if not os.path.islink(link):
                    os.symlink(b"usr/" + name, link)
        with open(self.admin(b"info", b"format"), "wb") as f:
            f.write(b"1\n")
        for pkg in self.packages:
            self._write_package(pkg)
        with open(self.admin(b"status"), "wb") as f:
            f.write(b"".join(self._status_paragraph(pkg) for pkg in self.packages))
        with open(self.admin(b"diversions"), "wb") as f:
            for frm, to, package in self.diversions:
                f.write(b"%s\n%s\n%s\n" % (frm, to, (package or ":").encode()))
        with open(os.path.join(self.root, b"var/lib/apt/extended_states"), "wb") as f:
            for pkg in self.packages:
                if pkg.auto:
                    f.write(b"Package: %s\nArchitecture: %s\nAuto-Installed: 1\n\n"
                            % (pkg.name.encode(), pkg.arch.encode()))
        return self.root

    def _installed_name(self, pkg: FakePackage, path: bytes) -> bytes:
        for frm, to, package in self.diversions:
            if frm == path and package != pkg.name:
                return to
        return path

    def _write_package(self, pkg: FakePackage) -> None:
        config_only = pkg.state in ("config-files", "not-installed")
        files = {p: c for p, c in pkg.files.items() if not config_only or p in pkg.conffiles}
        symlinks = {} if config_only else pkg.symlinks
        dirs = [] if config_only else pkg.dirs
        listed = set(files) | set(symlinks) | set(dirs)
        for path in list(listed):
            parent = posixpath.dirname(path)
            while parent not in (b"/", b""):
                listed.add(parent)
                parent = posixpath.dirname(parent)
        for path in dirs:
            os.makedirs(self.path(self._installed_name(pkg, path)), exist_ok=True)
        for path, content in files.items():
            target = self.path(self._installed_name(pkg, path))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(content)
        for path, target in symlinks.items():
            link = self.path(self._installed_name(pkg, path))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(target, link)
        if pkg.state == "not-installed":
            return
        with open(self.admin(b"info", pkg.owner.encode() + b".list"), "wb") as f:
            f.write(b"/.\n" + b"".join(p + b"\n" for p in sorted(listed)))
        if pkg.md5sums and not config_only:
            with open(self.admin(b"info", pkg.owner.encode() + b".md5sums"), "wb") as f:
                for path, content in sorted(files.items()):
                    if path not in pkg.conffiles:
                        f.write(b"%s  %s\n" % (md5hex(content).encode(), path.lstrip(b"/")))

    def _status_paragraph(self, pkg: FakePackage) -> bytes:
        fields = [
            ("Package", pkg.name.encode()),
            ("Status", pkg.status.encode()),
            ("Priority", b"optional"),
            ("Section", b"misc"),
            ("Maintainer", b"Test <test@example.org>"),
            ("Architecture", pkg.arch.encode()),
        ]
        if pkg.multi_arch:
            fields.append(("Multi-Arch", pkg.multi_arch.encode()))
        fields.append(("Version", pkg.version.encode()))
        if pkg.conffiles:
            lines = []
            for path, text in pkg.conffiles.items():
                if text is None:
                    text = md5hex(pkg.files[path])
                lines.append(b" %s %s" % (path, text.encode()))
            fields.append(("Conffiles", b"\n" + b"\n".join(lines)))
        fields.append(("Description", f"{pkg.name}, a test package".encode()))
        # A multi-line value (Conffiles) starts on the line after "Name:".
        lines = [
            name.encode() + (b":" if value.startswith(b"\n") else b": ") + value for name, value in fields
        ]
        return b"\n".join(lines) + b"\n\n"

"""Canonical paths: the name under which the walk meets a file.

Package managers record the path a file was installed under.  On a merged-/usr
system dpkg still lists ``/sbin/start-stop-daemon``, which the walk of ``/``
meets as ``/usr/sbin/start-stop-daemon`` because ``/sbin`` is a symlink to
``usr/sbin``.  :class:`Canonicalizer` maps a recorded path through every
symlinked *parent* directory, resolving symlinks as a chroot into ``root``
would (an absolute link target starts again at ``root``).  The last component
is left alone: a symlink that a package installed is itself the owned thing.

Each distinct parent directory is resolved once and cached, so canonicalising a
manifest of 100k paths costs a few hundred ``lstat`` calls, not 100k.
"""

from __future__ import annotations

import os
import posixpath
import stat

MAX_SYMLINKS = 40  # as the kernel's ELOOP limit


class Canonicalizer:
    def __init__(self, root: str | bytes = "/"):
        self.root = os.fsencode(root).rstrip(b"/")
        self._dirs: dict[bytes, bytes] = {b"/": b"/", b"": b"/"}
        self.links: dict[bytes, bytes] = {}  # every symlink followed: system path -> target as read

    def plain(self) -> list[bytes]:
        """Every directory path looked at that was not a symlink (or did not exist)."""
        return [path for path in self._dirs if path not in self.links and path not in (b"", b"/")]

    def __call__(self, path: bytes) -> bytes:
        """The canonical form of the absolute system path ``path``."""
        path = posixpath.normpath(path)
        if path.startswith(b"//"):
            path = path[1:]
        parent, name = posixpath.split(path)
        if not name:
            return b"/"
        parent = self.directory(parent)
        return parent + name if parent == b"/" else parent + b"/" + name

    def directory(self, path: bytes, _depth: int = 0) -> bytes:
        """``path`` with every symlink in it resolved, within ``root``."""
        cached = self._dirs.get(path)
        if cached is not None:
            return cached
        if _depth > MAX_SYMLINKS:
            # A symlink loop: keep the name as recorded; it will simply not match.
            return path
        parent, name = posixpath.split(path)
        parent = self.directory(parent, _depth)
        if name in (b"", b"."):
            resolved = parent
        elif name == b"..":
            resolved = posixpath.dirname(parent)
        else:
            candidate = parent + name if parent == b"/" else parent + b"/" + name
            resolved = candidate
            try:
                st = os.lstat(self.root + candidate)
            except OSError:
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink(self.root + candidate)
                except OSError:
                    target = None
                if target is not None:
                    self.links[candidate] = target
                    if not target.startswith(b"/"):
                        target = posixpath.join(parent, target)
                    target = posixpath.normpath(target)
                    if target.startswith(b"//"):
                        target = target[1:]
                    resolved = self.directory(target, _depth + 1)
        if resolved == path:
            resolved = path  # one bytes object for key and value: 78k directories at 1M entries
        self._dirs[path] = resolved
        return resolved

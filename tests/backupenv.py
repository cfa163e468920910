"""A small Debian system to back up, and a destination to back it up to.

Shared by the end-to-end backup tests: ``System`` builds a fake root with a
dpkg database (through ``fakeroot.DebianRoot``) holding installed files and an
admin's own files, and writes a jwbackup configuration for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fakeroot import DebianRoot

from jwbackup import generations

INSTALLED = {
    b"/usr/bin/tool": b"#!/bin/sh\necho tool\n",
    b"/usr/share/doc/tool/README": b"the tool\n",
    b"/etc/tool.conf": b"setting = 1\n",
}
CONFFILES = [b"/etc/tool.conf"]
CACHEDIR_TAG = b"Signature: 8a477f597d28d172789f06886806bc55\n"  # https://bford.info/cachedir/
ADMIN_FILES = {
    b"/etc/hostname": b"box\n",
    b"/home/alice/notes.txt": b"remember the milk\n",
    b"/root/.profile": b"umask 022\n",
    b"/var/lib/app/state.db": b"state" * 1000,
    b"/usr/local/bin/script": b"#!/bin/sh\n",
}


class System:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.root = DebianRoot(tmp_path / "system", usrmerge=True)
        self.root.package("tool", files=INSTALLED, conffiles=CONFFILES)
        self.root.write()
        for path, content in ADMIN_FILES.items():
            self.write(path, content)
        self.dest = tmp_path / "backups"
        self.dest.mkdir(mode=0o700)
        self.config = tmp_path / "jwbackup.yaml"

    @property
    def root_dir(self) -> str:
        return os.fsdecode(self.root.root)

    def path(self, system_path: bytes) -> bytes:
        return self.root.path(system_path)

    def write(self, system_path: bytes, content: bytes) -> bytes:
        real = self.path(system_path)
        os.makedirs(os.path.dirname(real), exist_ok=True)
        with open(real, "wb") as f:
            f.write(content)
        return real

    def configure(self, directory: str | None = None, extra: str = "", destination: str = "",
                  roots: tuple[str, ...] = ("/",)) -> Path:
        self.config.write_text(
            f"root: [{', '.join(roots)}]\n"
            f"lock_file: {self.tmp}/lock/jwbackup.lock\n"
            "destination:\n"
            f"  directory: {directory or self.dest}\n"
            f"{destination}"
            f"{extra}"
        )
        return self.config

    def generations(self) -> list[str]:
        """Complete generations at a local destination, oldest first."""
        return sorted(
            e.name for e in os.scandir(self.dest)
            if e.is_dir(follow_symlinks=False) and generations.parse(e.name) is not None
        )

    def partials(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.dest) if e.name.endswith(".partial"))

    def in_generation(self, generation: str, system_path: bytes) -> bytes:
        return os.fsencode(self.dest / generation) + system_path


def tree_state(top, inodes: bool = True) -> dict[bytes, tuple]:
    """Everything under ``top`` (and ``top`` itself, as ``b"."``): kind and mode,
    owner, mtime, content or link target, and the inode unless ``inodes`` is
    false (a restore makes new ones).  Not st_nlink: later generations linking
    to a file raise it legitimately."""
    top = os.fsencode(top)

    def state(path):
        st = os.lstat(path)
        if os.path.islink(path):
            content = os.readlink(path)
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                content = f.read()
        else:
            content = None
        return (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ino if inodes else None, content)

    found = {b".": state(top)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[path[len(top):]] = state(path)
    return found

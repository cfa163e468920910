"""One run at a time: an ``flock`` held for the whole run.

The lock file lives in a directory that only its owner can write (by default
``/run/lock/jwbackup/``), so no other user can replace it with a symlink or
hold the lock to stop backups.  ``flock`` locks die with the process, so a
crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from jwbackup.errors import JwbackupError, LockedError


class Lock:
    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise JwbackupError(f"cannot create the lock directory {directory}: {exc.strerror}") from exc
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise JwbackupError(
                f"lock directory {directory} must be a directory owned by this user and writable by no one "
                "else; set lock_file to a file in a directory of its own"
            )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JwbackupError(f"cannot open the lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise LockedError(f"another jwbackup run{who} holds the lock {self.path}; not starting") from exc
            raise JwbackupError(f"cannot lock {self.path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

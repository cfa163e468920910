"""Giving rsync a view of the source in which no symlink is followed.

rsync's sender resolves every listed path again, one component at a time,
following symlinks.  A directory that a user swaps for a symlink between the
walk and the read would lead it out of the roots, and a file from elsewhere
would land in the generation under the user's name.

So rsync reads the source through a detached copy of its mount tree with
the ``nosymfollow`` and read-only attributes set on every mount
(``open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)`` and ``mount_setattr``, Linux
5.12, root only).  The copy is reached as ``/proc/self/fd/N`` of a descriptor
rsync inherits; it exists in no mount table and goes away with the last
descriptor.  Below it a symlink is still a symlink (``lstat`` and
``readlink`` work, so symlinks are backed up as before), but a path through
one fails with ELOOP: rsync reports that file and the run ends with a
warning (exit 23) instead of an escape.

Without the system calls or the privilege, rsync reads the source as it is,
and the run says so once at INFO.  The local linker needs none of this: it
walks with ``O_NOFOLLOW`` directory descriptors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from typing import Iterator

logger = logging.getLogger(__name__)

# The same numbers on every architecture (system calls added after the 5.x table unification).
_SYS_OPEN_TREE = 428
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSYMFOLLOW = 0x200000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


try:
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long
except (OSError, AttributeError):
    _syscall = None


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def open_confined(source: str | bytes) -> int:
    """A descriptor of a read-only, nosymfollow copy of the mount tree at ``source``."""
    if _syscall is None:
        raise OSError(errno.ENOSYS, "no syscall() in the C library")
    fd = _check(_syscall(_SYS_OPEN_TREE, -100, os.fsencode(source),  # AT_FDCWD
                         _OPEN_TREE_CLONE | _AT_RECURSIVE | os.O_CLOEXEC), "open_tree")
    try:
        attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSYMFOLLOW, 0, 0, 0)
        _check(_syscall(_SYS_MOUNT_SETATTR, fd, b"", 0x1000 | _AT_RECURSIVE,  # AT_EMPTY_PATH
                        ctypes.byref(attr), ctypes.sizeof(attr)), "mount_setattr")
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def source(root: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``(path for rsync's source, descriptors it must inherit)`` for reading ``root``."""
    try:
        fd = open_confined(root)
    except OSError as exc:
        logger.info("rsync reads %s without confinement (%s): a directory swapped for a symlink "
                    "during the run could lead it outside the roots", root, exc.strerror)
        yield root, ()
        return
    try:
        yield f"/proc/self/fd/{fd}", (fd,)
    finally:
        os.close(fd)

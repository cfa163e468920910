"""jwbackup's cache directory: what a run keeps so that the next one is quicker.

Everything in it can be thrown away: a missing, corrupt or stale file only
costs the next run the time to rebuild it.  The directory is a system path
under the root, holds a ``CACHEDIR.TAG`` (so the walk, borg, restic and tar
leave it out), and only root can read it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator

logger = logging.getLogger(__name__)

CACHE_DIR = b"/var/lib/jwbackup/cache"
TAG_NAME = b"CACHEDIR.TAG"  # https://bford.info/cachedir/: its first bytes are the signature
SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
TAG = (
    SIGNATURE + b"\n"
    b"# This file is a cache directory tag created by jwbackup.\n"
    b"# For information about cache directory tags, see https://bford.info/cachedir/\n"
)
BUFFER = 1 << 20
# A file changed this recently may change again within the same timestamp
# tick, unseen: what was read from it is not kept.
RACY_NS = 2_000_000_000


_frozen = False


@contextmanager
def frozen() -> Iterator[None]:
    """Within it, nothing is created or replaced in a cache directory: a dry
    run changes nothing on the system.  The caches are still read."""
    global _frozen
    previous, _frozen = _frozen, True
    try:
        yield
    finally:
        _frozen = previous


def writable() -> bool:
    """May a cache be written now (see :func:`frozen`)?"""
    return not _frozen


def make(directory: bytes) -> None:
    """Create the cache ``directory`` (a real path), tagged, unless it is there.

    It appears with its tag already inside (made aside, then renamed), so a
    walk running meanwhile never meets it untagged and backs it up.
    """
    if os.path.isdir(directory):
        if not os.path.exists(os.path.join(directory, TAG_NAME)):
            with open(os.path.join(directory, TAG_NAME), "wb") as f:
                f.write(TAG)
        return
    parent = os.path.dirname(directory)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    aside = tempfile.mkdtemp(prefix=b".cache.", dir=parent)  # mode 0700
    try:
        with open(os.path.join(aside, TAG_NAME), "wb") as f:
            f.write(TAG)
        os.rename(aside, directory)
    except OSError:
        shutil.rmtree(aside, ignore_errors=True)
        if not os.path.isdir(directory):  # not another run's, made meanwhile
            raise


def save(path: bytes, write: Callable[[BinaryIO], None], what: str) -> bool:
    """Write the cache file ``path`` (a real path) through ``write``, via a temporary
    neighbour and a rename.  A failure is a warning naming ``what``; returns success."""
    if _frozen:
        return False
    directory = os.path.dirname(path)
    tmp = None
    try:
        make(directory)
        # A name of its own (mode 0600): two runs on one root never write into one file.
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + b".", suffix=b".new", dir=directory)
        with os.fdopen(fd, "wb", buffering=BUFFER) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        return True
    except OSError as exc:
        logger.warning("cannot save the %s %s (%s); the next run builds it again", what, os.fsdecode(path), exc.strerror)
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass

"""jwbackup's cache directory: what a run keeps so that the next one is quicker.

Everything in it can be thrown away: a missing, corrupt or stale file only
costs the next run the time to rebuild it.  The directory is a system path
under the root, holds a ``CACHEDIR.TAG`` (so the walk, borg, restic and tar
leave it out), and only root can read it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import BinaryIO, Callable

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


def save(path: bytes, write: Callable[[BinaryIO], None], what: str) -> bool:
    """Write the cache file ``path`` (a real path) through ``write``, via a temporary
    neighbour and a rename.  A failure is a warning naming ``what``; returns success."""
    directory = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tag = os.path.join(directory, TAG_NAME)
        if not os.path.exists(tag):
            with open(tag, "wb") as f:
                f.write(TAG)
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

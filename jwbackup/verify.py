"""Deciding whether a file the package manager installed was modified since.

A modified package file is the admin's work and is backed up; an unmodified
one is left out, because reinstalling the package brings it back.
"""

from __future__ import annotations

import hashlib
import logging

from jwbackup.managers import Entry

logger = logging.getLogger(__name__)

CHUNK = 1 << 20


def file_digest(path: bytes, algorithm: str) -> str:
    """The hex digest of the file at ``path``, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Verifier:
    """Compares conffiles with the digest their package manager recorded.

    Only conffiles are checked: they are the package files admins edit, and
    there are few of them.  A conffile with no usable recorded digest counts as
    modified: backing up a small file we cannot judge is the safe side.
    """

    def __init__(self) -> None:
        self.hashed = 0

    def changed(self, real_path: bytes, entry: Entry) -> bool:
        if not entry.conffile:
            return False
        if entry.digest is None:
            return True
        self.hashed += 1
        try:
            return file_digest(real_path, entry.digest.algorithm) != entry.digest.value
        except OSError as exc:
            # Unreadable or vanished: let the transfer meet it and report it.
            logger.debug("cannot read %r to verify it: %s", real_path, exc)
            return True

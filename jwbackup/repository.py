"""The destination directory: its generations, and the few changes made to it.

Every change is one command run through the transport, the same for a local
directory and an ssh host (``mv``, ``ln``, ``rm``, ``mkdir``, ``find`` from GNU
coreutils and findutils).  Each is chosen so that an interruption at any point
leaves the directory in a state the next run understands:

* a generation becomes visible by renaming ``<name>.partial`` to ``<name>``;
* ``latest`` is replaced by renaming a new symlink over it;
* a generation is removed by first renaming it out of the generation
  namespace (``.deleting-<name>``), so a half-deleted tree is never mistaken
  for a complete generation; leftovers are finished by the next run.
"""

from __future__ import annotations

import json
import logging
import posixpath

from jwbackup import generations
from jwbackup.errors import DestinationError
from jwbackup.generations import LATEST, Listing

logger = logging.getLogger(__name__)

DELETING_PREFIX = ".deleting-"
STATS_DIR = ".stats"


class Repository:
    def __init__(self, transport, directory: str):
        self.transport = transport
        self.directory = directory.rstrip("/") or "/"

    def path(self, name: str) -> str:
        return posixpath.join(self.directory, name)

    def _run(self, *argv: str, input: bytes | None = None, check: bool = True):
        return self.transport.run(list(argv), input=input, check=check)

    def init(self) -> bool:
        """Create the destination directory (mode 0700); False if it existed."""
        if self._run("test", "-d", self.directory, check=False).returncode == 0:
            return False
        self._run("mkdir", "-p", "-m", "0700", "--", self.directory)
        return True

    def check(self) -> None:
        """Fail with a clear message unless the destination is a writable directory."""
        where = f"{self.transport.where}:{self.directory}" if self.transport.where != "local" else self.directory
        if self._run("test", "-d", self.directory, check=False).returncode != 0:
            raise DestinationError(
                f"destination directory {where} does not exist or is not a directory "
                "(create it, or run 'jwbackup init')"
            )
        if self._run("test", "-w", self.directory, "-a", "-x", self.directory, check=False).returncode != 0:
            raise DestinationError(f"destination directory {where} is not writable")

    def listing(self) -> Listing:
        out = self._run("find", self.directory, "-mindepth", "1", "-maxdepth", "1", "-printf", r"%y\0%f\0").stdout
        fields = out.split(b"\0")
        entries = [
            (name, kind.decode() if kind in (b"d", b"l") else "f")
            for kind, name in zip(fields[0::2], fields[1::2])
        ]
        return generations.scan(entries)

    def rename(self, old: str, new: str) -> None:
        self._run("mv", "-T", "--no-clobber", "--", self.path(old), self.path(new))
        if self._run("test", "-e", self.path(old), check=False).returncode == 0:
            raise DestinationError(f"cannot rename {self.path(old)}: {self.path(new)} exists")

    def set_latest(self, name: str) -> None:
        """Point ``latest`` at ``name``, atomically."""
        tmp = self.path(".latest.new")
        self._run("rm", "-f", "--", tmp)
        self._run("ln", "-s", "--", name, tmp)
        self._run("mv", "-T", "--", tmp, self.path(LATEST))

    def remove(self, name: str) -> None:
        """Remove the generation (or partial) ``name``; never follows a symlink."""
        doomed = self.path(DELETING_PREFIX + name)
        self._run("mv", "-T", "--", self.path(name), doomed)
        self._run("rm", "-rf", "--one-file-system", "--", doomed)
        self._run("rm", "-f", "--", self.path(posixpath.join(STATS_DIR, name + ".json")))

    def finish_removals(self, listing: Listing) -> None:
        """Complete removals that an earlier, interrupted run started."""
        for name in listing.other:
            if name.startswith(DELETING_PREFIX):
                logger.info("finishing the removal of %s", name[len(DELETING_PREFIX):])
                self._run("rm", "-rf", "--one-file-system", "--", self.path(name))

    # Per-generation figures, kept beside the generations (a generation itself
    # mirrors the backed-up system and holds nothing else).
    def write_stats(self, name: str, stats: dict) -> None:
        directory = self.path(STATS_DIR)
        self._run("mkdir", "-p", "--", directory)
        data = json.dumps({"name": name, **stats}, sort_keys=True).encode() + b"\n"
        self._run("dd", "status=none", "of=" + posixpath.join(directory, name + ".json"), input=data)

    def read_stats(self) -> dict[str, dict]:
        result = self._run(
            "find", self.path(STATS_DIR), "-maxdepth", "1", "-name", "*.json", "-type", "f",
            "-exec", "cat", "--", "{}", "+", check=False,
        )
        stats = {}
        for line in result.stdout.splitlines():
            try:
                record = json.loads(line)
                stats[record["name"]] = record
            except (ValueError, KeyError, TypeError):
                continue
        return stats

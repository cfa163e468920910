"""The destination directory: its generations, and the few changes made to it.

Every change is one command run through the transport, the same for a local
directory and an ssh host (``mv``, ``ln``, ``rm``, ``find`` from GNU coreutils
and findutils).  Where one step needs several commands they are run by one
``sh -c`` with a fixed script and the paths as positional arguments (quoted
by the transport), so that a run costs a few round trips, not dozens, and no
shell text is ever built from a path.  Each step is chosen so that an
interruption at any point leaves a state the next run understands:

* a generation becomes visible by renaming ``<name>.partial`` to ``<name>``;
* ``latest`` is replaced by renaming a new symlink over it;
* a generation is removed by first renaming it out of the generation
  namespace (``.deleting-<name>``), so a half-deleted tree is never mistaken
  for a complete generation; leftovers are finished by the next run.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath

from jwbackup import generations
from jwbackup.errors import DestinationError
from jwbackup.execute import CommandError
from jwbackup.generations import Listing

logger = logging.getLogger(__name__)

DELETING_PREFIX = ".deleting-"
STATS_DIR = ".stats"

# Exit statuses of the scripts below that mean "the destination is not usable".
_MISSING, _UNWRITABLE, _CLOBBER, _COMMITTED_BUT = 90, 91, 92, 93

# $1 directory, $2 "write" when the command will write there
_LIST = r"""
[ -d "$1" ] || exit 90
[ "$2" != write ] || { [ -w "$1" ] && [ -x "$1" ]; } || exit 91
exec find "$1" -mindepth 1 -maxdepth 1 -printf '%y\0%f\0%l\0'
"""

# $1 directory, $2 partial, $3 name, $4 stats (one line of JSON).  Once the
# rename is done the generation is committed; a failure after it (a foreign
# "latest" directory, a disk full for the figures) is told on stderr, each as
# one line naming the step, and exits 93.
_COMMIT = r"""
set -e
cd -- "$1"
mv -T --no-clobber -- "$2" "$3"
[ ! -e "$2" ] || exit 92
status=0
if ! out=$( { rm -f -- .latest.new && ln -s -- "$3" .latest.new && mv -T -- .latest.new latest; } 2>&1); then
    rm -f -- .latest.new
    printf 'pointing latest at it failed: %s\n' "$out" | head -n 1 >&2
    status=93
fi
if ! out=$( { mkdir -p -- .stats && printf '%s\n' "$4" > ".stats/$3.json.new" &&
              mv -T -- ".stats/$3.json.new" ".stats/$3.json"; } 2>&1); then
    rm -f -- ".stats/$3.json.new"
    printf 'writing its figures to .stats/%s.json failed: %s\n' "$3" "$out" | head -n 1 >&2
    status=93
fi
exit $status
"""

# $1 previous generation, $2 the new partial; stdin: NUL-terminated relative paths to remove
_PREPARE = r"""
set -e
[ ! -e "$2" ] && [ ! -L "$2" ] || exit 92
cp -alT -- "$1" "$2"
cd -- "$2"
xargs -0r rm -rf --one-file-system --
"""

# $1 directory, then names: rename all out of the way first (fast, atomic),
# then delete; names already renamed by an interrupted run are finished too.
_REMOVE = r"""
set -e
cd -- "$1"
shift
for name; do
    case $name in
        .deleting-*) ;;
        *) if [ -e "$name" ] || [ -L "$name" ]; then mv -T -- "$name" ".deleting-$name"; fi ;;
    esac
done
for name; do
    name=${name#.deleting-}
    rm -rf --one-file-system -- ".deleting-$name"
    rm -f -- ".stats/$name.json"
done
"""


class Repository:
    def __init__(self, transport, directory: str):
        self.transport = transport
        self._configured = directory.rstrip("/") or "/"

    @functools.cached_property
    def directory(self) -> str:
        """The destination directory, absolute.  Over ssh a relative one is
        taken from the login directory, as ssh and rsync take it (and as
        jw.backup 1.0 did); made absolute once, so that ``--link-dest``, which
        rsync takes from the generation it writes, names the same place."""
        if self._configured.startswith("/"):
            return self._configured
        home = self.transport.run(["pwd"]).stdout.decode("utf-8", "surrogateescape").rstrip("\n")
        return posixpath.normpath(posixpath.join(home, self._configured))

    def path(self, name: str) -> str:
        return posixpath.join(self.directory, name)

    def _where(self) -> str:
        local = self.transport.where == "local"
        return self.directory if local else f"{self.transport.where}:{self.directory}"

    def _script(self, script: str, *args: str, check: bool = True, input: bytes | None = None):
        result = self.transport.run(["sh", "-c", script, "sh", *args], input=input, check=False)
        if result.returncode == _MISSING:
            raise DestinationError(
                f"destination directory {self._where()} does not exist or is not a directory "
                "(create it, or run 'jwbackup init')"
            )
        if result.returncode == _UNWRITABLE:
            raise DestinationError(f"destination directory {self._where()} is not writable")
        if check and result.returncode != 0:
            raise CommandError(["sh"], result.returncode, result.stderr, where=self._where())
        return result

    def init(self) -> bool:
        """Create the destination directory (mode 0700); False if it existed."""
        if self.transport.run(["test", "-d", self.directory], check=False).returncode == 0:
            return False
        self.transport.run(["mkdir", "-p", "-m", "0700", "--", self.directory])
        return True

    def listing(self, writable: bool = True) -> Listing:
        """The generations and other entries; fails clearly unless the
        destination is a directory, and with ``writable`` (commands that
        write: backup, prune, init) a writable one.  Listing and restoring
        need no more than reading: a disaster recovery may well read from a
        read-only mount."""
        out = self._script(_LIST, self.directory, "write" if writable else "read").stdout
        fields = out.split(b"\0")
        entries = [
            (name, kind.decode() if kind in (b"d", b"l") else "f")
            for kind, name in zip(fields[0::3], fields[1::3])
        ]
        latest = next((target for kind, name, target in zip(fields[0::3], fields[1::3], fields[2::3])
                       if kind == b"l" and name == generations.LATEST.encode()), None)
        return generations.scan(entries, latest)

    def check(self) -> None:
        """Fail with a clear message unless the destination is a writable directory."""
        self.listing()

    def commit(self, partial: str, name: str, stats: dict) -> list[str]:
        """Make ``partial`` the generation ``name``, point ``latest`` at it, keep its figures.

        Returns what failed after the generation was committed, one line per
        step: it is complete all the same, and retention still has to run.
        """
        record = json.dumps({"name": name, **stats}, sort_keys=True)
        result = self._script(_COMMIT, self.directory, partial, name, record, check=False)
        if result.returncode == _CLOBBER:
            raise DestinationError(f"cannot commit {partial}: {self.path(name)} exists")
        if result.returncode == _COMMITTED_BUT:
            lines = result.stderr.decode(errors="replace").splitlines()
            return [f"generation {name} is complete, but {line}" for line in lines if line]
        if result.returncode != 0:
            raise CommandError(["sh"], result.returncode, result.stderr, where=self._where())
        return []

    def tree(self, name: str, fmt: str) -> bytes:
        """Every entry of generation ``name``, as ``find -printf fmt`` writes it, parents first."""
        return self.transport.run(["find", self.path(name), "-mindepth", "1", "-printf", fmt]).stdout

    def prepare(self, previous: str, partial: str, remove: list[bytes]) -> None:
        """Create ``partial`` as a hard-linked copy of ``previous``, less the ``remove`` paths."""
        data = b"".join(path + b"\0" for path in remove)
        result = self._script(_PREPARE, self.path(previous), self.path(partial), input=data, check=False)
        if result.returncode == _CLOBBER:
            raise DestinationError(f"cannot create {partial}: {self.path(partial)} exists")
        if result.returncode != 0:
            raise CommandError(["sh"], result.returncode, result.stderr, where=self._where())

    def remove(self, *names: str) -> None:
        """Remove generations or partials; never follows a symlink."""
        if names:
            self._script(_REMOVE, self.directory, *names)

    def finish_removals(self, listing: Listing) -> None:
        """Complete removals that an earlier, interrupted run started."""
        leftovers = [name for name in listing.other if _removed_generation(name)]
        if leftovers:
            logger.info("finishing the removal of %s", ", ".join(n[len(DELETING_PREFIX):] for n in leftovers))
            self.remove(*leftovers)

    def read_stats(self) -> dict[str, dict]:
        """The figures each generation's run recorded, by generation name."""
        result = self.transport.run(
            ["find", self.path(STATS_DIR), "-maxdepth", "1", "-name", "*.json", "-type", "f",
             "-exec", "cat", "--", "{}", "+"],
            check=False,
        )
        stats = {}
        for line in result.stdout.splitlines():
            try:
                record = json.loads(line)
                stats[record["name"]] = record
            except (ValueError, KeyError, TypeError):
                continue
        return stats


def _removed_generation(name: str) -> bool:
    """Is ``name`` a generation or partial that a removal renamed?  Nothing
    else with the prefix is removed: it is not jwbackup's."""
    if not name.startswith(DELETING_PREFIX):
        return False
    removed = name[len(DELETING_PREFIX):]
    return generations.parse(removed.removesuffix(generations.PARTIAL_SUFFIX)) is not None

"""Running rsync: the command line, the file list it is fed, what it reports.

``make_command`` is pure; ``transfer`` runs the command, streams the
selection into ``--files-from=-`` as the walk produces it (no temporary list
of every path), and returns rsync's exit status, statistics and error lines.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

from jwbackup import execute

logger = logging.getLogger(__name__)

# Exit codes that still commit the generation (rsync(1), EXIT VALUES).
VANISHED = 24  # files vanished between the walk and the transfer: normal on a live system
PARTIAL = 23  # some files could not be transferred (unreadable, xattrs unsupported ...)
# Exit codes of an rsync that gave up waiting: the link, not the data, failed.
TIMEOUT = 30  # no data for --timeout seconds
CONNECT_TIMEOUT = 35  # no answer from an rsync daemon within --contimeout
MAX_LINK_DESTS = 20  # rsync's own limit
MAX_ERROR_LINES = 1000

# rsync 3.5 with -X and --link-dest, in a dry run, looks for the xattrs of
# every directory it would create in the target, which a dry run does not
# create, and reports each one missing (exit 23).  Not a problem of the run
# it previews: such lines are left out of a dry run's errors.
_DRY_RUN_NOISE = re.compile(
    r"rsync: \[generator\] gen_entry_copy_xattrs: (openat\(.*\)|secure open of .*) "
    r"failed: No such file or directory \(2\)$"
)
PARTIAL_SUMMARY = "rsync error: some files/attrs were not transferred"


@dataclass
class Stats:
    files: int = 0  # entries in the generation (files, directories, links ...)
    regular_files: int = 0
    transferred: int = 0  # regular files copied, not hard-linked
    total_size: int = 0  # bytes of all regular files
    transferred_size: int = 0  # bytes of the copied ones
    bytes_sent: int = 0

    @property
    def linked(self) -> int:
        return self.regular_files - self.transferred


class Tally:
    """What a generation built from a list of paths holds, counted as the paths pass.

    rsync's ``--stats`` counts an entry once for each way it reaches the file
    list: a listed directory again as the implied parent of each path below
    it, a name right in a listed ``/`` again as one that ``.`` brings along.
    Its "Number of files" comes out about one per directory too high.  This
    counts what the generation holds, as the linker does: its top, each listed
    path that exists, the directories above them that are not listed, and
    what a listed ``/`` brings along (``excludes`` apart).
    """

    def __init__(self, root: str | bytes, excludes: Iterable[bytes] = ()):
        self.prefix = os.fsencode(root).rstrip(b"/")
        self.excludes = set(excludes)
        self.entries, self.regular_files, self.size = 1, 0, 0  # the generation's top
        self._dirs: set[bytes] = {b"/"}  # the directories counted
        self._top_names: set[bytes] = set()  # listed paths right in /
        self._root_listed = False

    def listed(self, paths: Iterable[bytes]) -> Iterator[bytes]:
        """``paths``, each counted as it passes; one gone already is not (rsync leaves it out)."""
        lstat = os.lstat
        for path in paths:
            try:
                st = lstat(self.prefix + path)
            except OSError:
                pass
            else:
                self.add(path, st)
            yield path

    def add(self, path: bytes, st: os.stat_result) -> None:
        """Count listed ``path``, whose lstat is ``st``."""
        if path == b"/":
            self._root_listed = True
            return
        dirs = self._dirs
        if stat.S_ISDIR(st.st_mode):
            if path in dirs:
                return
            dirs.add(path)
        self._count(st)
        parent = path[:path.rindex(b"/")] or b"/"
        if parent == b"/":
            self._top_names.add(path)
        while parent not in dirs:  # rsync makes it, with its source's attributes
            dirs.add(parent)
            self.entries += 1
            parent = parent[:parent.rindex(b"/")] or b"/"

    def _count(self, st: os.stat_result) -> None:
        self.entries += 1
        if stat.S_ISREG(st.st_mode):
            self.regular_files += 1
            self.size += st.st_size

    def into(self, stats: Stats) -> Stats:
        """``stats`` with rsync's counts of the generation replaced by these."""
        if self._root_listed:
            with os.scandir(self.prefix or b"/") as entries:
                for entry in entries:
                    path = b"/" + entry.name
                    if path not in self._top_names and path not in self._dirs and path not in self.excludes:
                        try:
                            self._count(entry.stat(follow_symlinks=False))
                        except OSError:
                            pass
        stats.files, stats.regular_files, stats.total_size = self.entries, self.regular_files, self.size
        return stats


@dataclass
class Result:
    returncode: int
    stats: Stats
    errors: list[str] = field(default_factory=list)  # rsync's own error lines
    walk_error: BaseException | None = None
    output: bytes = b""  # rsync's stdout (the itemized list of a dry run)

    @property
    def ok(self) -> bool:
        return self.returncode in (0, VANISHED) and self.walk_error is None

    @property
    def committable(self) -> bool:
        return self.returncode in (0, VANISHED, PARTIAL) and self.walk_error is None


# What rsync writes as ``\#ooo`` in its lists: a control character but tab, a
# byte above ASCII (LC_ALL=C), and a backslash that would read as such a code.
_UNPRINTED = re.compile(rb"[\x00-\x08\x0a-\x1f\x80-\xff]|\\(?=#[0-9]{3})")


def printed_name(name: bytes) -> bytes:
    """``name`` as rsync prints it in ``--itemize-changes`` and ``--list-only`` lines."""
    return _UNPRINTED.sub(lambda m: b"\\#%03o" % m.group()[0], name)


def make_command(
    source: str,
    target: str,
    link_dests: Sequence[str] = (),
    *,
    transport_args: Sequence[str] = (),
    dry_run: bool = False,
    progress: bool = False,
    filters: Sequence[bytes] = (),
) -> list[str]:
    """The rsync command that copies the files listed on stdin from ``source`` to ``target``.

    ``source`` and ``target`` are directories; trailing slashes are added.
    ``filters`` are rules (``excludes.rsync_rule``) for what rsync must not
    copy even where a listed ``/`` (rsync's ``.``) brings the entries
    directly in it along.
    """
    # --ignore-missing-args: a listed path deleted between the walk and the
    # transfer is left out quietly, as if the walk had not met it (else exit 23).
    # --sparse: a VM image or /var/log/lastlog costs its data, not its size
    argv = ["rsync", "-aHAX", "--sparse", "--numeric-ids", "--files-from=-", "--from0", "--ignore-missing-args",
            "--stats"]
    argv += list(transport_args)
    argv += ["--filter=" + os.fsdecode(rule) for rule in filters]
    argv += [f"--link-dest={d}" for d in link_dests[:MAX_LINK_DESTS]]
    if dry_run:
        argv += ["--dry-run", "--itemize-changes"]
    if progress:
        argv += ["--info=progress2"]
    argv += [source.rstrip("/") + "/", target.rstrip("/") + "/"]
    return argv


_STATS = {
    "Number of files": "files",
    "Number of regular files transferred": "transferred",
    "Total file size": "total_size",
    "Total transferred file size": "transferred_size",
    "Total bytes sent": "bytes_sent",
}
_NUMBER = re.compile(rb"([\d,.]+)")
_REGULAR = re.compile(rb"reg: ([\d,.]+)")


def _number(text: bytes) -> int:
    return int(re.sub(rb"[,.]", b"", text))


def parse_stats(output: bytes) -> Stats:
    """The figures of rsync's ``--stats`` block (run with LC_ALL=C)."""
    stats = Stats()
    for line in output.splitlines():
        key, sep, value = line.partition(b":")
        if not sep:
            continue
        name = _STATS.get(key.strip().decode("ascii", "replace"))
        match = _NUMBER.search(value)
        if name is None or match is None:
            continue
        setattr(stats, name, _number(match.group(1)))
        if name == "files":
            regular = _REGULAR.search(value)
            stats.regular_files = _number(regular.group(1)) if regular else 0
    return stats


class _Feeder(threading.Thread):
    """Writes the selection into rsync's stdin, NUL-separated, in large writes."""

    def __init__(self, paths: Iterable[bytes], stdin):
        super().__init__(name="jwbackup-walk", daemon=True)
        self.paths = paths
        self.stdin = stdin
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        buf: list[bytes] = []
        size = 0
        try:
            for path in self.paths:
                buf.append(path)
                size += len(path) + 1
                self.count += 1
                if size >= 1 << 16:
                    self.stdin.write(b"\0".join(buf) + b"\0")
                    buf.clear()
                    size = 0
            if buf:
                self.stdin.write(b"\0".join(buf) + b"\0")
        except BrokenPipeError:
            pass  # rsync stopped reading: its exit status tells why
        except BaseException as exc:  # the walk failed: the selection is incomplete
            self.error = exc
        finally:
            try:
                self.stdin.close()
            except BrokenPipeError:
                pass


class _Collector(threading.Thread):
    """Keeps rsync's stderr lines (bounded) and logs them at DEBUG."""

    def __init__(self, stream, ignore: re.Pattern | None = None):
        super().__init__(name="jwbackup-rsync-stderr", daemon=True)
        self.stream = stream
        self.ignore = ignore
        self.lines: list[str] = []
        self.dropped = 0
        self.ignored = 0

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode("utf-8", "backslashreplace").rstrip("\n")
            logger.debug("rsync: %s", line)
            if self.ignore is not None and self.ignore.match(line):
                self.ignored += 1
            elif len(self.lines) < MAX_ERROR_LINES:
                self.lines.append(line)
            else:
                self.dropped += 1


def transfer(
    argv: Sequence[str],
    paths: Iterable[bytes],
    *,
    env: Mapping[str, str] | None = None,
    progress: bool = False,
    secrets: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
    dry_run: bool = False,
) -> Result:
    """Run ``argv``, feeding it ``paths`` on stdin; rsync's exit status, statistics and error lines.

    ``dry_run``: ``argv`` is a dry run, whose bogus complaints are left out
    (see _DRY_RUN_NOISE); when they were its only errors, it exited 0.
    """
    proc = execute.popen(
        argv,
        env={**(env or {}), "LC_ALL": "C"},
        secrets=secrets,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=die_with_parent,
        pass_fds=tuple(pass_fds),
    )
    feeder = _Feeder(paths, proc.stdin)
    collector = _Collector(proc.stderr, _DRY_RUN_NOISE if dry_run else None)
    feeder.start()
    collector.start()
    try:
        output = _read_output(proc.stdout, feeder, progress)
        returncode = proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM: rsync stops before the on_error hooks run and the lock goes
        proc.kill()
        proc.wait()
        raise
    feeder.join()
    collector.join()
    if collector.dropped:
        collector.lines.append(f"... and {collector.dropped} more lines")
    logger.debug("rsync exited %d after %d paths", returncode, feeder.count)
    only_summary_left = all(line.startswith(PARTIAL_SUMMARY) for line in collector.lines)
    if collector.ignored and returncode == PARTIAL and only_summary_left:
        logger.debug("rsync's %d complaints of its dry run about directories it did not create are left out",
                     collector.ignored)
        returncode, collector.lines = 0, []
    return Result(returncode, parse_stats(output), collector.lines, feeder.error, output)


_PR_SET_PDEATHSIG = 1
try:  # looked up here: the child of a fork should not load libraries
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def die_with_parent(parent: int | None = None) -> None:
    """In a child (rsync, the linker's helper): SIGTERM it when jwbackup, the
    process ``parent`` (by default the current parent), dies (even by
    SIGKILL), so no orphan keeps writing into the ``.partial`` after the lock
    is gone."""
    if _prctl is None:
        return
    parent = os.getppid() if parent is None else parent
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # jwbackup died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _read_output(stream, feeder: _Feeder, progress: bool) -> bytes:
    """rsync's stdout; on a terminal, its progress lines are shown as they come."""
    if not progress:
        return stream.read()
    kept = []
    rest = b""
    last = 0.0
    for chunk in iter(lambda: stream.read1(1 << 16), b""):
        *pieces, rest = re.split(rb"[\r\n]", rest + chunk)
        for piece in pieces:
            if b"xfr#" in piece or b"to-chk" in piece:
                now = time.monotonic()
                if now - last > 0.2:
                    sys.stderr.write(f"\r\033[K{feeder.count} paths walked  {piece.strip().decode(errors='replace')}")
                    sys.stderr.flush()
                    last = now
            else:
                kept.append(piece)
    kept.append(rest)
    sys.stderr.write("\r\033[K")
    sys.stderr.flush()
    return b"\n".join(kept)

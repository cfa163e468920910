"""Building a generation over ssh without handing rsync every unchanged path.

rsync ``--files-from`` with ``--link-dest`` costs about 0.4 ms of CPU per
listed path even when nothing changed (docs/performance.md), and a daily run
lists every selected path.  When the newest generation records when its run
started (and from which source), a run does this instead:

1. lists that generation at the destination (``find -printf``: kind, mode,
   owner, size and mtime of every entry; one round trip);
2. lstats each selected path and *keeps* it when the generation has it with
   the same kind, mode, owner, size and mtime (whole seconds: rsync's quick
   check) and its ctime is older than the start of that generation's run by
   :data:`MARGIN_NS`: the inode, its xattrs and ACLs included, has not
   changed since that run read it.  Every other path is *sent*; so is every
   directory (rsync sets its attributes, which is cheap), and every name of
   a hard-link group one name of which is sent (rsync -H links only the
   names it is given together);
3. hard-links a copy of that generation as the new ``.partial`` and removes
   from it every entry that is not kept or a directory still selected
   (``cp -al``, ``rm -rf``; one round trip, the names on stdin);
4. runs rsync, the same command as a full run (``--link-dest`` included), on
   the sent paths only.

A kept file is one rsync would have hard-linked into the same generation,
and rsync decides every sent path itself, so the result is the generation a
full rsync run builds; ``tests/test_transfer.py`` compares them.  No file of
an earlier generation is changed: the copy's files are links, and a file
that is not kept is unlinked from the copy before rsync writes its path.

The ctime rule needs the source's clock not to have been set back past the
previous run; a previous start in the future makes the run send everything.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from jwbackup.execute import CommandError
from jwbackup.rsync import Result, Stats, Tally

logger = logging.getLogger(__name__)

MARGIN_NS = 2_000_000_000  # ctime ticks are coarse; a change this close to the start may be missed

# kind mode uid gid size mtime path, each record NUL-terminated
LIST_FORMAT = "%y %m %U %G %s %T@ %P\\0"

_KINDS = {
    stat.S_IFREG: b"f", stat.S_IFDIR: b"d", stat.S_IFLNK: b"l", stat.S_IFBLK: b"b",
    stat.S_IFCHR: b"c", stat.S_IFIFO: b"p", stat.S_IFSOCK: b"s",
}


@dataclass
class Plan:
    send: list[bytes] = field(default_factory=list)  # system paths for rsync, in walk order
    remove: list[bytes] = field(default_factory=list)  # paths relative to the generation
    kept: list[bytes] = field(default_factory=list)  # non-directories left as links to the previous generation


def parse_listing(data: bytes) -> dict[bytes, tuple]:
    """``find -printf LIST_FORMAT`` output as ``{relative path: (kind, mode, uid, gid, size, mtime s)}``.

    An mtime before 1970 is recorded as None: it never matches, the path is sent.
    """
    records = {}
    for record in data.split(b"\0"):
        if not record:
            continue
        kind, mode, uid, gid, size, mtime, path = record.split(b" ", 6)
        seconds = mtime.partition(b".")[0]
        records[path] = (kind, int(mode, 8), int(uid), int(gid), int(size),
                         None if seconds.startswith(b"-") else int(seconds))
    return records


def plan(root: bytes, paths: Iterable[bytes], previous: dict[bytes, tuple], started_ns: int,
         tally: Tally | None = None) -> Plan:
    """Sort the selection into kept and sent paths against the ``previous`` generation's listing,
    whose run started at ``started_ns`` (source clock); ``tally`` counts the paths."""
    result = Plan()
    if started_ns > time.time_ns():
        logger.warning("the previous run started in the future (clock set back?): every path is sent")
        started_ns = 0
    before = started_ns - MARGIN_NS
    prefix = root.rstrip(b"/")
    lstat = os.lstat
    kinds = _KINDS
    keep: set[bytes] = set()
    dirs: set[bytes] = set()
    # rsync -H links only the names of an inode it is given together: one
    # sent name of a hard-link group sends the kept ones too.
    sent_inodes: set[tuple[int, int]] = set()
    kept_linked: dict[tuple[int, int], list[tuple[bytes, os.stat_result]]] = {}
    for path in paths:
        relative = path.lstrip(b"/")
        try:
            st = lstat(prefix + path)
        except OSError:
            result.send.append(path)  # vanished or unreadable: rsync reports it as it would
            continue
        if tally is not None:
            tally.add(path, st)
        kind = kinds.get(stat.S_IFMT(st.st_mode))
        if kind == b"d":
            result.send.append(path)
            dirs.add(relative)
            continue
        old = previous.get(relative)
        if (old is not None and st.st_ctime_ns < before
                and old == (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size,
                            st.st_mtime_ns // 1_000_000_000)):
            keep.add(relative)
            result.kept.append(path)
            if st.st_nlink > 1:
                kept_linked.setdefault((st.st_dev, st.st_ino), []).append((path, st))
        else:
            result.send.append(path)
            if st.st_nlink > 1:
                sent_inodes.add((st.st_dev, st.st_ino))
    unkept = [member for inode in sent_inodes & kept_linked.keys() for member in kept_linked[inode]]
    if unkept:
        _send_instead(result, keep, unkept)
    result.remove = _removals(previous, keep, dirs)
    return result


def _send_instead(result: Plan, keep: set[bytes], paths: list[tuple[bytes, os.stat_result]]) -> None:
    """Move kept ``paths`` to the sent ones (rsync sorts its file list: the order is free)."""
    moved = {path for path, _ in paths}
    result.kept = [path for path in result.kept if path not in moved]
    for path, _ in paths:
        keep.discard(path.lstrip(b"/"))
        result.send.append(path)


def _removals(previous: dict[bytes, tuple], keep: set[bytes], dirs: set[bytes]) -> list[bytes]:
    """The entries of ``previous`` that are neither kept nor a directory still selected as one;
    none below another (``find`` lists a directory before its contents)."""
    removed: list[bytes] = []
    gone = b"\0"  # below the last directory removed: goes with it
    for path, record in previous.items():
        if path.startswith(gone):
            continue
        is_dir = record[0] == b"d"
        if path in keep or (is_dir and path in dirs):
            continue
        removed.append(path)
        if is_dir:
            gone = path + b"/"
    return removed


def build(repo, root: bytes, paths: Iterable[bytes], previous: str, partial: str, started_ns: int,
          send: Callable[[Iterable[bytes]], Result], tally: Tally, dry_run: bool = False) -> Result:
    """Build ``partial`` from generation ``previous`` of ``repo``; ``send`` runs rsync on a list of
    paths, ``tally`` counts every path the generation gets.

    ``dry_run``: plan only; ``send`` (an rsync dry run) gets the paths to
    send, and nothing is copied or removed.

    If ``previous`` cannot be listed or copied (another process removed it
    meanwhile), rsync gets every path, as it would without this builder.
    """
    listed = time.monotonic()
    try:
        listing = parse_listing(repo.tree(previous, LIST_FORMAT))
    except CommandError as exc:
        logger.warning("cannot list %s (%s); rsync gets every path", previous, exc)
        return send(tally.listed(paths))
    logger.debug("listed %s: %d entries in %.2f s", previous, len(listing), time.monotonic() - listed)
    sorted_at = time.monotonic()
    try:
        work = plan(root, paths, listing, started_ns, tally)
    except Exception as exc:  # the walk failed: the selection is incomplete
        return Result(0, Stats(), walk_error=exc)
    if dry_run:
        logger.info("dry run: %d unchanged entries would be linked from %s, %d paths go to rsync",
                    len(work.kept), previous, len(work.send))
    else:
        logger.info("%d unchanged entries kept from %s, %d paths to rsync, %d entries to remove first",
                    len(work.kept), previous, len(work.send), len(work.remove))
    logger.debug("planned in %.2f s", time.monotonic() - sorted_at)
    if not dry_run:
        try:
            repo.prepare(previous, partial, work.remove)
        except CommandError as exc:
            logger.warning("cannot copy %s (%s); rsync gets every path", previous, exc)
            repo.remove(partial)  # a half copy shares inodes with the previous generation: never write into it
            return send(sorted(work.send + work.kept))
    return send(work.send)

"""Deciding which files the package manager installed were modified since.

A modified package file is the admin's work (or another tool's) and is backed
up; an unmodified one is left out, because reinstalling the package brings it
back.  :func:`check` is a pre-pass over the manifest that returns the set of
modified paths; the walk and the exclude generator then only test membership.

Modes (configuration key ``verify``):

* ``all``: every installed regular file with a recorded digest is compared
  with it (dpkg ``md5sums`` and conffile md5s, portage CONTENTS md5s), and
  every symlink with a recorded target (portage CONTENTS) with ``readlink``;
* ``conffiles``: only conffiles (CONFIG_PROTECT files on Gentoo) are compared;
* ``none``: no file is read; every conffile counts as modified (they are few
  and small, and they hold the admin's settings), every other file as not.

A conffile without a usable recorded digest counts as modified; any other
file recorded as one without a digest counts as unmodified (they are counted
and logged once).  A path recorded without a kind (dpkg lists) is not judged
here: the walk keeps a regular file there, as nothing verifies it
(:func:`jwbackup.select.kindless_match`).  A file that cannot be read counts
as modified, so that the transfer meets it and reports it.

Hashing 100k files takes seconds; ``lstat`` on them a fraction of one.  The
digests are therefore kept in a stat cache (:data:`CACHE_FILE` under the
root), keyed by the file's (device, inode, size, mtime_ns, ctime_ns): the
md5 its content had when it was read.  A file whose stat matches a record is
not read again; the cached digest is compared with what the manifest records
*now*, so a package upgrade (a new recorded digest) is judged afresh.  The ctime cannot be
set from user space (``touch -r``, ``tar``, ``rsync -a`` set the mtime, and
every such change moves the ctime), so content that changed is always
rehashed.  A file whose ctime is within :data:`RACY_NS` of the hashing, or
whose stat changed while it was read, is not cached.

Portage's CONTENTS also record each file's mtime.  It is not used to skip
hashing: ``cp -p``, ``tar`` or ``touch -r`` give a changed file its old mtime
back, and a differing mtime proves nothing either.

The cache directory holds a ``CACHEDIR.TAG``, so the walk (and borg, restic
and tar with their exclude-caches options) leaves it out.  A cache that is
corrupt, truncated or of another format version is ignored with a warning,
never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import multiprocessing
import os
import pickle
import signal
import stat
import struct
import tempfile
import time
import zlib
from array import array
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import chain, count, islice
from typing import AbstractSet, Iterable, Iterator, NamedTuple

from jwbackup import cachedir
from jwbackup.errors import JwbackupError
from jwbackup.execute import ended
from jwbackup.rsync import die_with_parent
from jwbackup.managers import (
    ALGORITHMS, CONFFILE, DIGEST_AT, FILE, KIND_MASK, KINDS, TARGET, Manifest, record_algorithm, record_digest,
    record_target,
)

logger = logging.getLogger(__name__)

MODES = ("all", "conffiles", "none")
DEFAULT_MODE = "all"

CACHE_FILE = cachedir.CACHE_DIR + b"/verify"  # a system path, under the root
CACHE_MAGIC = b"jwbackup-verify-cache"
CACHE_VERSION = 2
CACHED_ALGORITHM = "md5"  # what dpkg and portage record; other digests are hashed every run
_CACHED_CODE = ALGORITHMS.index(CACHED_ALGORITHM)
_CACHED_END = DIGEST_AT + hashlib.new(CACHED_ALGORITHM).digest_size  # the digest's end in a record
_FILE = KINDS.index(FILE)

CHUNK = 1 << 20
RACY_NS = cachedir.RACY_NS
MAX_WORKERS = 8
PROCESS_MIN = 2000  # fewer files to hash are hashed in this process: starting workers costs more
BIG_FILE = 1 << 20  # files this large are hashed first, largest first
MAX_CHUNK = 1024  # files per worker job: its results come back as one list, 0.2 MB of them
_NOATIME = getattr(os, "O_NOATIME", 0)
VANISHED = "vanished"  # removed or replaced between the lstat and the open


@dataclass
class Stats:
    checked: int = 0  # installed regular files compared with a recorded digest
    cache_hits: int = 0
    hashed: int = 0  # files read and hashed in this run
    bytes_hashed: int = 0
    modified: int = 0
    unreadable: int = 0
    no_digest: int = 0  # files with nothing to compare with: unmodified
    seconds: float = 0.0


class Verifier:
    """The outcome of a verification pre-pass: which installed paths were modified."""

    def __init__(self, modified: AbstractSet[bytes] = frozenset(), stats: Stats | None = None):
        self.modified = modified
        self.stats = stats or Stats()

    def changed(self, path: bytes) -> bool:
        """Was the installed file at system path ``path`` modified?"""
        return path in self.modified


def check(
    manifest: Manifest,
    root: str | bytes = b"/",
    mode: str = DEFAULT_MODE,
    cache_file: bytes | None = CACHE_FILE,
    roots: Iterable[str | bytes] = (b"/",),
    workers: int | None = None,
) -> Verifier:
    """Verify the installed files under ``roots`` (system paths) of the system at ``root``.

    ``cache_file`` is a system path (None: no cache).  Logs one INFO line with
    what was checked, taken from the cache, hashed, and found modified.
    """
    verifier = _check(manifest, root, mode, cache_file, roots, workers)
    _report(verifier.stats)
    return verifier


def _check(manifest: Manifest, root, mode, cache_file, roots, workers=None) -> Verifier:
    """:func:`check` without its report."""
    _check_mode(mode)
    started = time.monotonic()
    prefix = os.fsencode(root).rstrip(b"/")
    stats = Stats()
    modified: set[bytes] = set()
    manifest.freeze()  # the files to hash are found again by their place in a directory
    listing, everything = _under(manifest, roots)
    cache_path = prefix + cache_file if cache_file and mode != "none" else None
    cache = _load_cache(cache_path) if cache_path else _Cache()
    order, misses, no_digest, links = _scan(listing, manifest.dirs, mode, prefix, cache, modified)
    misses.slots = _Slots(cache_path if misses.cacheable else None, len(misses))
    stats.cache_hits = len(order) - misses.cacheable  # the rest of the order is hashed
    stats.checked = stats.cache_hits + len(misses) + links
    _judge(misses, prefix, stats, modified, workers)
    stats.no_digest = _files_among(no_digest, prefix)
    complete = everything and mode == "all"  # every record of a file still there was met
    if cache_path and (misses.slots.cached or cache.jumps or (complete and stats.cache_hits < cache.count)):
        _save_cache(cache_path, cache.records(order, misses, keep_unmet=not complete))
    stats.modified = len(modified)
    stats.seconds = time.monotonic() - started
    return Verifier(frozenset(modified), stats)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"verify mode must be one of {', '.join(MODES)}, not {mode!r}")


def _report(stats: Stats, alongside: bool = False) -> None:
    logger.info(
        "verified %d installed files in %.2f s%s: %d from the cache, %d hashed (%s), %d modified",
        stats.checked, stats.seconds, " alongside the walk" if alongside else "", stats.cache_hits, stats.hashed,
        _size(stats.bytes_hashed), stats.modified,
    )
    if stats.no_digest:
        logger.info("%d installed files have no recorded digest and count as unmodified", stats.no_digest)
    if stats.unreadable:
        logger.warning("%d installed files cannot be read to verify them; they are backed up", stats.unreadable)


def modified_paths(manifest: Manifest, root: str | bytes = b"/", mode: str = DEFAULT_MODE,
                   cache_file: bytes | None = CACHE_FILE, roots: Iterable[str | bytes] = (b"/",)) -> AbstractSet[bytes]:
    """The system paths of the installed files that were modified (see :func:`check`)."""
    return check(manifest, root, mode, cache_file, roots).modified


# -- alongside the walk ---------------------------------------------------------


class Running:
    """A verification (:func:`check`) in a forked child process, so that the
    walk goes on meanwhile on another CPU: on an unchanged system the lstat
    pass costs about what the walk does.  The walk leaves out every installed
    file it meets, and afterwards yields the modified ones it passed over
    (:meth:`Selector.select <jwbackup.select.Selector.select>`).

    The child shares the manifest with this process (a fork: its pages are
    copied only as this process writes them), writes the stat cache and sends
    back the modified paths, its statistics and what it logged, pickled, on a
    pipe.  It is killed when this process dies or :meth:`close` is called
    before it is done.
    """

    def __init__(self, manifest: Manifest, root: str | bytes, mode: str, roots: Iterable[str | bytes]):
        _check_mode(mode)
        parent = os.getpid()
        read, write = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read)
            os.close(write)
            raise
        if pid == 0:
            os.close(read)
            _serve(write, parent, manifest, root, mode, roots)  # never returns
        os.close(write)
        self.pid: int | None = pid
        self._pipe = read
        self._verifier: Verifier | None = None

    def result(self) -> Verifier:
        """The outcome, once the child is done; its log lines are logged here now."""
        if self._verifier is None:
            with open(self._pipe, "rb", closefd=True) as pipe:
                self._pipe = -1
                data = pipe.read()
            _, status = os.waitpid(self.pid, 0)
            self.pid = None
            if status or not data:  # a report cut short is none
                how = ended(os.waitstatus_to_exitcode(status))
                raise VerificationError(f"verification: the process verifying ended without a report ({how})")
            records, outcome = pickle.loads(data)
            for name, level, message in records:
                logging.getLogger(name).log(level, "%s", message)
            if isinstance(outcome, str):
                raise VerificationError(f"verification failed: {outcome}")
            modified, stats = outcome
            _report(stats, alongside=True)
            self._verifier = Verifier(modified, stats)
        return self._verifier

    def close(self) -> None:
        """Kill the child if it still runs (the run failed or was interrupted)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = None
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1


class VerificationError(JwbackupError):
    pass


class _Kept(logging.Handler):
    """In the child: what it logs, kept for the parent to log in order."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _serve(pipe: int, parent: int, manifest: Manifest, root, mode: str, roots) -> None:
    """The child's life: verify, send the outcome, exit without running anything of the parent's."""
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent is interrupted, and kills it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_parent(parent)
        kept = _Kept()
        logging.root.handlers = [kept]
        try:
            verifier = _check(manifest, root, mode, CACHE_FILE, roots)
            outcome: tuple | str = (verifier.modified, verifier.stats)
        except Exception as exc:  # one line for the parent to raise
            outcome = str(exc) or type(exc).__name__
        data = pickle.dumps((kept.records, outcome), pickle.HIGHEST_PROTOCOL)
        with open(pipe, "wb", closefd=True) as out:
            out.write(data)
        status = 0
    finally:
        os._exit(status)


def _under(manifest: Manifest, roots: Iterable[str | bytes]) -> tuple[Iterable, bool]:
    """The manifest's directories under ``roots`` (see :meth:`Manifest.listing`),
    and whether that is all of them."""
    tops = {os.fsencode(r).rstrip(b"/") for r in roots}
    if b"" in tops:
        return manifest.listing(), True
    starts = tuple(t + b"/" for t in tops)
    return (d for d in manifest.listing() if d[0].startswith(starts)), False


# -- comparing -------------------------------------------------------------------


class _Order:
    """What the next cache holds, in scan order: for each file, the offset of
    its record in this cache (a hit) or ``-1 - j`` for miss ``j``.

    Kept as runs: a hit on the record after the previous hit's, or the miss
    after the previous miss, lengthens the last run.  Files come in the order
    the last run saved them, so an unchanged run, and a first run, are one run
    each, where a list of offsets would take 4 MB at 1M entries.
    """

    def __init__(self):
        self.firsts = array("q")
        self.counts = array("q")
        self._next: int | None = None  # the value that lengthens the last run (hits >= 0 > misses)

    def add(self, first: int, length: int = 1) -> None:
        """The next ``length`` files: hits on the records from offset ``first``
        on, or misses from ``first = -1 - j`` on."""
        if first == self._next:
            self.counts[-1] += length
        else:
            self.firsts.append(first)
            self.counts.append(length)
        self._next = first + length * _step(first)

    def __len__(self) -> int:
        return sum(self.counts)

    def __iter__(self) -> Iterator[int]:
        for first, length in zip(self.firsts, self.counts):
            step = _step(first)
            yield from range(first, first + length * step, step)


def _step(first: int) -> int:
    """From one file of a run of the order to the next: the next record (hits), or the next miss."""
    return _RECORD.size if first >= 0 else -1


class _Misses:
    """The files the cache cannot judge, in scan order, kept small: at 1M
    entries a first run hashes 560k files, and their paths would be 45 MB.

    Miss ``j`` is name number ``at[j]`` of directory ``bases[where[j]]`` in
    the manifest's directories (``dirs``, see :class:`Manifest`), which
    hold its name and its record; ``big`` holds the sizes of those of
    BIG_FILE or more.  Once hashed, its cache record (stat key and digest)
    is in ``slots`` (:class:`_Slots`), written by whichever process hashed it.
    """

    def __init__(self, dirs: dict):
        self.dirs = dirs
        self.bases: list[bytes] = []  # the directories with a miss, each once: the scan goes directory by directory
        self.where = array("I")
        self.at = array("I")
        self.big: dict[int, int] = {}
        self.cacheable = 0  # how many have a place in the cache (md5)
        self.slots = _Slots(None, 0)
        self._split: tuple[int, list[bytes]] = (-1, [])  # the directory whose names were split last

    def add(self, base: bytes, at: int, size: int, cacheable: bool) -> int:
        if not self.bases or self.bases[-1] is not base:
            self.bases.append(base)
        self.where.append(len(self.bases) - 1)
        self.at.append(at)
        j = len(self.at) - 1
        if size >= BIG_FILE:
            self.big[j] = size
        self.cacheable += cacheable
        return j

    def entry(self, j: int) -> tuple[bytes, bytes]:
        """Miss ``j``: (system path, manifest record)."""
        number, at = self.where[j], self.at[j]
        base = self.bases[number]
        names, records = self.dirs[base]
        if self._split[0] != number:
            self._split = (number, names.split(b"\0"))
        return base + self._split[1][at], records[at]

    def __len__(self) -> int:
        return len(self.at)


def _scan(listing, dirs, mode, prefix, cache: _Cache, modified) -> tuple[_Order, _Misses, list[bytes], int]:
    """The lstat pass, judging every file the cache knows, and every symlink
    with a recorded target: (order, misses, no_digest, symlinks judged).

    ``order`` is what the next cache holds (:class:`_Order`).  Modified
    files and symlinks, and conffiles that count as modified without being
    read, go into ``modified``.

    It runs once per installed file, so the rule comes first: the file's
    record in the cache is the one after the last file's, with the stat
    and the digest of now.  Such hits are counted as a run (``run``, from
    ``run_at``), not added one by one.
    """
    order = _Order()
    misses = _Misses(dirs)
    no_digest: list[bytes] = []
    links = 0
    stat_at, readlink, close = os.stat, os.readlink, os.close
    isreg = stat.S_ISREG
    pack = _KEY.pack
    key_size, record_size, digest_at, digest_end = _KEY.size, _RECORD.size, DIGEST_AT, _CACHED_END
    unopened, target, cached_code = _UNOPENED, TARGET, _CACHED_CODE
    body, find, release = cache.body, cache.find, cache.release
    at = cache.start  # where the next record is expected: files come in the order the last run saved them
    release_at = at + RELEASE_BYTES
    run_at, run = at, 0  # the hits not yet added to the order: ``run`` records from ``run_at``
    everything = mode == "all"
    for base, names, records in listing:
        # Names are looked up in the directory, opened at its first file to
        # judge: cheaper than a path from the root each time.
        fd = unopened
        try:
            for k, name, record in zip(count(), names, records):
                flags = record[0]
                algorithm = flags >> 5  # 0: no digest recorded
                if flags & CONFFILE:
                    if not algorithm or mode == "none":
                        modified.add(base + name)
                        continue
                elif not algorithm:
                    if everything and flags & KIND_MASK == _FILE:
                        no_digest.append(base + name)
                    continue
                elif not everything:
                    continue
                if fd == unopened:
                    fd = _open_directory(prefix + base)
                if fd < 0:
                    continue  # not there, or not a directory: nothing in it to judge
                if algorithm == target:
                    try:
                        if readlink(name, dir_fd=fd) != record_target(record):
                            modified.add(base + name)
                        links += 1
                    except OSError:
                        pass  # gone, or not a symlink now: the walk judges the kind
                    continue
                try:
                    st = stat_at(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue  # not there: nothing to judge, the walk will not meet it
                if not isreg(st.st_mode):
                    continue  # another kind now: the walk keeps it anyway
                if algorithm != cached_code:
                    misses.add(base, k, st.st_size, False)
                    continue
                key = pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                digest = record[digest_at:digest_end]
                if body[at:at + record_size] != key + digest:  # not the rule
                    if body.find(key, at, at + key_size) != at:
                        found = find(key)
                        if found < 0:
                            if run:
                                order.add(run_at, run)
                            order.add(-1 - misses.add(base, k, st.st_size, True))
                            at += record_size  # past the record this file had, if it had one
                            run_at, run = at, 0
                            continue
                        at = found
                    if body[at + key_size:at + record_size] != digest:
                        modified.add(base + name)
                if at != run_at + run * record_size:  # a record found elsewhere
                    if run:
                        order.add(run_at, run)
                    run_at, run = at, 0
                run += 1
                at += record_size
                if at > release_at:
                    release(at)
                    release_at = at + RELEASE_BYTES
        finally:
            if fd >= 0:
                close(fd)
    if run:
        order.add(run_at, run)
    return order, misses, no_digest, links


_UNOPENED, _UNOPENABLE = -1, -2
_DIRECTORY_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


def _open_directory(path: bytes) -> int:
    """An fd to look names up in (symlinks on the way followed, as lstat of a
    path under it would), or _UNOPENABLE."""
    try:
        return os.open(path, _DIRECTORY_FLAGS)
    except OSError:
        return _UNOPENABLE


def _judge(misses: _Misses, prefix: bytes, stats, modified, workers) -> None:
    """Hash the misses and compare with the recorded digests; fills their cache slots."""
    if not misses:
        return
    for judged in _hash_all(misses, prefix, workers):
        modified.update(misses.entry(j)[0] for j in judged.modified)
        modified.update(misses.entry(j)[0] for j in judged.unreadable)
        stats.unreadable += len(judged.unreadable)
        stats.hashed += judged.hashed
        stats.bytes_hashed += judged.bytes_read
        if judged.write_error:
            misses.slots.fail(judged.write_error)
        elif misses.slots.fd >= 0:  # after a failure no record is kept, whoever wrote it
            misses.slots.cached += judged.cached


def _files_among(paths: list[bytes], prefix: bytes) -> int:
    """How many of ``paths`` are regular files (another kind now: the walk keeps it)."""
    isreg = stat.S_ISREG
    count = 0
    for path in paths:
        try:
            count += isreg(os.lstat(prefix + path).st_mode)
        except OSError:
            pass
    return count


_inherited: tuple = ()  # what _hash_jobs works on in a worker process: set before the fork


def _inherit(jobs: tuple) -> None:
    global _inherited
    _inherited = jobs


def _hash_all(misses: _Misses, prefix: bytes, workers: int | None) -> Iterator[_Judged]:
    """A :class:`_Judged` for every chunk of misses, in no particular order.

    Most package files are small, so the work per file is Python's, and
    threads would take turns on the GIL.  Many files are therefore hashed in
    forked worker processes: they inherit the list of files and the file of
    cache slots, are sent chunks of indices, a few at a time, judge each
    file, write its cache record themselves and send back only what is not
    the rule (modified, unreadable).  The largest files go first, so the
    workers end together.
    """
    jobs = (prefix, misses, misses.slots.fd)
    workers = workers or min(MAX_WORKERS, os.cpu_count() or 1)
    size = max(64, min(MAX_CHUNK, len(misses) // (workers * 16)))
    done = bytearray(len(misses))
    if workers > 1 and len(misses) >= PROCESS_MIN:
        logger.debug("hashing %d files in %d worker processes", len(misses), workers)
        running: dict = {}  # future -> its chunk
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                     initializer=_inherit, initargs=(jobs,)) as pool:
                for chunk in _chunks(misses, size, done):
                    running[pool.submit(_hash_jobs, chunk)] = chunk
                    while len(running) >= 2 * workers:
                        yield from _finished(running, FIRST_COMPLETED, done)
                yield from _finished(running, ALL_COMPLETED, done)
            return
        except (OSError, BrokenProcessPool) as exc:
            logger.debug("hashing in worker processes failed (%s); hashing the rest here", exc)
    for chunk in _chunks(misses, size, done):
        yield _hash_jobs(chunk, jobs)


def _finished(running: dict, until: str, done: bytearray) -> Iterator[_Judged]:
    finished, _ = wait(running, return_when=until)
    for future in finished:
        chunk = running.pop(future)
        judged = future.result()
        for j in chunk:
            done[j] = 1
        yield judged


def _chunks(misses: _Misses, size: int, done: bytearray) -> Iterator[list[int]]:
    """The indices of the misses not ``done``, in chunks: files of 1 MiB or more first, largest
    first, then the rest in scan order."""
    sizes = misses.big
    big = sorted((j for j in sizes if not done[j]), key=sizes.__getitem__, reverse=True)
    rest = (j for j in range(len(misses)) if not done[j] and j not in sizes)
    indices = chain(big, rest)
    while chunk := list(islice(indices, size)):
        yield chunk


class _Judged(NamedTuple):
    """What hashing a chunk of misses found, beyond the rule (unmodified, cached)."""

    modified: list[int]  # indices of the misses whose content differs from the record
    unreadable: list[int]
    hashed: int
    bytes_read: int
    cached: int  # cache records written
    write_error: str | None  # why a cache record could not be written


def _hash_jobs(indices: list[int], jobs: tuple = ()) -> _Judged:
    prefix, misses, slots = jobs or _inherited
    buf = bytearray(CHUNK)
    modified: list[int] = []
    unreadable: list[int] = []
    hashed = read = cached = 0
    error = None
    for j in indices:
        path, record = misses.entry(j)
        actual, key, size = _hash_file(prefix + path, record_algorithm(record), buf)
        if actual == VANISHED:
            continue
        if actual is None:
            unreadable.append(j)
            continue
        hashed += 1
        read += size
        if actual != record_digest(record):
            modified.append(j)
        if key is not None and slots >= 0 and error is None and record[0] >> 5 == _CACHED_CODE:
            try:
                os.pwrite(slots, key + actual, j * _RECORD.size)
                cached += 1
            except OSError as exc:  # a full disk costs the cache, never the backup
                error = exc.strerror
    return _Judged(modified, unreadable, hashed, read, cached, error)


def _hash_file(real: bytes, algorithm: str, buf: bytearray) -> tuple[bytes | str | None, bytes | None, int]:
    """(raw digest, cache key or None if not cacheable, bytes read); (None, None, 0) if unreadable,
    (VANISHED, None, 0) if gone."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(real, flags | _NOATIME)
        except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
            fd = os.open(real, flags)
    except FileNotFoundError:
        return VANISHED, None, 0
    except OSError as exc:
        logger.debug("cannot read %r to verify it: %s", real, exc)
        return None, None, 0
    try:
        now = time.time_ns()
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return VANISHED, None, 0  # replaced by another kind since the lstat: the walk keeps it
        h = hashlib.new(algorithm)
        view = memoryview(buf)
        size = 0
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
            size += n
        after = os.fstat(fd)
    except OSError as exc:
        logger.debug("cannot read %r to verify it: %s", real, exc)
        return None, None, 0
    finally:
        os.close(fd)
    key = _KEY.pack(before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns)
    unchanged = (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == (size, before.st_mtime_ns, before.st_ctime_ns)
    cacheable = unchanged and size == before.st_size and before.st_ctime_ns < now - RACY_NS
    return h.digest(), key if cacheable else None, size


# -- the cache -------------------------------------------------------------------
#
#   jwbackup-verify-cache <version> <algorithm>\n
#   records of 56 bytes: device, inode, size (uint64), mtime_ns, ctime_ns (int64),
#   little-endian, then the raw digest of the content, in the order the files
#   were scanned
#   count of records (uint64), crc32 of the records (uint32), little-endian
#
# The counts come last so that the records can be written as they are made.

_KEY = struct.Struct("<QQQqq")
_RECORD = struct.Struct(f"<{_KEY.size}s{_CACHED_END - DIGEST_AT}s")
_FOOTER = struct.Struct("<QI")
RELEASE_BYTES = 1 << 20  # the scan gives back the cache's pages behind it in steps of this
RELEASE_EVERY = RELEASE_BYTES // _RECORD.size  # records


class _Slots:
    """The new cache records of the misses, by miss index, in an unlinked file
    beside the cache: a first run at 1M entries makes 31 MB of them, which
    stay in the page cache rather than in this process.  The process that
    hashes a file writes its record; a slot never written stays zero, which
    no record is (no file has inode 0).  Without a place to write (no cache,
    or an unwritable directory) nothing is kept."""

    def __init__(self, cache_path: bytes | None, count: int):
        self.count = count
        self.cached = 0  # records written
        self._file = None
        if cache_path is not None and count and cachedir.writable():
            try:
                cachedir.make(os.path.dirname(cache_path))
                self._file = tempfile.TemporaryFile(dir=os.path.dirname(cache_path))
                self._file.truncate(count * _RECORD.size)
            except OSError as exc:
                logger.warning("cannot save the verification cache %s (%s); the next run hashes again",
                               os.fsdecode(cache_path), exc.strerror)
                self._file = None

    @property
    def fd(self) -> int:
        """The file to write records into (``pwrite`` at ``j * size``), or -1."""
        return self._file.fileno() if self._file is not None else -1

    def fail(self, why: str) -> None:
        """A record could not be written: keep none."""
        if self._file is not None:
            logger.warning("cannot keep new verification cache records (%s); the next run hashes again", why)
            self._file.close()
            self._file = None
        self.cached = 0

    def mapped(self) -> _Cache:
        """The slots as a cache body (offset ``j * size``), for writing them out."""
        if self._file is None or not self.cached:
            return _Cache()
        return _Cache(mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ), 0, self.count * _RECORD.size)


class _Cache:
    """The records of the last run, mapped from the file and read in place.

    They are saved in the order the files are scanned, so a run finds each
    record right after the previous one (one ``find`` at that offset, no
    hashing); only a file out of that order is looked up in an index, which
    is built the first time one is.  The pages behind the scan are given back
    as it goes (:meth:`release`): the cache costs a run a window of memory,
    not its size (31 MB at 1M entries).
    """

    def __init__(self, data: bytes | mmap.mmap = b"", start: int = 0, end: int = 0):
        self.body = data  # the records are data[start:end], offsets are into data: no copy is made
        self.start = start
        self.end = end
        self.count = (end - start) // _RECORD.size
        self.jumps = 0  # records met out of order: saving again puts them in order
        self._index: dict[bytes, int] | None = None
        self._kept = 0  # pages from here on may be resident

    def release(self, upto: int | None = None) -> None:
        """Give back the pages before offset ``upto``, or all of them (None).

        A later read maps them again; after releasing all, releasing up to
        an offset starts over from the first page."""
        if not isinstance(self.body, mmap.mmap):
            return
        if upto is None:
            self.body.madvise(mmap.MADV_DONTNEED, 0, len(self.body))
            self._kept = 0
            return
        upto -= upto % mmap.PAGESIZE
        if upto > self._kept:
            self.body.madvise(mmap.MADV_DONTNEED, self._kept, upto - self._kept)
            self._kept = upto

    def crc32(self) -> int:
        """The checksum of the records, read in steps that are given back."""
        view, crc = memoryview(self.body), 0
        for at in range(self.start, self.end, RELEASE_BYTES):
            crc = zlib.crc32(view[at:min(at + RELEASE_BYTES, self.end)], crc)
            self.release(at)
        view.release()
        self.release()
        return crc

    def find(self, key: bytes) -> int:
        """The offset of the record for ``key``, or -1."""
        if not self.count:
            return -1
        if self._index is None:
            body, size = self.body, _KEY.size
            self._index = {body[at:at + size]: at for at in range(self.start, self.end, _RECORD.size)}
            self.release()
        at = self._index.get(key, -1)
        self.jumps += at >= 0
        return at

    def records(self, order: _Order, misses: _Misses, keep_unmet: bool) -> Iterator[memoryview]:
        """The records for the next run, in scan order; ``keep_unmet`` keeps the ones not met."""
        new = misses.slots.mapped()
        body, slots, size = memoryview(self.body), memoryview(new.body), _RECORD.size
        written = _written(slots)
        self.release()
        hit = made = 0  # how far each mapping has been read
        for n, at in enumerate(order):
            if at >= 0:
                yield body[at:at + size]
                hit = at
            elif written(j := -1 - at):
                yield slots[j * size:(j + 1) * size]
                made = j * size
            if not n % RELEASE_EVERY:
                self.release(hit)
                new.release(made)
        if keep_unmet:
            met = bytearray(self.count)
            for at in order:
                if at >= 0:
                    met[(at - self.start) // size] = 1
            for i in range(self.count):
                if not met[i]:
                    yield body[self.start + i * size:self.start + (i + 1) * size]
        self.release()


def _written(slots: memoryview):
    """A test of whether slot ``j`` holds a record: a written record's inode (bytes 8-16) is not 0."""
    zero, size = bytes(8), _RECORD.size
    return lambda j: len(slots) > 0 and slots[j * size + 8:j * size + 16] != zero


def _load_cache(path: bytes) -> _Cache:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except FileNotFoundError:
        return _Cache()
    except OSError as exc:
        logger.warning("cannot read the verification cache %s (%s); every file is hashed", os.fsdecode(path), exc.strerror)
        return _Cache()
    first = data.find(b"\n", 0, 200)
    words = data[:max(first, 0)].split(b" ")
    start, end = first + 1, len(data) - _FOOTER.size
    if first < 0 or len(words) != 3 or words[0] != CACHE_MAGIC:
        problem = "not a jwbackup verification cache"
    elif words[1].isdigit() and int(words[1]) < CACHE_VERSION:
        logger.info("verification cache %s is from an older jwbackup; every file is hashed again", os.fsdecode(path))
        return _Cache()
    elif words[1:] != [str(CACHE_VERSION).encode(), CACHED_ALGORITHM.encode()]:
        problem = f"format {b' '.join(words[1:]).decode('ascii', 'replace')}, not {CACHE_VERSION} {CACHED_ALGORITHM}"
    elif end < start:
        problem = "corrupt or truncated"
    else:
        count, crc = _FOOTER.unpack_from(data, end)
        # The checksum catches damage; a record that is still wrong matches no
        # file (keys are compared whole) or no recorded digest (the file is kept).
        cache = _Cache(data, start, end)
        if end - start == count * _RECORD.size and cache.crc32() == crc:
            return cache
        problem = "corrupt or truncated"
    logger.warning("verification cache %s ignored: %s; every file is hashed again", os.fsdecode(path), problem)
    return _Cache()


def _save_cache(path: bytes, records: Iterable[memoryview]) -> None:
    def write(f) -> None:
        f.write(b"%s %d %s\n" % (CACHE_MAGIC, CACHE_VERSION, CACHED_ALGORITHM.encode()))
        count = crc = 0
        for record in records:
            f.write(record)
            crc = zlib.crc32(record, crc)
            count += 1
        f.write(_FOOTER.pack(count, crc))

    cachedir.save(path, write, "verification cache")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

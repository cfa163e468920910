"""Building a generation on a local filesystem, the way ``rsync -aHAX --link-dest`` does.

Each selected path is compared with the same path in the link-dest
generations, in order, using rsync's own rules (generator.c,
``try_dests_reg``/``try_dests_non``/``unchanged_attrs``):

* a regular file *matches* when the earlier copy is a regular file of the
  same size and mtime — rsync's quick check, which never reads content and,
  with the default ``--modify-window=0``, compares whole seconds only — and
  *is unchanged* when mode bits, uid, gid, ACL and xattrs are equal too.  An unchanged file is hard-linked.  A match whose attributes
  differ is copied **from the earlier generation** (not from the source) and
  given the source's attributes, so a same-size, same-mtime content change is
  not seen, exactly as rsync does not see it.  Anything else is copied from
  the source.
* symlinks (same target), fifos and sockets, devices (same rdev) are
  hard-linked when unchanged (mtime, owner, xattrs; mode too except for
  symlinks), else created anew.
* files sharing an inode in the source (``-H``) share one in the generation:
  only the first member in rsync's file-list order (files before directories
  at each level, bytewise names) is compared with the link-dests; if it is not
  taken from there, the last member is copied from the source; the others
  are linked to the one placed.
* directories are created, and given their mode, owner, xattrs, ACLs and
  mtime after everything else.  Like rsync, a directory, symlink or special
  file whose new mtime already has the source's whole second keeps it.
* a listed ``/`` is rsync's ``.``, which brings every entry directly in the
  root along (directories empty).

Every path is reached through directory descriptors opened with
``O_NOFOLLOW`` one component at a time, in the source, the destination and the
earlier generations: a directory replaced by a symlink is never followed.  No
inode of an earlier generation is ever opened for writing or changed.

On a machine with two CPUs or more, once a build has copied HELPER_AFTER files
(a first run, not a daily one, which mostly links), a helper process places
the entries of half of the directories (:class:`_Helper`): creating files is
mostly the kernel's work, which then runs on two CPUs.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import resource
import stat
import subprocess
import sys
import zlib
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Iterable, Iterator, NamedTuple, Sequence

from jwbackup.execute import ended
from jwbackup.rsync import PARTIAL, VANISHED, Result, Stats, die_with_parent

logger = logging.getLogger(__name__)

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 30
_NO_COPY_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
_DEST_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_RANGE, _SENDFILE, _READ_WRITE = range(3)  # ways to copy content, best first
MAX_ERROR_LINES = 1000
HELPER_AFTER = 1000  # files copied before a helper process starts


class DestinationWriteError(Exception):
    """Writing the new generation failed: the run stops, the ``.partial`` stays."""


class SourceError(Exception):
    """One source entry could not be read; it is left out (rsync exit 23)."""


class Vanished(Exception):
    """One source entry disappeared after the walk saw it (rsync exit 24)."""


def _sec(ns: int) -> int:
    """Whole seconds: rsync's default --modify-window=0 compares nothing finer."""
    return ns // 1_000_000_000


def _parts(path: bytes) -> tuple[bytes, ...]:
    return tuple(p for p in path.split(b"/") if p and p != b".")


def rsync_order(parts: tuple[bytes, ...], is_dir: bool) -> tuple:
    """Sort key of rsync's file list (flist.c ``f_name_cmp``): at each level,
    non-directories before directories, then names bytewise."""
    return tuple((1, p) for p in parts[:-1]) + (((1 if is_dir else 0), parts[-1]),)


class _Dirs:
    """Directory descriptors along one path below ``top``, reused between calls.

    Every component is opened with ``O_NOFOLLOW``; walking the paths of a
    depth-first selection opens each directory once.
    """

    def __init__(self, top: int, create: bool = False):
        self.top = top
        self.create = create
        self.names: list[bytes] = []
        self.fds: list[int] = []

    def open(self, parts: Sequence[bytes]) -> int:
        n = 0
        limit = min(len(parts), len(self.names))
        while n < limit and self.names[n] == parts[n]:
            n += 1
        while len(self.fds) > n:
            os.close(self.fds.pop())
            self.names.pop()
        for name in parts[n:]:
            parent = self.fds[-1] if self.fds else self.top
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            self.fds.append(fd)
            self.names.append(name)
        return self.fds[-1] if self.fds else self.top

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())
            self.names.pop()


def _attrs_at(fd: int, name: bytes) -> dict[str, bytes]:
    """``read_attrs`` of ``name`` in the directory open as ``fd``, not following it.

    The xattr calls take no dir_fd: the working directory is moved to ``fd``
    (the caller restores it), which costs less than resolving a
    ``/proc/self/fd/N/name`` path.
    """
    os.fchdir(fd)
    return read_attrs(name)


def read_attrs(target, follow: bool = False) -> dict[str, bytes]:
    """Extended attributes rsync -AX carries: all but ``system.*``, plus the POSIX ACLs."""
    try:
        names = os.listxattr(target, follow_symlinks=follow) if not isinstance(target, int) else os.listxattr(target)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    attrs = {}
    for name in names:
        if name.startswith("system.") and name not in (ACL_ACCESS, ACL_DEFAULT):
            continue
        if name.startswith("user.rsync.%"):
            continue  # rsync's own fake-super records, not copied with a single -X
        try:
            attrs[name] = (os.getxattr(target, name) if isinstance(target, int)
                           else os.getxattr(target, name, follow_symlinks=follow))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return attrs


def _same_attrs(a: dict[str, bytes], b: dict[str, bytes], is_link: bool) -> bool:
    if is_link:  # rsync compares no ACLs on symlinks (they have none)
        a = {k: v for k, v in a.items() if not k.startswith("system.")}
        b = {k: v for k, v in b.items() if not k.startswith("system.")}
    return a == b


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special"  # fifo or socket: rsync does not tell them apart here


class _Entry(NamedTuple):
    """A source entry as the walk met it (a tuple: hard-linked ones are all kept
    until the walk ends)."""

    path: bytes
    parts: tuple[bytes, ...]
    st: os.stat_result
    attrs: dict[str, bytes]
    target: bytes | None = None  # symlink target


class _Dir(NamedTuple):
    """A directory's attributes, set once its contents are in place (kept for
    every directory of the generation: no stat result, no split path)."""

    path: bytes
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    attrs: dict[str, bytes] | None

    @classmethod
    def of(cls, entry: _Entry) -> _Dir:
        st = entry.st
        return cls(entry.path, st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, entry.attrs or None)


@dataclass
class _Run:
    stats: Stats = field(default_factory=Stats)
    errors: list[str] = field(default_factory=list)
    vanished: bool = False
    partial: bool = False
    walk_error: BaseException | None = None

    def warn(self, line: str) -> None:
        logger.debug("linker: %s", line)
        if len(self.errors) < MAX_ERROR_LINES:
            self.errors.append(line)

    def add(self, other: _Run) -> None:
        """Take in what the helper process did."""
        for f in fields(Stats):
            setattr(self.stats, f.name, getattr(self.stats, f.name) + getattr(other.stats, f.name))
        for line in other.errors:
            self.warn(line)
        self.vanished |= other.vanished
        self.partial |= other.partial


def _data_extents(fd: int) -> tuple[int, list[tuple[int, int]]] | None:
    """(size, [(start, end), ...] of each data extent) of an open file, or None
    when its filesystem cannot tell data from holes.  The offset is left at 0."""
    size = os.fstat(fd).st_size
    spans = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # a hole to the end
                raise
            if start >= size:
                break
            pos = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            spans.append((start, pos))
    except OSError:
        return None
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return size, spans


def _show(path: bytes) -> str:
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


class Linker:
    """Builds one generation at ``target`` from ``source`` and the selected paths."""

    def __init__(self, source: str | bytes, target: str | bytes, link_dests: Sequence[str | bytes] = (),
                 helper: bool | None = None, excludes: Iterable[bytes] = ()):
        self.source = os.fsencode(source)
        self.target = os.fsencode(target)
        self.link_dests = [os.fsencode(d) for d in link_dests]
        # names directly in a listed / that it does not bring along, as rsync's --exclude=/NAME
        self._excluded_top = {path[1:] for path in excludes if path.count(b"/") == 1}
        # a helper process: True from the start (waiting until it is ready),
        # False never, None after HELPER_AFTER copies if this process may use
        # two CPUs
        self.helper = helper
        self._helper: _Helper | None = None

    def build(self, paths: Iterable[bytes]) -> Result:
        _enough_descriptors()
        run = _Run()
        fds: list[int] = []
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            src_top = os.open(self.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(src_top)
            try:
                os.mkdir(self.target, 0o777)
            except FileExistsError:
                pass
            dst_top = os.open(self.target, _DIR_FLAGS)
            fds.append(dst_top)
            _drop_inherited_acls(dst_top)
            prev_tops = []
            for d in self.link_dests:
                try:
                    prev_tops.append(os.open(d, _DIR_FLAGS))
                    fds.append(prev_tops[-1])
                except OSError as exc:
                    logger.debug("link-dest %s cannot be opened: %s", _show(d), exc.strerror)
            self._attach(src_top, dst_top, prev_tops)
            groups: dict[tuple[int, int], list[_Entry]] = {}
            helper = self._helper = None
            start_after = {True: 0, None: HELPER_AFTER, False: None}[self.helper]  # copies
            try:
                for path in self._guarded(run, paths):
                    parts = _parts(path)
                    if start_after is not None and run.stats.transferred >= start_after:
                        helper = self._helper = self._start_helper()
                        start_after = None
                    if helper is None or not helper.take(path, parts):
                        self._one(run, path, parts, groups)
                if run.walk_error is not None:
                    return Result(PARTIAL, run.stats, run.errors, run.walk_error)
                if helper is not None:
                    helper.finish(run, groups, self._dirs)
                self._hard_link_groups(run, groups)
                self._finish_dirs(run)
                if not self._dirs or self._dirs[-1].path != b"/":  # sorted: a listed / comes last
                    run.stats.files += 1  # the generation's top all the same
            finally:
                if helper is not None:
                    helper.stop()
                    self._helper = None
                for dirs in [self._src, self._dst, self._leaders, *self._prev]:
                    dirs.close()
        except DestinationWriteError as exc:
            run.errors.insert(0, f"linker: {exc}")
            return Result(11, run.stats, run.errors)
        except OSError as exc:
            run.errors.insert(0, f"linker: {self._cannot_build(exc)}")
            return Result(11, run.stats, run.errors)
        finally:
            for fd in fds:
                os.close(fd)
            os.fchdir(cwd)
            os.close(cwd)
        code = PARTIAL if run.partial else VANISHED if run.vanished else 0
        return Result(code, run.stats, run.errors)

    @property
    def helper_pid(self) -> int:
        """The helper process's, while it runs and takes paths; else 0."""
        return self._helper.pid if self._helper is not None and self._helper.ready else 0

    def _attach(self, src_top: int, dst_top: int, prev_tops: list[int]) -> None:
        """Work below these open directories: the source, the new generation, the link-dests."""
        self._src = _Dirs(src_top)
        self._dst = _Dirs(dst_top)
        self._prev = [_Dirs(fd) for fd in prev_tops]
        self._leaders = _Dirs(dst_top)
        self._dirs: list[_Dir] = []
        self._top_done: set[bytes] = set()
        self._no_range: set[int] = set()  # source devices that refuse copy_file_range

    def _cannot_build(self, exc: OSError) -> str:
        where = f" {_show(os.fsencode(exc.filename))}" if exc.filename else ""
        return f"cannot build {_show(self.target)}:{where} {exc.strerror}"

    def _start_helper(self) -> _Helper | None:
        if self.helper is None and len(os.sched_getaffinity(0)) < 2:
            return None
        try:
            helper = _Helper.start(self)
        except OSError as exc:
            logger.debug("linker: no helper process: %s", exc.strerror)
            return None
        logger.debug("linker: helper process %d places the entries of half of the directories", helper.pid)
        if self.helper:  # asked for from the start: its first path is its own
            helper.wait()
        return helper

    # --- one entry -------------------------------------------------------------

    @staticmethod
    def _guarded(run: _Run, paths: Iterable[bytes]) -> Iterator[bytes]:
        """The selection; a failing walk ends it and is kept as ``walk_error``."""
        it = iter(paths)
        while True:
            try:
                path = next(it)
            except StopIteration:
                return
            except Exception as exc:
                run.walk_error = exc
                return
            yield path

    def _one(self, run: _Run, path: bytes, parts: tuple[bytes, ...], groups) -> None:
        if not parts:
            self._root(run, groups)
            return
        if len(parts) == 1 and parts[0] in self._top_done:
            return
        try:
            entry = self._look(parts, path)
        except Vanished:
            run.vanished = True
            run.warn(f'file has vanished: "{_show(path)}"')
            return
        except SourceError as exc:
            run.partial = True
            run.warn(str(exc))
            return
        if stat.S_ISDIR(entry.st.st_mode):
            try:
                self._mkdir(run, entry)
            except Vanished:
                run.vanished = True
                run.warn(f'file has vanished: "{_show(path)}"')
        elif entry.st.st_nlink > 1:
            key = (entry.st.st_dev, entry.st.st_ino)
            groups.setdefault(key, []).append(entry)  # kept to the end: no more than it needs
        else:
            self._place(run, entry)

    def _root(self, run: _Run, groups) -> None:
        """The source root itself.  rsync reads a listed ``/`` as ``.``, which
        (--files-from implies --dirs) also brings every entry directly in it
        that no exclude names: directories empty, everything else whole."""
        try:
            st = os.stat(self._src.top)
            attrs = read_attrs(self._src.top)
            names = sorted(os.listdir(self._src.top))
        except OSError as exc:
            run.partial = True
            run.warn(f'cannot read "/": {exc.strerror}')
            return
        self._dirs.append(_Dir.of(_Entry(b"/", (), st, attrs)))
        for name in map(os.fsencode, names):
            if name not in self._excluded_top:
                self._one(run, b"/" + name, (name,), groups)
            self._top_done.add(name)

    def _look(self, parts: tuple[bytes, ...], path: bytes) -> _Entry:
        """The source entry's lstat, xattrs/ACLs and link target."""
        try:
            parent = self._src.open(parts[:-1])
            name = parts[-1]
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            target = os.readlink(name, dir_fd=parent) if stat.S_ISLNK(st.st_mode) else None
            attrs = _attrs_at(parent, name)
        except (FileNotFoundError, NotADirectoryError):
            raise Vanished() from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a directory became a symlink: never followed
                raise Vanished() from None
            raise SourceError(f'cannot read "{_show(path)}": {exc.strerror}') from None
        return _Entry(path, parts, st, attrs, target)

    def _dest_parent(self, run: _Run, parts: tuple[bytes, ...]) -> int:
        """The destination directory for ``parts``; parents the selection did not
        list (rsync's implied directories) are created with the source's attributes."""
        fd = self._open_dest(parts[:-1])
        if fd is not None:
            return fd
        for i in range(1, len(parts)):
            prefix = parts[:i]
            if self._open_dest(prefix) is not None:
                continue
            path = b"/" + b"/".join(prefix)
            try:
                entry = self._look(prefix, path)
            except (Vanished, SourceError):
                entry = None
            if entry is None or not stat.S_ISDIR(entry.st.st_mode):
                raise Vanished()
            self._mkdir(run, entry)
        return self._dst.open(parts[:-1])

    def _open_dest(self, parts: tuple[bytes, ...]) -> int | None:
        """The destination directory ``parts``; None when it is not there yet."""
        try:
            return self._dst.open(parts)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                # placed as a symlink or file, a directory in the source again
                # now: it changed during the run, as a vanished file does
                raise Vanished() from None
            raise DestinationWriteError(f"cannot open {_show(self.target + b'/' + b'/'.join(parts))}: {exc.strerror}")

    def _mkdir(self, run: _Run, entry: _Entry) -> None:
        parent = self._dest_parent(run, entry.parts)
        try:
            os.mkdir(entry.parts[-1], 0o700, dir_fd=parent)
        except FileExistsError:
            pass
        except OSError as exc:
            raise self._dest_error(entry.parts, exc)
        self._dirs.append(_Dir.of(entry))  # counted when finished: both processes may make it

    def _dest_error(self, parts: tuple[bytes, ...], exc: OSError) -> DestinationWriteError:
        return DestinationWriteError(f"cannot write {_show(self.target + b'/' + b'/'.join(parts))}: {exc.strerror}")

    # --- matching against earlier generations ----------------------------------

    def _candidates(self, entry: _Entry) -> Iterator[tuple[int, bytes, os.stat_result]]:
        """(parent fd, name, lstat) of the same path in each link-dest that has it."""
        for dirs in self._prev:
            try:
                parent = dirs.open(entry.parts[:-1])
                st = os.stat(entry.parts[-1], dir_fd=parent, follow_symlinks=False)
            except OSError:
                continue
            yield parent, entry.parts[-1], st

    def _unchanged(self, entry: _Entry, parent: int, name: bytes, st: os.stat_result) -> bool:
        """rsync's ``unchanged_attrs`` with -aHAX --numeric-ids, as root."""
        src = entry.st
        is_link = stat.S_ISLNK(src.st_mode)
        if _sec(st.st_mtime_ns) != _sec(src.st_mtime_ns):
            return False
        if not is_link and stat.S_IMODE(st.st_mode) != stat.S_IMODE(src.st_mode):
            return False
        if st.st_uid != src.st_uid or st.st_gid != src.st_gid:
            return False
        try:
            attrs = _attrs_at(parent, name)
        except OSError:
            return False
        return _same_attrs(entry.attrs, attrs, is_link)

    def _place(self, run: _Run, entry: _Entry, use_link_dests: bool = True, only_link_dests: bool = False) -> bool:
        """Link or create one non-directory entry; False if it was left out."""
        try:
            return self._place_one(run, entry, use_link_dests, only_link_dests)
        except Vanished:
            run.vanished = True
            run.warn(f'file has vanished: "{_show(entry.path)}"')
        except SourceError as exc:
            run.partial = True
            run.warn(str(exc))
        return False

    def _place_one(self, run: _Run, entry: _Entry, use_link_dests: bool, only_link_dests: bool) -> bool:
        st = entry.st
        kind = _kind(st.st_mode)
        basis = None  # rsync's match_level 2: same size and mtime, other attributes
        for parent, name, pst in (self._candidates(entry) if use_link_dests else ()):
            if _kind(pst.st_mode) != kind:
                continue
            if kind == "file":
                if pst.st_size != st.st_size or _sec(pst.st_mtime_ns) != _sec(st.st_mtime_ns):
                    continue
            elif kind == "symlink":
                try:
                    if os.readlink(name, dir_fd=parent) != entry.target:
                        continue
                except OSError:
                    continue
            elif pst.st_rdev != st.st_rdev:
                continue
            if self._unchanged(entry, parent, name, pst):
                if self._link_from(entry, parent, name, kind, run):
                    return True
                basis = basis or (parent, name)
                break
            basis = basis or (parent, name)
        if only_link_dests and (basis is None or kind != "file"):
            return False
        if kind == "file":
            self._copy(run, entry, basis)
        else:
            self._create(run, entry)
        return True

    def _link_from(self, entry: _Entry, parent: int, name: bytes, kind: str, run: _Run) -> bool:
        dparent = self._dest_parent(run, entry.parts)
        try:
            os.link(name, entry.parts[-1], src_dir_fd=parent, dst_dir_fd=dparent, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.EMLINK:
                return False  # too many links: rsync copies instead
            raise self._dest_error(entry.parts, exc)
        run.stats.files += 1
        if kind == "file":
            run.stats.regular_files += 1
            run.stats.total_size += entry.st.st_size
        return True

    # --- creating entries -------------------------------------------------------

    def _copy(self, run: _Run, entry: _Entry, basis: tuple[int, bytes] | None) -> None:
        """A new regular file: content from ``basis`` (an earlier generation's file
        that rsync's quick check calls up to date) or from the source."""
        rfd = -1
        if basis is not None:
            try:
                rfd = os.open(basis[1], _READ_FLAGS, dir_fd=basis[0])
            except OSError:
                pass  # the earlier copy is unreadable: take the source's content
        if rfd < 0:
            try:
                rfd = os.open(entry.parts[-1], _READ_FLAGS, dir_fd=self._src.open(entry.parts[:-1]))
            except (FileNotFoundError, NotADirectoryError):
                raise Vanished() from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise Vanished() from None
                raise SourceError(f'cannot read "{_show(entry.path)}": {exc.strerror}') from None
        try:
            if not stat.S_ISREG(os.fstat(rfd).st_mode):
                raise Vanished()  # replaced by something else since the walk
            dparent = self._dest_parent(run, entry.parts)
            name = entry.parts[-1]
            try:
                wfd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dparent)
            except OSError as exc:
                raise self._dest_error(entry.parts, exc)
            try:
                # until its real time is set last, an interrupted copy must not
                # pass the next run's quick check against this .partial
                try:
                    os.utime(wfd, ns=(0, 0))
                except OSError as exc:
                    raise self._dest_error(entry.parts, exc)
                copied = self._content(rfd, wfd, entry)
                self._attrs_fd(wfd, entry)
            except BaseException:
                os.close(wfd)
                wfd = -1
                try:
                    os.unlink(name, dir_fd=dparent)
                except OSError:
                    pass
                raise
            finally:
                if wfd >= 0:
                    os.close(wfd)
        finally:
            os.close(rfd)
        run.stats.files += 1
        run.stats.regular_files += 1
        run.stats.total_size += entry.st.st_size
        run.stats.transferred += 1
        run.stats.transferred_size += copied

    def _content(self, rfd: int, wfd: int, entry: _Entry) -> int:
        """Copy ``rfd`` to ``wfd``; the bytes copied, as rsync counts them.

        A source with holes (fewer blocks than its size needs: a VM image,
        ``/var/log/lastlog``) keeps them: only its data extents are copied,
        as ``rsync --sparse`` leaves zeros out, so it costs its data at the
        destination, not its size.
        """
        if entry.st.st_blocks * 512 < entry.st.st_size:
            extents = _data_extents(rfd)
            if extents is not None:
                size, spans = extents
                for start, end in spans:
                    os.lseek(rfd, start, os.SEEK_SET)
                    os.lseek(wfd, start, os.SEEK_SET)
                    self._stream(rfd, wfd, entry, end - start)
                try:
                    os.ftruncate(wfd, size)
                except OSError as exc:
                    raise self._dest_error(entry.parts, exc)
                return size
        return self._stream(rfd, wfd, entry)

    def _stream(self, rfd: int, wfd: int, entry: _Entry, count: int | None = None) -> int:
        """Copy to the end of ``rfd``, or ``count`` bytes, in the kernel where it
        can: ``copy_file_range`` (within a filesystem, where it may share
        blocks), else ``sendfile`` (any two files); ``read``/``write`` when
        neither works, which also tells whose error it was.  A source
        filesystem that refuses ``copy_file_range`` (another filesystem than
        the destination's) is not asked again: a first run would pay a failing
        call per file."""
        total = 0
        way = _SENDFILE if entry.st.st_dev in self._no_range else _RANGE
        while count is None or total < count:
            chunk = _CHUNK if count is None else min(_CHUNK, count - total)
            try:
                if way == _RANGE:
                    n = os.copy_file_range(rfd, wfd, chunk)
                elif way == _SENDFILE:
                    n = os.sendfile(wfd, rfd, None, chunk)
                else:
                    n = self._read_write(rfd, wfd, entry, chunk)
            except OSError as exc:
                if exc.errno in _DEST_FULL:
                    raise self._dest_error(entry.parts, exc)
                if way == _RANGE and exc.errno in _NO_COPY_RANGE:
                    self._no_range.add(entry.st.st_dev)
                way += 1
                continue
            if n == 0:
                break
            total += n
        return total

    def _read_write(self, rfd: int, wfd: int, entry: _Entry, count: int) -> int:
        try:
            data = os.read(rfd, min(count, 1 << 20))
        except OSError as exc:
            raise SourceError(f'read errors mapping "{_show(entry.path)}": {exc.strerror}') from None
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(wfd, view):]
            except OSError as exc:
                raise self._dest_error(entry.parts, exc)
        return len(data)

    def _attrs_fd(self, fd: int, entry: _Entry) -> None:
        st = entry.st
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
            for name, value in entry.attrs.items():
                os.setxattr(fd, name, value)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError as exc:
            raise self._dest_error(entry.parts, exc)

    def _create(self, run: _Run, entry: _Entry) -> None:
        st = entry.st
        dparent = self._dest_parent(run, entry.parts)
        name = entry.parts[-1]
        try:
            if stat.S_ISLNK(st.st_mode):
                os.symlink(entry.target, name, dir_fd=dparent)
            else:
                os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dparent)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dparent, follow_symlinks=False)
            if entry.attrs:
                os.fchdir(dparent)
            for attr, value in entry.attrs.items():
                os.setxattr(name, attr, value, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dparent)
            now = os.stat(name, dir_fd=dparent, follow_symlinks=False).st_mtime_ns
            if _sec(now) != _sec(st.st_mtime_ns):  # rsync leaves a time it deems equal
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dparent, follow_symlinks=False)
        except OSError as exc:
            raise self._dest_error(entry.parts, exc)
        run.stats.files += 1

    # --- after the walk -----------------------------------------------------------

    def _hard_link_groups(self, run: _Run, groups) -> None:
        """Source hard-link groups (-H): the first member in rsync's order is placed,
        the rest are linked to it."""
        for entries in groups.values():
            entries.sort(key=lambda e: rsync_order(e.parts, False))
            if len(entries) == 1:
                self._place(run, entries[0])
                continue
            # rsync (hlink.c, generator.c): only the first member is compared with
            # the link-dests; when it is not linked or copied from there, the last
            # member is transferred and the others are linked to it.
            leader = entries[0] if self._place(run, entries[0], only_link_dests=True) else None
            if leader is None:
                for entry in reversed(entries):
                    if self._place(run, entry, use_link_dests=False):
                        leader = entry
                        break
            if leader is None:
                continue
            for entry in entries:
                if entry is leader:
                    continue
                try:
                    if not self._link_member(run, leader, entry) and self._place(run, entry, use_link_dests=False):
                        leader = entry  # the leader's inode has all the links it can take: a new one for the rest
                except Vanished:
                    run.vanished = True
                    run.warn(f'file has vanished: "{_show(entry.path)}"')

    def _link_member(self, run: _Run, leader: _Entry, entry: _Entry) -> bool:
        """Link ``entry`` to ``leader`` in the generation; False when the
        leader's inode cannot take another link (EMLINK)."""
        try:
            lparent = self._leaders.open(leader.parts[:-1])
        except OSError as exc:
            raise self._dest_error(leader.parts, exc)
        dparent = self._dest_parent(run, entry.parts)
        try:
            os.link(leader.parts[-1], entry.parts[-1], src_dir_fd=lparent, dst_dir_fd=dparent,
                    follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.EMLINK:
                return False
            raise self._dest_error(entry.parts, exc)
        run.stats.files += 1
        if stat.S_ISREG(entry.st.st_mode):
            run.stats.regular_files += 1
            run.stats.total_size += entry.st.st_size
        return True

    def _finish_dirs(self, run: _Run) -> None:
        """Directory attributes last, each after those below it, as rsync does:
        creating the entries inside would change the mtime, a default ACL would
        be inherited.  In reverse path order, what is below a directory (its
        path and a slash, then more) comes before it, and neighbours stay
        together; a directory both processes made is finished once."""
        self._dirs.sort(key=attrgetter("path"), reverse=True)
        last = None
        for d in self._dirs:
            if d.path == last:
                continue
            last = d.path
            run.stats.files += 1
            parts = _parts(d.path)
            try:
                fd = self._dst.open(parts) if parts else self._dst.top
            except OSError as exc:
                raise self._dest_error(parts, exc)
            try:
                os.fchown(fd, d.uid, d.gid)
                for name, value in (d.attrs or {}).items():
                    os.setxattr(fd, name, value)
                os.fchmod(fd, stat.S_IMODE(d.mode))
                if _sec(os.fstat(fd).st_mtime_ns) != _sec(d.mtime_ns):  # as rsync: equal seconds are left
                    os.utime(fd, ns=(d.atime_ns, d.mtime_ns))
            except OSError as exc:
                raise self._dest_error(parts, exc)


# --- the helper process -------------------------------------------------------------

_BATCH = 8 << 10  # bytes of paths handed over at once
_BACKLOG = 32 << 10  # beyond this many bytes not yet handed over, the main process places its own


def _helpers_share(parts: tuple[bytes, ...]) -> bool:
    """Is this entry the helper's?  Those of half of the directories below the
    top level are, by a hash of the directory's name and depth, so each
    directory is mostly filled by one process.  (Entries directly in the root
    stay with the main process, which reads the root itself when ``/`` is listed.)"""
    return len(parts) > 1 and (zlib.crc32(parts[-2]) + len(parts)) & 1 == 1


class _Report(NamedTuple):
    """What the helper did, sent to the main process when it has ended."""

    run: _Run
    dirs: list[_Dir]  # made by the helper, finished by the main process
    groups: dict  # hard-linked entries: placed by the main process, after the walk
    fatal: str | None  # why the build cannot go on


class _Helper:
    """The main process's side of the helper process, which places entries.

    The main process walks and hands the helper the paths of its directories
    (:func:`_helpers_share`) through a pipe, ``\\0``-terminated.  When the
    helper falls behind, the main process places them itself.  Order between
    the two does not matter: a parent directory not made yet is made by
    whichever needs it first, and both make the same one.  When the helper's
    pipe is closed it sends back a :class:`_Report` and ends.

    The helper is a new interpreter (:data:`_HELPER`) given the open source,
    target and link-dest directories, not a fork: a forked copy shares the
    main process's memory, and every page the main process writes afterwards
    (the walk touches the whole manifest) would be copied, 26 MB at 200k
    entries.  It says it is ready before it is handed anything; one that
    cannot start costs the main process nothing but the attempt.
    """

    def __init__(self, proc: subprocess.Popen, paths: int, report: int):
        self.proc = proc
        self.pid = proc.pid
        self._paths = paths
        self._report = report
        self._buffer = bytearray()
        self.ready = False

    @classmethod
    def start(cls, linker: Linker) -> _Helper:
        paths_r, paths_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(report_w, True)
        tops = [linker._src.top, linker._dst.top, *(d.top for d in linker._prev)]
        argv = [sys.executable, "-I", "-c", _HELPER, _IMPORT_ROOT, str(os.getpid()), str(paths_r), str(report_w),
                linker.source, linker.target, *map(str, tops)]
        try:
            proc = subprocess.Popen(argv, pass_fds=(paths_r, report_w, *tops), cwd="/", stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            for fd in (paths_w, report_r):
                os.close(fd)
            raise
        finally:
            os.close(paths_r)
            os.close(report_w)
        os.set_blocking(paths_w, False)
        return cls(proc, paths_w, report_r)

    def take(self, path: bytes, parts: tuple[bytes, ...]) -> bool:
        """Hand ``path`` over if it is the helper's and the helper keeps up."""
        if not _helpers_share(parts) or not (self.ready or self._started()):
            return False
        if len(self._buffer) >= _BACKLOG:
            self._send()
            if len(self._buffer) >= _BACKLOG:
                return False
        self._buffer += path
        self._buffer += b"\0"
        if len(self._buffer) >= _BATCH:
            self._send()
        return True

    def _started(self, wait: bool = False) -> bool:
        """Has the helper said it is ready (``wait``: once it says anything)?
        Until then, and if it never does, the main process places everything."""
        if self.proc.returncode is not None:
            return False
        if wait:
            os.set_blocking(self._report, True)  # made non-blocking for these polls
        try:
            said = os.read(self._report, 1)
        except BlockingIOError:
            return False
        if said != _READY:
            logger.info("linker: the helper process did not start (%s); one process places everything",
                        ended(self.proc.wait()))
            return False
        self.ready = True
        os.set_blocking(self._report, True)
        return True

    def wait(self) -> None:
        """Wait until the helper is ready or has failed to start."""
        self._started(wait=True)

    def _send(self) -> None:
        try:
            del self._buffer[:os.write(self._paths, self._buffer)]
        except BlockingIOError:
            pass
        except BrokenPipeError:  # it stopped reading: it failed
            raise DestinationWriteError(self._collect().fatal or "the helper process stopped") from None

    def finish(self, run: _Run, groups: dict, dirs: list[_Dir]) -> None:
        """Hand over the rest, wait for the helper and take in what it did."""
        if not self.ready:
            return  # never handed anything: stop() ends it
        os.set_blocking(self._paths, True)
        try:
            while self._buffer:
                del self._buffer[:os.write(self._paths, self._buffer)]
        except BrokenPipeError:
            pass  # its report says why
        os.close(self._paths)
        self._paths = -1
        report = self._collect()
        if report.fatal:
            raise DestinationWriteError(report.fatal)
        run.add(report.run)
        dirs.extend(report.dirs)
        for key, members in report.groups.items():
            groups.setdefault(key, []).extend(members)

    def _collect(self) -> _Report:
        chunks = []
        while chunk := os.read(self._report, 1 << 20):
            chunks.append(chunk)
        os.close(self._report)
        self._report = -1
        code = self.proc.wait()
        try:
            return pickle.loads(b"".join(chunks))
        except Exception:
            raise DestinationWriteError(f"the helper process ended without a report ({ended(code)})") from None

    def stop(self) -> None:
        """End the helper if it still runs: the build failed or was interrupted."""
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._paths, self._report):
            if fd >= 0:
                os.close(fd)
        self._paths = self._report = -1


_READY = b"R"
_IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds jwbackup/
# The helper's program: this jwbackup, imported from where the main process
# imported it (-I: no environment, user site or working directory on the path).
_HELPER = ("import sys\n"
           "if sys.argv[1] not in sys.path: sys.path.insert(0, sys.argv[1])\n"
           "from jwbackup.transfer.linker import serve\n"
           "serve(sys.argv[2:])\n")


def serve(argv: list[str]) -> None:
    """The helper process (:class:`_Helper`): ``PARENT PATHS REPORT SOURCE TARGET SRC DST [PREV ...]``,
    numbers but for the two paths."""
    parent, paths, report = (int(a) for a in argv[:3])
    die_with_parent(parent)
    linker = Linker(os.fsencode(argv[3]), os.fsencode(argv[4]))
    src, dst, *prev = (int(a) for a in argv[5:])
    linker._attach(src, dst, prev)
    os.write(report, _READY)
    _serve(linker, paths, report)


def _serve(linker: Linker, paths: int, report: int) -> None:
    """Place each path received, then report."""
    run: _Run = _Run()
    groups: dict = {}
    fatal = None
    try:
        for path in _received(paths):
            linker._one(run, path, _parts(path), groups)
    except DestinationWriteError as exc:
        fatal = str(exc)
    except OSError as exc:
        fatal = linker._cannot_build(exc)
    except Exception as exc:
        fatal = f"the helper process failed: {type(exc).__name__}: {exc}"
    finally:
        os.close(paths)  # a main process still handing over gets EPIPE, and then reads this report
    view = memoryview(pickle.dumps(_Report(run, linker._dirs, groups, fatal)))
    while view:
        view = view[os.write(report, view):]
    os.close(report)


def _received(fd: int) -> Iterator[bytes]:
    rest = b""
    while chunk := os.read(fd, 1 << 16):
        *paths, rest = (rest + chunk).split(b"\0")
        yield from paths


MAX_DESCRIPTORS = 65536  # a 4 KiB path has at most 2048 levels, times the source, generation and link-dests


def _enough_descriptors() -> None:
    """Raise the soft limit on open files (often 1024) towards the hard one:
    the linker keeps a directory open per level of the path it works in, for
    the source, the generation and each link-dest, so a tree a few hundred
    levels deep would otherwise run out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_DESCRIPTORS if hard == resource.RLIM_INFINITY else min(hard, MAX_DESCRIPTORS)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            logger.debug("cannot raise the limit on open files to %d: %s", want, exc)


def _drop_inherited_acls(fd: int) -> None:
    """Take off the ACLs the generation's top directory inherited from a
    default ACL on the destination: every entry made below it would inherit
    them too, unlike the source's, and so never match it again.  The top
    gets the source's own attributes at the end, as every directory does."""
    for name in (ACL_DEFAULT, ACL_ACCESS):
        try:
            os.removexattr(fd, name)
        except OSError:
            pass  # none there, or no ACLs on this filesystem


def build(source: str | bytes, paths: Iterable[bytes], target: str | bytes,
          link_dests: Sequence[str | bytes] = (), helper: bool | None = None,
          excludes: Iterable[bytes] = ()) -> Result:
    """Build the generation ``target`` from the ``paths`` selected under ``source``
    (``helper``, ``excludes``: see :class:`Linker`)."""
    return Linker(source, target, link_dests, helper, excludes).build(paths)

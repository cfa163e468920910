"""Getting things back from a generation: files, the package list, what changed.

* :func:`restore_paths` copies files or trees from a generation (local or over
  ssh) back to where they were, or under another directory, with
  ``rsync -aHAX --numeric-ids``: contents, modes, owners, ACLs, xattrs, times,
  symlinks and hard links come back as they were.  Nothing at the target is
  deleted unless asked (``--delete``, see :func:`extra_paths`).  Files already
  at the target are compared by content (``--checksum``), so a restore into
  place rewrites only what differs, and a file changed behind a kept size
  and mtime is not mistaken for the backup's.
* :func:`restore_packages` prints the commands that reinstall the packages a
  generation recorded (see :mod:`jwbackup.pkgstate`).
* :func:`diff` lists what was added, removed or changed between two
  generations, or between a generation and what a backup would hold now.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shlex
import stat
import sys
from contextlib import nullcontext
from typing import Iterable, NamedTuple

from jwbackup import cachedir, pkgstate, rsync, swap, transport
from jwbackup.backup import destination_of
from jwbackup.config import Config
from jwbackup.errors import EX_OK, EX_WARNINGS, JwbackupError, TransferError, UsageError
from jwbackup.execute import first_cause
from jwbackup.generate import load_manifest, pruned
from jwbackup.generations import LATEST, Listing, last_run
from jwbackup.repository import Repository
from jwbackup.select import Selector, system_path
from jwbackup.transfer.linker import read_attrs
from jwbackup.verify import Verifier

logger = logging.getLogger(__name__)

LINE_WIDTH = 78


def _open(cfg: Config):
    dest = destination_of(cfg)
    t = transport.connect(dest)
    return dest, t, Repository(t, dest.directory)


def pick_generation(listing: Listing, name: str | None) -> str:
    """``name`` if it is a complete generation; for None or ``latest``, the
    one the last run made (:func:`~jwbackup.generations.last_run`)."""
    complete = listing.complete
    if not complete:
        raise UsageError("the destination holds no complete generation yet")
    if name in (None, LATEST):
        return last_run(listing)
    if name not in complete:
        raise UsageError(f"unknown generation {name!r}; generations: {', '.join(complete)}")
    return name


# -- files -----------------------------------------------------------------------


def system_paths(paths: Iterable[str | bytes], root: str) -> list[bytes]:
    """The requested paths, absolute and normalised, as the system sees them."""
    result = []
    for path in paths:
        p = os.fsencode(path)
        if not p.startswith(b"/"):
            if os.fsencode(root).rstrip(b"/"):
                raise UsageError(f"{os.fsdecode(p)}: with --root, name paths as the system sees them (absolute)")
            p = os.path.abspath(p)
        p = posixpath.normpath(p)
        if p.startswith(b"//"):
            p = p[1:]
        if p not in result:
            result.append(p)
    return result


def missing_ancestors(target: bytes, paths: Iterable[bytes]) -> list[bytes]:
    """The parent directories of ``paths`` that do not exist under ``target``, outermost first."""
    missing: set[bytes] = set()
    for path in paths:
        parent = posixpath.dirname(path)
        while parent != b"/" and not os.path.lexists(target + parent):
            missing.add(parent)
            parent = posixpath.dirname(parent)
    return sorted(missing, key=lambda p: (p.count(b"/"), p))


def restore_command(source: str, target: str, *, recursive: bool, transport_args=(), dry_run=False,
                    checksum=False, force=False) -> list[str]:
    """rsync reading the paths to restore (relative to ``source``) from stdin, NUL-separated.

    Existing parent directories at the target are left as they are
    (``--no-implied-dirs``).  Without ``recursive`` only the listed entries
    themselves are copied (used for the parents that have to be recreated).

    With ``checksum``, files of the same size are compared by content, not
    by mtime: rsync's quick check would keep a file whose content changed
    but whose size and mtime did not (``touch -r``, a clock set back, a
    tool that keeps times).  ``--checksum`` rather than ``--ignore-times``:
    the latter rewrites every file, unchanged ones too (new inodes, all the
    writes), where this reads both sides and writes only what differs.

    ``force``: a non-empty directory in the way of a file is deleted (only
    for previewing what ``--delete`` makes way for, see :func:`_made_way`).
    """
    argv = ["rsync", "-aHAX", "--sparse", "--numeric-ids", "--files-from=-", "--from0", "--no-implied-dirs"]
    argv.append("--recursive" if recursive else "--no-recursive")
    if checksum:
        argv.append("--checksum")
    if force:
        argv.append("--force")
    argv += list(transport_args)
    if dry_run:
        argv += ["--dry-run", "--itemize-changes"]
    return argv + [source.rstrip("/") + "/", target.rstrip("/") + "/"]


def restore_paths(cfg: Config, root: str, paths: Iterable[str | bytes], generation: str | None = None,
                  target: str | None = None, dry_run: bool = False, delete: bool = False) -> int:
    """Copy ``paths`` (system paths) from a generation to ``target`` (default: ``root``)."""
    requested = system_paths(paths, root)
    if not requested:
        raise UsageError("name the paths to restore, or use --packages")
    dest, t, repo = _open(cfg)
    to = os.fsencode(os.path.abspath(target if target is not None else root)).rstrip(b"/")
    with t:
        name = pick_generation(repo.listing(writable=False), generation)
        source = repo.path(name)
        requested, absent = locate(repo, source, requested)
        if absent:
            shown = ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else "")
            raise UsageError(f"not in generation {name}: {shown}")
        for path in requested:
            if path.shown != path.path:
                logger.info("%s is %s in generation %s", os.fsdecode(path.shown), os.fsdecode(path.path), name)
        requested = list(dict.fromkeys(p.path for p in requested))
        failed, deleted = [], set()
        if delete:
            with cachedir.frozen() if dry_run else nullcontext():  # a dry run keeps no manifest either
                deleted, failed = _delete(to, extra_paths(cfg, root, to, repo, source, requested), dry_run)
        # The ancestors are restored after the paths, so that their times stay as recorded.
        ancestors = missing_ancestors(to, requested)
        runs = [(requested, True)] + ([(ancestors, False)] if ancestors else [])
        # Into an empty place there is nothing to compare: the sender's checksums would only double the reads.
        present = any(os.path.lexists(to + p) for p in requested)

        def copy(listed: list[bytes], recursive: bool, force: bool = False) -> rsync.Result:
            argv = restore_command(
                t.rsync_target(source), os.fsdecode(to) or "/", recursive=recursive,
                transport_args=t.rsync_args(), dry_run=dry_run, checksum=recursive and present, force=force,
            )
            return rsync.transfer(
                argv, [p.lstrip(b"/") or b"." for p in listed], env=t.env(),
                secrets=[dest.password] if dest.password else [], dry_run=dry_run,
            )

        for listed, recursive in runs:
            result = copy(listed, recursive)
            if dry_run and deleted:
                result = _made_way(result, to, deleted, copy)
            if dry_run:
                sys.stdout.buffer.write(result.output.rstrip(b"\n") + b"\n" if result.output.strip() else b"")
            if result.returncode not in (0, rsync.VANISHED, rsync.PARTIAL):
                stderr = "\n".join(result.errors).encode()
                raise t.connection_error(stderr, result.returncode) or TransferError(
                    f"restore from {name} failed: {first_cause(stderr) or f'rsync exited with status {result.returncode}'}")
            for line in result.errors:
                logger.warning("%s", line if line.startswith("rsync") else f"rsync: {line}")
            if result.returncode:  # what could not be written, without rsync's closing summary
                failed += [line for line in result.errors if not line.startswith("rsync error:")] or [
                    f"rsync exited with status {result.returncode}"]
    where = os.fsdecode(to) or "/"
    if failed and not dry_run:
        more = f" (and {len(failed) - 1} more, listed above)" if len(failed) > 1 else ""
        raise TransferError(f"restore from {name} to {where} is incomplete: {failed[0]}{more}")
    logger.info("%s %d paths from %s to %s", "would restore" if dry_run else "restored", len(requested), name, where)
    return EX_WARNINGS if failed else EX_OK


MAX_SYMLINKS = 40  # as the kernel's ELOOP


class Located(NamedTuple):
    shown: bytes  # as requested
    path: bytes  # in the generation, through no symlink


def locate(repo: Repository, source: str, paths: list[bytes]) -> tuple[list[Located], list[str]]:
    """Where each of ``paths`` is in the generation at ``source``, and why
    those it does not hold are missing.

    A path is never read through a symlink of the generation: each directory
    above it is looked up without following it (``find -P``), and where one
    is a symlink (``/bin -> usr/bin`` with usrmerge, a home linked to
    ``/srv``), it is resolved as if the generation were the root (absolute
    targets start at the generation; ``..`` leads to the parent of where
    the path has led so far, as the kernel takes it, and stops at the top),
    so that the path the system would have reached is restored, or
    reported missing.  Read
    through the kernel, an absolute symlink would have led to the live
    host's files.  One ``find`` for all the paths, one more per symlink met.
    """
    pending = {p: (p, 0, "") for p in paths}  # requested -> (where now, symlinks met, the first one)
    found: list[Located] = []
    absent: list[str] = []
    while pending:
        kinds = _lookup(repo, source, {a for current, _, _ in pending.values()
                                       for a in _lineage(_before_dotdot(current)[0])})
        for shown, (current, hops, through) in list(pending.items()):
            del pending[shown]
            head, rest = _before_dotdot(current)
            lineage = _lineage(head)
            # Before a "..", the path up to it must be a directory too: its parent is where ".." leads.
            checked = lineage if rest is not None and head != b"/" else lineage[:-1]
            above = next((a for a in checked if kinds.get(a, ("",))[0] != "d"), None)
            if above is None and rest is not None:
                pending[shown] = (_clean(posixpath.dirname(head) + b"/" + rest), hops, through)
                continue
            if above is None and current in kinds:
                found.append(Located(shown, current))
                continue
            if above is not None and kinds.get(above, ("",))[0] == "l":
                link = kinds[above][1]
                through = through or f"{os.fsdecode(above)} -> {os.fsdecode(link)}"
                if hops < MAX_SYMLINKS:
                    pending[shown] = (_resolve(above, link, current), hops + 1, through)
                    continue
            absent.append(os.fsdecode(shown) + (f" (through {through})" if through else ""))
    order = {p: i for i, p in enumerate(paths)}
    found.sort(key=lambda located: order[located.shown])
    return found, absent


def _resolve(above: bytes, link: bytes, path: bytes) -> bytes:
    """``path`` with its ancestor ``above`` replaced by where the symlink
    ``above -> link`` leads; a ``..`` in it is kept for :func:`locate`."""
    start = b"/" if link.startswith(b"/") else posixpath.dirname(above)
    return _clean(start + b"/" + link + b"/" + path[len(above) + 1:])


def _clean(path: bytes) -> bytes:
    """``path`` without empty and ``.`` components (``..`` kept), absolute."""
    return b"/" + b"/".join(c for c in path.split(b"/") if c not in (b"", b"."))


def _before_dotdot(path: bytes) -> tuple[bytes, bytes | None]:
    """``path`` up to its first ``..`` component, and what follows that (None: there is no ``..``)."""
    parts = path.split(b"/")
    if b".." not in parts:
        return path, None
    i = parts.index(b"..")
    return b"/".join(parts[:i]) or b"/", b"/".join(parts[i + 1:])


def _lineage(path: bytes) -> list[bytes]:
    """The directories above ``path`` (but ``/``), outermost first, then ``path``."""
    lineage = [path]
    while lineage[0] != b"/" and posixpath.dirname(lineage[0]) != b"/":
        lineage.insert(0, posixpath.dirname(lineage[0]))
    return lineage


def _lookup(repo: Repository, source: str, paths: Iterable[bytes]) -> dict[bytes, tuple[str, bytes]]:
    """find's kind (``%y``) and symlink target of those ``paths`` the
    generation at ``source`` holds, the last component not followed."""
    wanted = {os.fsencode(source) + p: p for p in sorted(paths)}
    out = repo.transport.run(["find", *wanted, "-maxdepth", "0", "-printf", r"%p\0%y\0%l\0"], check=False).stdout
    fields = out.split(b"\0")
    return {wanted[full]: (kind.decode(), link) for full, kind, link in zip(fields[0::3], fields[1::3], fields[2::3])
            if full in wanted}


def extra_paths(cfg: Config, root: str, to: bytes, repo: Repository, source: str, paths: list[bytes]) -> list[bytes]:
    """What ``--delete`` removes: the paths below the directories ``paths`` at
    ``to`` that a backup made now would hold and the generation at ``source``
    does not (created since).

    rsync's own ``--delete`` would remove everything the generation leaves
    out by design.  Here the backup's walk decides, so pruned, ``.no-backup``
    and cache-tagged directories, swap files and a local destination are
    never met; installed files are never deleted, modified or not (the walk
    runs without verification, and nothing the package manager of ``root``
    records is deleted: a conffile edited since is reverted or kept, never
    removed).
    """
    tops = [p for p in paths if stat.S_ISDIR(_lstat_mode(to + p))]
    # The walk stays within the configured roots: what lies outside them is
    # in no generation, and was not created since.
    roots = [os.fsencode(r) for r in cfg.roots]
    starts = [p for p in tops if any(system_path(r, p) is not None for r in roots)]  # p is r or below it
    starts += [r for r in roots if r not in starts and any(system_path(p, r) is not None for p in tops)
               and stat.S_ISDIR(_lstat_mode(to + r))]
    if not starts:
        return []
    manifest = load_manifest(cfg, root)
    where = os.fsdecode(to) or "/"
    selector = Selector(manifest, root=where, prune=pruned(cfg, where), verifier=Verifier(),
                        swap_files=swap.files(where))
    wanted = set(selector.select(starts))
    prefix = os.fsencode(source)
    out = repo.transport.run(["find", *(prefix + p for p in tops), "-printf", r"%p\0"]).stdout
    held = {p[len(prefix):] for p in out.split(b"\0") if p}
    return sorted(p for p in wanted - held if p not in manifest)


def _lstat_mode(path: bytes) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def _delete(to: bytes, paths: list[bytes], dry_run: bool) -> tuple[set[bytes], list[str]]:
    """Delete ``paths`` under ``to``, deepest first; a directory only once
    nothing is left in it (what the backup leaves out stays, and so does
    the directory holding it).  A dry run prints what would go, as rsync's
    ``--itemize-changes`` does.  Returns what is (or would be) deleted, and
    what could not be, and why."""
    gone: set[bytes] = set()
    failed = []
    for path in sorted(paths, reverse=True):
        real = to + path
        try:
            if stat.S_ISDIR(os.lstat(real).st_mode):
                if any(posixpath.join(path, name) not in gone for name in os.listdir(real)):
                    continue
                if not dry_run:
                    os.rmdir(real)
                path += b"/"
            elif not dry_run:
                os.unlink(real)
        except FileNotFoundError:
            continue
        except OSError as exc:
            failed.append(f"cannot delete {os.fsdecode(real)}: {exc.strerror}")
            logger.warning("%s", failed[-1])
            continue
        gone.add(path.rstrip(b"/"))
        if dry_run:
            sys.stdout.buffer.write(b"*deleting   " + rsync.printed_name(path.lstrip(b"/")) + b"\n")
    if not dry_run and gone:
        logger.info("deleted %d paths that the generation does not hold", len(gone))
    return gone, failed


# rsync's dry run finding a directory in the way of a file from the generation
_IN_THE_WAY = re.compile(r"(?:cannot delete non-empty directory|could not make way for new [a-z ]+): (.+)$")


def _made_way(result: rsync.Result, to: bytes, deleted: set[bytes], preview) -> rsync.Result:
    """``result`` of a restore's dry run, as if ``--delete`` had removed ``deleted`` first.

    Where the generation holds a file (or symlink) and the target now has a
    directory of files created since, the real run deletes those files and
    rsync replaces the empty directory.  A dry run deletes nothing, so
    rsync finds the directory full and fails on it (exit 23).  Such paths
    are previewed once more with ``--force``, and their lines replace
    rsync's complaints.
    """
    emptied = {}
    for path in {posixpath.dirname(p) for p in deleted}:
        try:
            names = os.listdir(to + path)
        except OSError:
            continue
        if all(posixpath.join(path, name) in deleted for name in names):
            emptied[rsync.printed_name(path.lstrip(b"/"))] = path
    in_the_way, errors = {}, []
    for line in result.errors:
        match = _IN_THE_WAY.match(line)
        name = match.group(1).encode() if match else None
        if name in emptied:
            in_the_way[name] = emptied[name]
        else:
            errors.append(line)
    if not in_the_way:
        return result
    again = preview(sorted(in_the_way.values()), False, force=True)
    names = tuple(in_the_way)
    arrows = tuple(name + b" -> " for name in names)
    lines = [line for line in again.output.splitlines() if line[12:] in names or line[12:].startswith(arrows)]
    errors += again.errors
    if result.returncode == rsync.PARTIAL and all(line.startswith(rsync.PARTIAL_SUMMARY) for line in errors):
        result.returncode, errors = again.returncode, []
    result.errors = errors
    said = [line for line in result.output.splitlines()  # "cannot delete ..." goes to stdout
            if not ((match := _IN_THE_WAY.match(line.decode("ascii", "replace"))) and match.group(1).encode() in names)]
    result.output = b"".join(line + b"\n" for line in said + lines)
    return result


# -- packages --------------------------------------------------------------------


def read_state(repo: Repository, name: str) -> pkgstate.State | None:
    """The package state recorded in generation ``name``, or None."""
    directory = posixpath.join(repo.path(name), pkgstate.STATE_DIR.lstrip("/"))
    files = {}
    for file in pkgstate.FILES:
        result = repo.transport.run(["cat", "--", posixpath.join(directory, file)], check=False)
        if result.returncode == 0:
            files[file] = result.stdout
    return pkgstate.parse(files)


def _command(words: list[str], items: list[str]) -> list[str]:
    """A shell command over several lines: ``words``, then ``items`` wrapped with backslashes."""
    lines, line = [], shlex.join(words)
    for item in map(shlex.quote, items):
        if len(line) + 1 + len(item) > LINE_WIDTH - 2:
            lines.append(line + " \\")
            line = "    " + item
        else:
            line += " " + item
    return lines + [line]


def package_plan(state: pkgstate.State, origin: str, exact_versions: bool = False) -> list[str]:
    """The reinstall plan: comment lines and shell commands an admin reviews and runs.

    ``origin`` says where the state was read ("generation NAME").
    """
    if state.manager == "portage":
        lines = [
            f"# Reinstall plan from {origin} (portage): {len(state.installed)} packages were "
            f"installed, {len(state.world)} atoms and sets selected in the world file.",
            "# Restore /etc/portage first (jwbackup restore /etc/portage), then run:",
        ]
        if not state.world:
            return lines + ["# (the world file was empty: nothing was selected explicitly)"]
        return lines + _command(["emerge", "--ask", "--noreplace"], state.world)
    versions = {}
    for name, version, arch in state.packages:
        versions[name] = versions[f"{name}:{arch}"] = version
    manual = set(state.manual)

    def spec(name: str) -> str:
        return f"{name}={versions[name]}" if exact_versions and name in versions else name

    arches: dict[str, int] = {}
    for name, _, _ in state.packages:
        arches[name] = arches.get(name, 0) + 1
    bare_manual = {m.split(":")[0] for m in manual}
    auto = sorted(
        name if arches[name] == 1 or not arch else f"{name}:{arch}"
        for name, _, arch in state.packages
        if name not in manual and f"{name}:{arch}" not in manual and not (arches[name] == 1 and name in bare_manual)
    )
    lines = [
        f"# Reinstall plan from {origin} (dpkg): {len(state.packages)} packages, "
        f"{len(manual)} installed explicitly.",
        "# Run as root on the same release and architecture"
        + ("; pinned versions may no longer be in the archive." if exact_versions else "."),
    ]
    if state.diversions:
        lines.append("# The local diversions first, so that dpkg installs those files under their new names:")
        lines += [shlex.join(["dpkg-divert", "--local", "--rename", "--divert", to, "--add", path])
                  for path, to in state.diversions]
    lines.append("apt-get update")
    if manual:
        lines += _command(["apt-get", "install"], [spec(m) for m in sorted(manual)])
    if auto:
        lines.append("# Optional: the packages that were installed as dependencies, marked automatic again:")
        lines += _command(["apt-get", "install", "--mark-auto"], [spec(a) for a in auto])
    if state.removed_conffiles:
        lines.append("# Configuration files that had been deleted; installing the packages put them back:")
        lines += _command(["rm", "-f", "--"], state.removed_conffiles)
    if state.overrides:
        lines.append("# The owner and mode overrides (dpkg-statoverride), put on the installed files; an")
        lines.append("# override naming a user or group of your own works once /etc is restored:")
        lines += [shlex.join(["dpkg-statoverride", "--force-statoverride-add", "--update", "--add", *override])
                  for override in state.overrides]
    return lines


def restore_packages(cfg: Config, generation: str | None = None, exact_versions: bool = False) -> int:
    dest, t, repo = _open(cfg)
    with t:
        name = pick_generation(repo.listing(writable=False), generation)
        state = read_state(repo, name)
    if state is None:
        raise JwbackupError(
            f"generation {name} holds no package state ({pkgstate.STATE_DIR}); it was made by an older "
            "jwbackup, or the roots leave out /var/lib"
        )
    return _print_plan(package_plan(state, f"generation {name}", exact_versions))


def packages_from(directory: str, exact_versions: bool = False) -> int:
    """``restore --packages --from DIR``: the plan from a package state that
    another tool (borg, restic, tar) restored."""
    if not os.path.isdir(directory):
        raise JwbackupError(f"{directory}: no such directory")
    try:
        state = pkgstate.read_directory(directory)
    except OSError as exc:
        raise JwbackupError(f"cannot read the package state in {directory}: {exc.strerror}") from None
    if state is None:
        raise JwbackupError(
            f"{directory} holds no package state: name the restored {pkgstate.STATE_DIR}, or the directory "
            "the system was restored under"
        )
    return _print_plan(package_plan(state, directory, exact_versions))


def _print_plan(lines: list[str]) -> int:
    sys.stdout.flush()
    sys.stdout.buffer.write("".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"))
    sys.stdout.buffer.flush()
    return EX_OK


# -- diff ------------------------------------------------------------------------


class Record(NamedTuple):
    inode: int | None  # None: never shared (the live system)
    kind: str  # find's %y: f d l p s c b
    size: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    link: bytes
    attrs: tuple | None = None  # extended attributes and ACLs as rsync -AX carries them; None: not read


FIND_FORMAT = r"%i\0%y\0%s\0%T@\0%m\0%U\0%G\0%l\0%P\0"
_FIELDS = 9


def parse_find(out: bytes) -> dict[bytes, Record]:
    """``find -printf FIND_FORMAT`` output -> {system path: Record}."""
    fields = out.split(b"\0")
    records = {}
    for i in range(0, len(fields) - _FIELDS + 1, _FIELDS):
        ino, kind, size, mtime, mode, uid, gid, link, path = fields[i : i + _FIELDS]
        records[b"/" + path] = Record(int(ino), kind.decode(), int(size), _ns(mtime), int(mode, 8),
                                      int(uid), int(gid), link)
    return records


def _ns(text: bytes) -> int:
    seconds, _, fraction = text.partition(b".")
    return int(seconds) * 1_000_000_000 + int((fraction[:9] or b"0").ljust(9, b"0"))


_KINDS = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFIFO: "p",
          stat.S_IFSOCK: "s", stat.S_IFCHR: "c", stat.S_IFBLK: "b"}


def live_record(real: bytes) -> Record | None:
    try:
        st = os.lstat(real)
    except OSError:
        return None
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "?")
    link = os.readlink(real) if kind == "l" else b""
    return Record(None, kind, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, link,
                  _attrs(real))


def _attrs(real: bytes) -> tuple | None:
    try:
        return tuple(sorted(read_attrs(real).items()))
    except OSError:
        return None  # vanished, or unreadable: compared on the rest


def changed(a: Record, b: Record) -> bool:
    """Do two records of one path differ?  A shared inode settles it at once."""
    if a.inode is not None and a.inode == b.inode and a.kind != "d":
        return False
    if a.kind != b.kind or (a.mode, a.uid, a.gid) != (b.mode, b.uid, b.gid):
        return True
    if a.attrs is not None and b.attrs is not None and a.attrs != b.attrs:
        return True
    if a.kind == "f":
        return (a.size, a.mtime_ns) != (b.size, b.mtime_ns)
    if a.kind == "l":
        return a.link != b.link
    return False  # a directory's own content is its entries, listed on their own


def compare(old: dict[bytes, Record], new: dict[bytes, Record]) -> list[tuple[str, bytes]]:
    """(``+``/``-``/``M``, path) for every path added, removed or changed from ``old`` to ``new``."""
    out = [("-", p) for p in old.keys() - new.keys()]
    out += [("+", p) for p in new.keys() - old.keys()]
    out += [("M", p) for p in old.keys() & new.keys() if changed(old[p], new[p])]
    out.sort(key=lambda item: item[1])
    return out


def _generation_records(repo: Repository, name: str) -> dict[bytes, Record]:
    result = repo.transport.run(["find", repo.path(name), "-mindepth", "1", "-printf", FIND_FORMAT], check=False)
    if result.returncode != 0:
        logger.warning("listing generation %s: %s", name, first_cause(result.stderr) or f"find exited {result.returncode}")
    records = parse_find(result.stdout)
    if repo.transport.where != "local":
        return records  # find prints no xattrs: over ssh they are not compared
    top = os.fsencode(repo.path(name))
    return {path: r._replace(attrs=_attrs(top + path)) for path, r in records.items()}


def _live_records(cfg: Config, root: str) -> tuple[dict[bytes, Record], int]:
    """What a backup would hold now (the selection), with the roots' parent
    directories; and how many roots or directories could not be read."""
    from jwbackup.generate import load_manifest, make_selector

    manifest = load_manifest(cfg, root)
    selector = make_selector(cfg, root, manifest)
    prefix = os.fsencode(root).rstrip(b"/")
    paths = set(selector.select(cfg.roots))
    for top in cfg.roots:
        parent = posixpath.dirname(os.fsencode(top).rstrip(b"/"))
        while parent not in (b"/", b""):
            paths.add(parent)
            parent = posixpath.dirname(parent)
    paths.discard(b"/")
    records = {}
    for path in paths:
        record = live_record(prefix + path)
        if record is not None:
            records[path] = record
    return records, len(selector.stats.unreadable)


def diff(cfg: Config, root: str, names: list[str], null: bool = False) -> int:
    """Print what changed from ``names[0]`` to ``names[1]`` (default: the system now)."""
    if not 1 <= len(names) <= 2:
        raise UsageError("diff takes one generation (compared with the system now) or two")
    dest, t, repo = _open(cfg)
    with t:
        listing = repo.listing(writable=False)
        picked = [pick_generation(listing, n) for n in names]
        old = _generation_records(repo, picked[0])
        new = _generation_records(repo, picked[1]) if len(picked) == 2 else None
    unreadable = 0  # on the system now: what is below them shows as removed
    if new is None:
        new, unreadable = _live_records(cfg, root)
    sep = b"\0" if null else b"\n"
    out = sys.stdout.buffer
    skipped = 0
    for mark, path in compare(old, new):
        if not null and b"\n" in path:
            skipped += 1
            continue
        out.write(mark.encode() + b" " + path + sep)
    out.flush()
    if skipped:
        logger.warning("%d paths hold a newline and were left out; use -0", skipped)
    return EX_WARNINGS if unreadable or skipped else EX_OK  # the list lacks something

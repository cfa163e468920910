"""One backup run, end to end.

lock → package state → manifest → verification (on two CPUs, alongside the
walk) → destination check → selection streamed into rsync or the linker
(``--link-dest`` the newest complete generation) → rename ``.partial`` to
its name → ``latest`` → retention.  Nothing becomes visible before rsync has
finished; a failure leaves the ``.partial`` for the next run to link against
and every complete generation as it was.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from datetime import datetime

from jwbackup import cachedir, confine, generations, hooks, rsync, transfer, transport
from jwbackup.config import Config
from jwbackup.errors import EX_OK, EX_WARNINGS, ConfigError, JwbackupError, TransferError
from jwbackup.excludes import rsync_rule
from jwbackup.execute import first_cause
from jwbackup.generate import load_manifest, make_selector
from jwbackup.generations import PARTIAL_SUFFIX
from jwbackup.lock import Lock
from jwbackup.repository import Repository
from jwbackup.select import SWAP_FILE
from jwbackup.transfer import remote

logger = logging.getLogger(__name__)

MAX_PARTIAL_LINK_DESTS = 5
# rsync's exits for a link that failed: protocol stream (12), ssh (255), silence (30, 35)
_LINK_FAILURES = (12, 255, rsync.TIMEOUT, rsync.CONNECT_TIMEOUT)


@dataclass
class Outcome:
    name: str | None
    status: int
    removed: list[str]


def destination_of(cfg: Config):
    if cfg.destination is None:
        raise ConfigError(f"{cfg.path}: no destination section: jwbackup does not know where to write")
    return cfg.destination


def run(cfg: Config, root: str = "/", dry_run: bool = False, progress: bool | None = None) -> Outcome:
    dest = destination_of(cfg)
    if progress is None:
        progress = sys.stderr.isatty()
    started = time.monotonic()
    started_ns = time.time_ns()  # before anything is read: see transfer.remote
    source = f"{socket.gethostname()}:{os.path.abspath(root)}"
    # hooks: before on entering, on_error on an exception, after once committed
    with Lock(cfg.lock_file), hooks.Runner(cfg.hooks, hooks.describe(dest), enabled=not dry_run) as hook_run, \
            (cachedir.frozen() if dry_run else nullcontext()):
        manifest = load_manifest(cfg, root, write_state=not dry_run)
        selector = make_selector(cfg, root, manifest, alongside=True)
        with closing(selector), transport.connect(dest) as t:
            repo = Repository(t, dest.directory)
            listing = repo.listing()  # one clear error unless a writable directory
            if not dry_run:
                repo.finish_removals(listing)
            latest = generations.latest_complete(listing)
            taken = listing.complete + listing.partial + listing.other
            name = generations.unique_name(datetime.now(), taken)
            _warn_of_future(listing.complete, name)
            partial = name + PARTIAL_SUFFIX
            hook_run.generation = name
            # Earlier interrupted runs are linked against too: what they copied
            # is not copied again.  They are removed once this run commits.
            link_dests = ([repo.path(latest)] if latest else []) + [
                repo.path(p) for p in listing.partial[:MAX_PARTIAL_LINK_DESTS]
            ]
            builder, result = _build(cfg, t, repo, root, selector, latest, partial, link_dests,
                                     dry_run=dry_run, progress=progress, source=source)
            if result.walk_error is not None:
                if isinstance(result.walk_error, JwbackupError):
                    raise result.walk_error
                raise JwbackupError(f"walking the roots failed: {result.walk_error}") from result.walk_error
            if not result.committable:
                raise _transfer_error(t, result, partial, builder)
            # A file gone since the walk is a live system's normal: for the log, not for cron's mail.
            only_vanished = all(_VANISHED.search(line) or _MORE.match(line) for line in result.errors)
            for line in result.errors:
                quiet = only_vanished or _VANISHED.search(line)
                logger.log(logging.INFO if quiet else logging.WARNING, "%s: %s", builder, line)
            unreadable = len(selector.stats.unreadable)
            status = EX_WARNINGS if result.returncode == rsync.PARTIAL or unreadable else EX_OK
            if dry_run:
                sys.stdout.buffer.write(result.output)
                # as the real run plans it: with the generation it would have made
                plan = generations.plan_retention((name,) + listing.complete, dest.generations, dest.keep,
                                                  current=name)
                for old in plan.remove:
                    logger.info("dry run: retention would remove %s", old)
                return Outcome(None, status, plan.remove)

            unfinished = repo.commit(partial, name, {
                "files": result.stats.files,
                "size": result.stats.total_size,
                "copied": result.stats.transferred,
                "copied_size": result.stats.transferred_size,
                "seconds": round(time.monotonic() - started, 1),
                "started_ns": started_ns,
                "source": source,
                "incomplete": result.returncode == rsync.PARTIAL,  # some files or attributes not copied
                "unreadable": unreadable,  # roots and directories the walk could not read
            })
            for line in unfinished:
                logger.warning("%s", line)
                status = EX_WARNINGS
            plan = generations.plan_retention((name,) + listing.complete, dest.generations, dest.keep, current=name)
            for old in plan.remove:
                logger.info("removing expired generation %s", old)
            repo.remove(*listing.partial, *plan.remove)

        _summary(name, result, selector.stats, plan.remove, time.monotonic() - started, status)
        status = hook_run.after(name, status)
    return Outcome(name, status, plan.remove)


def _warn_of_future(complete: tuple[str, ...], name: str) -> None:
    """Say so when generations are named after ``name``, this run's: retention
    counts them as the newest until the clock has passed them."""
    later = [g for g in complete if generations.parse(g) > generations.parse(name)]
    if later:
        logger.warning("%d generations are named later than this run's %s (newest: %s); "
                       "was the clock set back?", len(later), name, later[0])


def _build(cfg: Config, t, repo: Repository, root: str, selector, latest: str | None, partial: str,
           link_dests: list[str], *, dry_run: bool, progress: bool, source: str) -> tuple[str, rsync.Result]:
    """Build ``partial`` with the builder :func:`transfer.choose` picks: (builder, outcome)."""
    dest = cfg.destination
    previous = repo.read_stats().get(latest) if latest and (dest.remote or dry_run) else None
    builder, why = transfer.choose(cfg.transfer, dest, repo.path(partial), link_dests, dry_run=dry_run,
                                   previous=previous, source=source)
    logger.info("backing up %s to %s with %s (%s)", ", ".join(cfg.roots), _where(t, repo.path(partial)), builder, why)
    paths = selector.select(cfg.roots)
    swap_files = selector.swap_files()  # a listed / would bring /swapfile along
    if builder == transfer.LINKER:
        return builder, transfer.build(root, paths, repo.path(partial), link_dests, excludes=swap_files)
    with confine.source(root) as (source_path, fds):  # rsync reads where no symlink is followed
        argv = rsync.make_command(
            source_path, t.rsync_target(repo.path(partial)), link_dests,
            transport_args=t.rsync_args(), dry_run=dry_run, progress=progress,
            filters=[rsync_rule(path) for path in swap_files],
        )

        def send(listed):
            result = rsync.transfer(argv, listed, env=t.env(), progress=progress, pass_fds=fds,
                                    secrets=[dest.password] if dest.password else [], dry_run=dry_run)
            if source_path != root:  # the system's paths, as the linker names them, not the read-only view's
                view = source_path.rstrip("/") + "/"
                result.errors = [line.replace(view, "/") for line in result.errors]
            return result

        tally = rsync.Tally(root, swap_files)  # rsync's own counts are too high
        if builder in (transfer.REMOTE, transfer.PREVIEW):
            result = remote.build(repo, os.fsencode(root), paths, latest, partial, previous["started_ns"], send,
                                  tally, dry_run=dry_run)
        else:
            result = send(tally.listed(paths))
        tally.into(result.stats)
        return builder, result


# rsync's and the linker's lines for a file gone between the walk and the copy (exit 24)
_VANISHED = re.compile(r"file has vanished: |some files vanished before they could be transferred")
_MORE = re.compile(r"\.\.\. and [0-9]+ more lines$")  # rsync.transfer's count of the lines it left out


def _where(t, path: str) -> str:
    return path if t.where == "local" else f"{t.where}:{path}"


def _transfer_error(t, result: rsync.Result, partial: str, builder: str = "rsync") -> JwbackupError:
    stderr = "\n".join(result.errors).encode()
    connection = t.connection_error(stderr, result.returncode) if result.returncode in _LINK_FAILURES else None
    if connection is not None:
        return connection
    line = first_cause(stderr) or f"{builder} exited with status {result.returncode}"
    if not line.startswith(builder):
        line = f"{builder}: " + line
    return TransferError(f"{line} (exit {result.returncode}); {partial} is kept for the next run, earlier generations are untouched")


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _summary(name, result, walk, removed, elapsed, status) -> None:
    s = result.stats
    lines = [
        f"generation {name} {'completed with warnings' if status else 'complete'} in {elapsed:.1f} s",
        f"  entries:   {s.files:,} ({s.regular_files:,} files, {human_size(s.total_size)})",
        f"  copied:    {s.transferred:,} files, {human_size(s.transferred_size)}",
        f"  linked:    {s.linked:,} unchanged files shared with the previous generation",
        f"  left out:  {walk.owned:,} installed files; {walk.modified:,} modified package files kept",
    ]
    if walk.unreadable:
        names = ", ".join(os.fsdecode(path) for path, _ in walk.unreadable[:3])
        more = f" and {len(walk.unreadable) - 3} more" if len(walk.unreadable) > 3 else ""
        lines.append(f"  not read:  {len(walk.unreadable)} roots or directories, left out: {names}{more}")
    swap_files = [os.fsdecode(path) for path, why in walk.skipped if why == SWAP_FILE]
    directories = len(walk.skipped) - len(swap_files)
    if directories:
        lines.append(f"  skipped:   {directories} directories (prune list, .no-backup, CACHEDIR.TAG)")
    if swap_files:
        lines.append(f"  swap:      {', '.join(swap_files)} left out")
    if removed:
        lines.append(f"  expired:   {', '.join(removed)}")
    logger.info("\n".join(lines))

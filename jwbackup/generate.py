"""The pre-backup generator: ``jwbackup files`` and ``jwbackup excludes``.

Both answer "what does this system hold that its package manager cannot
reinstall?", for other tools: a file list for rsync, restic or tar, or exclude
rules for borg (through borgmatic), rsync, restic or tar.  Both write the
package state into the system first, as a backup does, so that the other
tool's archive says what to reinstall.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from itertools import chain
from typing import NoReturn

from jwbackup import managers, manifestcache, pkgstate, swap, verify
from jwbackup.config import Config
from jwbackup.errors import EX_OK, EX_WARNINGS, OutputError, UsageError
from jwbackup.excludes import Replacement, owned_unmodified, write_rules
from jwbackup.managers import Manifest
from jwbackup.paths import Canonicalizer
from jwbackup.select import Selector, system_path

logger = logging.getLogger(__name__)


def load_manifest(cfg: Config, root: str, write_state: bool = False) -> Manifest:
    """The manifest of the system at ``root``; with ``write_state``, the
    package state (:mod:`jwbackup.pkgstate`) is written into the system first.

    The state lands in what is backed up, whichever tool copies it: it says
    what to reinstall.  It is written before the manifest is read, so that
    what it parses is freed by then: the peak is lower (by 5 MiB at 1M
    entries).
    """
    started = time.monotonic()
    manager = managers.detect(root, cfg.manager)
    if write_state:
        pkgstate.save(root, manager.name)
    manifest, kept = manifestcache.load(manager, root)
    for warning in manifest.warnings:
        logger.warning("%s", warning)
    logger.info(
        "%s manifest: %d paths in %.2f s%s", manager.name, len(manifest), time.monotonic() - started,
        " (kept from an earlier run)" if kept else "",
    )
    return manifest


def pruned(cfg: Config, root: str) -> list[bytes]:
    """The directories the walk does not enter: the prune list, and a local destination inside the system.

    A directory listed as a root is backed up even when the prune list names
    it too, as one below a pruned directory is: ``root: /var/cache/apt``
    under the default list, say.  The destination stays pruned whatever.
    """
    roots = set(cfg.roots)
    prune = [os.fsencode(p) for p in cfg.prune if p not in roots]
    dest = cfg.destination
    if dest is not None and not dest.remote:
        inside = system_path(os.fsencode(os.path.realpath(root)), os.fsencode(os.path.realpath(dest.directory)))
        if inside is not None:
            prune.append(inside)
    return prune


def make_selector(cfg: Config, root: str, manifest: Manifest, alongside: bool = False) -> Selector:
    """A selector over ``root`` that skips the prune list, a local destination and swap files.

    Installed files under the roots are verified (``cfg.verify``, behind the
    stat cache); the selector keeps the modified ones.  The verification
    comes first, or with ``alongside`` and two CPUs, runs in a child process
    while the walk goes on (:class:`verify.Running`; the selector must then
    be closed).
    """
    prune = pruned(cfg, root)
    verifier = None
    if alongside and cfg.verify != "none" and len(os.sched_getaffinity(0)) >= 2:
        try:
            verifier = verify.Running(manifest, root, cfg.verify, roots=cfg.roots)
        except OSError as exc:  # no process or pipe to spare: the verification comes first
            logger.info("verification alongside the walk: %s; verifying first", exc.strerror)
    if verifier is None:
        verifier = verify.check(manifest, root, cfg.verify, roots=cfg.roots)
    return Selector(manifest, root=root, prune=prune, verifier=verifier, swap_files=swap.files(root))


def _excluded_directories(cfg: Config, root: str) -> list[bytes]:
    """The pruned directories that can be excluded whole: not those holding a
    root (``/var/cache`` under ``root: /var/cache/keep``), which a tool would
    then not enter; their other content is backed up, in excess.  Nor a
    symlink of a pruned name (``/var/run -> /run``): the walk prunes only
    directories, and keeps the link."""
    roots = [os.fsencode(r) for r in cfg.roots]
    prefix = os.fsencode(root).rstrip(b"/")
    return [p for p in pruned(cfg, root)
            if not any(r.startswith(p.rstrip(b"/") + b"/") for r in roots) and not os.path.islink(prefix + p)]


class Output:
    """Where ``files`` and ``excludes`` write: stdout, or ``path`` replaced
    atomically (:class:`~jwbackup.excludes.Replacement`).

    The file is opened first, so a name that cannot be written fails at once,
    before any work.  Whatever stops the output (a missing directory, a full
    disk or stdout on /dev/full) ends the command in one line naming it, exit
    73, an existing file as it was.  A new file is made mode 0600: the rules
    are read by root's backup tools, and which conffiles they leave out says
    which ones the admin changed.
    """

    NEW_FILE_MODE = 0o600

    def __init__(self, path: str | None = None):
        if path == "":
            raise UsageError("-o needs a file name; leave it out to write to stdout")
        self.name = "stdout" if path is None else path
        self._new: Replacement | None = None
        try:
            if path is not None:
                self._new = Replacement(path, self.NEW_FILE_MODE)
        except OSError as exc:
            self._failed(exc)
        self._stream = sys.stdout.buffer if self._new is None else self._new.file

    def write(self, data: bytes) -> None:
        try:
            self._stream.write(data)
        except OSError as exc:
            self._failed(exc)

    def close(self) -> None:
        """Put the file in place (or flush stdout): the output is complete."""
        try:
            if self._new is None:
                self._stream.flush()
            else:
                self._new.commit()
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> NoReturn:
        if isinstance(exc, BrokenPipeError):
            raise exc  # the reader went away (jwbackup files | head): cli.py ends quietly
        raise OutputError(f"cannot write {self.name}: {exc.strerror or exc}") from exc

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc) -> None:
        if self._new is not None:
            self._new.discard()  # after close(): nothing left to do


def files(cfg: Config, root: str, null: bool = False, no_dirs: bool = False, write_state: bool = True) -> int:
    """Print the paths a backup holds; 1 when the list lacks some (an unreadable
    directory, a name with a newline without ``-0``), so that a pipeline stops.

    The root itself is not printed: rsync's ``--files-from`` takes a listed
    ``/`` (or ``ROOT/``) for everything directly in it, a swap file too.
    """
    manifest = load_manifest(cfg, root, write_state)
    selector = make_selector(cfg, root, manifest)
    prefix = os.fsencode(root).rstrip(b"/")
    sep = b"\0" if null else b"\n"
    paths = selector.select(cfg.roots, directories=not no_dirs)
    skipped = 0
    with Output() as out:
        for path in paths:
            if path == b"/":
                continue
            if not null and b"\n" in path:
                skipped += 1
                continue
            out.write(prefix + path + sep)
        out.close()
    if skipped:
        logger.warning("%d paths hold a newline and were left out; use -0", skipped)
    return EX_WARNINGS if selector.stats.unreadable or skipped else EX_OK


def swap_paths(root: str) -> list[bytes]:
    """The swap files, under the names fstab gives them and those a walk meets them by.

    An fstab name may go through a symlinked directory (``/swaplink/swap2``,
    ``/swaplink -> srv/swapdir``): borg, tar and restic walk ``/`` and meet
    ``/srv/swapdir/swap2``, so that name needs the rule, as the selector
    resolves it too.  The fstab name costs one rule more and serves a tool
    given the symlinked path.
    """
    canon = Canonicalizer(root)
    named = swap.files(root)
    return sorted(named | set(map(canon, named)))


def excludes(cfg: Config, root: str, fmt: str, output: str | None = None, null: bool = False,
             write_state: bool = True) -> int:
    """Write exclude rules that leave out what the backup's own walk leaves out:
    the pruned directories, swap files, and the installed, unmodified files."""
    with Output(output) as out:
        manifest = load_manifest(cfg, root, write_state)
        verifier = verify.check(manifest, root, cfg.verify)
        paths = chain(owned_unmodified(manifest, os.fsencode(root), verifier), swap_paths(root))
        # The directories first: the few lines a reader of the file looks for
        directories = write_rules(_excluded_directories(cfg, root), fmt, out, root=os.fsencode(root), null=null,
                                  directories=True)
        written = write_rules(paths, fmt, out, root=os.fsencode(root), null=null)
        out.close()
    logger.info("%d %s exclude rules written%s", directories.rules + written.rules, fmt,
                f" to {output}" if output else "")
    if directories.unexpressible:
        logger.warning("%d directories of the prune list have names that %s rules cannot express; "
                       "they are not excluded", directories.unexpressible, fmt)
    if written.unexpressible:
        logger.warning(
            "%d installed files have names that %s rules cannot express; they are not excluded (they will be backed up)",
            written.unexpressible, fmt,
        )
    return EX_OK

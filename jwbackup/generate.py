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

from jwbackup import managers, manifestcache, pkgstate, swap, verify
from jwbackup.config import Config
from jwbackup.errors import EX_OK, EX_WARNINGS
from jwbackup.excludes import owned_unmodified, write_atomically, write_rules
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


def make_selector(cfg: Config, root: str, manifest: Manifest, alongside: bool = False) -> Selector:
    """A selector over ``root`` that skips the prune list, a local destination and swap files.

    Installed files under the roots are verified (``cfg.verify``, behind the
    stat cache); the selector keeps the modified ones.  The verification
    comes first, or with ``alongside`` and two CPUs, runs in a child process
    while the walk goes on (:class:`verify.Running`; the selector must then
    be closed).
    """
    # A directory listed as a root is backed up even when the prune list names
    # it too, as one below a pruned directory is: ``root: /var/cache/apt``
    # under the default list, say.  The destination stays pruned whatever.
    roots = set(cfg.roots)
    prune = [os.fsencode(p) for p in cfg.prune if p not in roots]
    dest = cfg.destination
    if dest is not None and not dest.remote:
        inside = system_path(os.fsencode(os.path.realpath(root)), os.fsencode(os.path.realpath(dest.directory)))
        if inside is not None:
            prune.append(inside)
    verifier = None
    if alongside and cfg.verify != "none" and len(os.sched_getaffinity(0)) >= 2:
        try:
            verifier = verify.Running(manifest, root, cfg.verify, roots=cfg.roots)
        except OSError as exc:  # no process or pipe to spare: the verification comes first
            logger.info("verification alongside the walk: %s; verifying first", exc.strerror)
    if verifier is None:
        verifier = verify.check(manifest, root, cfg.verify, roots=cfg.roots)
    return Selector(manifest, root=root, prune=prune, verifier=verifier, swap_files=swap.files(root))


def files(cfg: Config, root: str, null: bool = False, no_dirs: bool = False, write_state: bool = True) -> int:
    """Print the paths a backup holds; 1 when the list lacks some (an unreadable
    directory, a name with a newline without ``-0``), so that a pipeline stops."""
    manifest = load_manifest(cfg, root, write_state)
    selector = make_selector(cfg, root, manifest)
    prefix = os.fsencode(root).rstrip(b"/")
    sep = b"\0" if null else b"\n"
    out = sys.stdout.buffer
    paths = selector.select(cfg.roots, directories=not no_dirs)
    skipped = 0
    for path in paths:
        if not null and b"\n" in path:
            skipped += 1
            continue
        out.write(prefix + path + sep)
    out.flush()
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
    manifest = load_manifest(cfg, root, write_state)
    verifier = verify.check(manifest, root, cfg.verify)
    paths = chain(owned_unmodified(manifest, os.fsencode(root), verifier), swap_paths(root))

    def fill(out):
        return write_rules(paths, fmt, out, root=os.fsencode(root), null=null)

    if output:
        written = write_atomically(output, fill)
    else:
        written = fill(sys.stdout.buffer)
        sys.stdout.buffer.flush()
    logger.info("%d %s exclude rules written%s", written.rules, fmt, f" to {output}" if output else "")
    if written.unexpressible:
        logger.warning(
            "%d installed files have names that %s rules cannot express; they are not excluded (they will be backed up)",
            written.unexpressible, fmt,
        )
    return EX_OK

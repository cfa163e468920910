"""Commands that look after the destination without backing up: init, list, prune."""

from __future__ import annotations

import json
import logging
import sys

from jwbackup import generations, pkgstate, transport
from jwbackup.backup import destination_of, human_size
from jwbackup.config import Config
from jwbackup.errors import EX_OK
from jwbackup.lock import Lock
from jwbackup.repository import Repository

logger = logging.getLogger(__name__)


def _open(cfg: Config):
    dest = destination_of(cfg)
    t = transport.connect(dest)
    return dest, t, Repository(t, dest.directory)


def init(cfg: Config) -> int:
    dest, t, repo = _open(cfg)
    with t:
        created = repo.init()
        repo.check()
    logger.info("%s destination directory %s", "created" if created else "found", repo.directory)
    return EX_OK


def list_generations(cfg: Config, as_json: bool = False) -> int:
    dest, t, repo = _open(cfg)
    with t:
        listing = repo.listing(writable=False)
        stats = repo.read_stats()
        packages = pkgstate.count_packages(repo, listing.complete)
    rows = [
        {
            "name": name,
            "date": generations.parse(name).isoformat(sep=" "),
            "files": stats.get(name, {}).get("files"),
            "size": stats.get(name, {}).get("size"),
            "packages": packages.get(name),
            # committed with warnings: files or attributes rsync could not copy,
            # roots and directories the walk could not read (None: not recorded)
            "incomplete": stats.get(name, {}).get("incomplete"),
            "unreadable": stats.get(name, {}).get("unreadable"),
        }
        for name in listing.complete
    ]
    if as_json:
        json.dump({"destination": repo.directory, "generations": rows, "partial": list(listing.partial)},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EX_OK
    print(f"{'GENERATION':<20}  {'ENTRIES':>10}  {'SIZE':>10}  {'PACKAGES':>8}")
    for row in rows:
        files = f"{row['files']:,}" if row["files"] is not None else "?"
        size = human_size(row["size"]) if row["size"] is not None else "?"
        count = f"{row['packages']:,}" if row["packages"] is not None else "?"
        print(f"{row['name']:<20}  {files:>10}  {size:>10}  {count:>8}{_warnings(row)}".rstrip())
    for name in listing.partial:
        print(f"{name}  (interrupted; linked against by the next run, then removed)")
    return EX_OK


def _warnings(row: dict) -> str:
    """What a generation committed with warnings lacks, for the end of its line in the listing."""
    warnings = []
    if row["incomplete"]:
        warnings.append("files not copied")
    if row["unreadable"]:
        warnings.append(f"{row['unreadable']} roots or directories not read")
    return f"  (with warnings: {', '.join(warnings)})" if warnings else ""


def prune(cfg: Config, dry_run: bool = False) -> int:
    dest, t, repo = _open(cfg)
    with Lock(cfg.lock_file), t:
        listing = repo.listing()
        plan = generations.plan_retention(listing.complete, dest.generations, dest.keep)
        for name, reasons in plan.keep:
            logger.info("keeping %s (%s)", name, ", ".join(reasons))
        for name in plan.remove:
            logger.info("%s expired generation %s", "would remove" if dry_run else "removing", name)
            if dry_run:
                print(f"would remove {name}")
        if not dry_run:
            repo.remove(*plan.remove)
            repo.finish_removals(listing)
    return EX_OK


#!/usr/bin/env python3
"""Verification speed on this machine, measured side by side in one run.

    .venv/bin/python bench/verify_speed.py [--workers N] [--root DIR]

Prints, for every installed file with a recorded digest:

* ``dpkg --verify`` (dpkg systems), the reference;
* jwbackup's first verification (empty stat cache: every file hashed);
* jwbackup's second verification (everything from the cache);
* a bare ``lstat`` pass over the same files, the floor for the cached run.

The cache is written to a temporary directory, never to the system.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jwbackup import managers, verify  # noqa: E402


def timed(fn):
    started = time.monotonic()
    result = fn()
    return time.monotonic() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/")
    parser.add_argument("--workers", type=int, default=None, help="hashing processes (default: CPUs, at most 8)")
    parser.add_argument("--no-dpkg", action="store_true", help="skip the dpkg --verify reference")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the cached verification and the lstat pass")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    manager = managers.detect(args.root)
    seconds, manifest = timed(lambda: manager.manifest(args.root))
    digests = [p for p, e in manifest.items() if e.digest is not None]
    print(f"{manager.name} manifest: {len(manifest):,} paths, {len(digests):,} with a digest, loaded in {seconds:.2f} s")
    print(f"CPUs: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")

    rows = []
    if manager.name == "dpkg" and not args.no_dpkg and args.root == "/" and shutil.which("dpkg"):
        seconds, _ = timed(lambda: subprocess.run(["dpkg", "--verify"], stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL, check=False))
        rows.append(("dpkg --verify", seconds, ""))

    tmp = tempfile.mkdtemp(prefix="jwbackup-bench-")
    try:
        cache = os.fsencode(os.path.join(tmp, "verify"))
        prefix = os.fsencode(args.root).rstrip(b"/")
        cache_file = cache[len(prefix):] if prefix and cache.startswith(prefix + b"/") else cache
        if prefix and cache_file is cache:
            cache_file = None  # a cache outside the root cannot be named; measure without
        seconds, first = timed(lambda: verify.check(manifest, args.root, "all", cache_file=cache_file, workers=args.workers))
        s = first.stats
        rows.append(("jwbackup first run", seconds,
                     f"{s.hashed:,} files hashed, {s.bytes_hashed / 2**30:.2f} GiB, {s.modified} modified"))
        real = [prefix + p for p in digests]

        def lstat_all():
            for path in real:
                try:
                    os.lstat(path)
                except OSError:
                    pass

        # Alternated and repeated: the best of each, so that a busy machine skews both alike.
        cached, bare = [], []
        for _ in range(args.repeat):
            seconds, second = timed(lambda: verify.check(manifest, args.root, "all", cache_file=cache_file))
            cached.append(seconds)
            bare.append(timed(lstat_all)[0])
        s = second.stats
        rows.append(("jwbackup cached run", min(cached), f"{s.cache_hits:,} from the cache, {s.hashed} hashed "
                     f"(best of {args.repeat}, cache load and manifest scan included)"))
        rows.append(("bare lstat pass", min(bare), f"{len(real):,} files (best of {args.repeat})"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for name, seconds, note in rows:
        print(f"{name:<22} {seconds:8.2f} s   {note}")
    by_name = {name: seconds for name, seconds, _ in rows}
    if "dpkg --verify" in by_name:
        print(f"first run / dpkg --verify:   {by_name['jwbackup first run'] / by_name['dpkg --verify']:.2f}")
    print(f"cached run / lstat pass:     {by_name['jwbackup cached run'] / by_name['bare lstat pass']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

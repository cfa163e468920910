#!/usr/bin/env python3
"""Where an unchanged second run spends its time, step by step.

    .venv/bin/python bench/phases.py [--scale N] [--work DIR] [--cprofile]

Needs a system and a previous generation from ``run.py`` at the same scale
(``WORK/runs/N/jwbackup``).  Times, separately and in order: the manifest,
verification (stat cache warm), the selection walk alone (into a list), their
sum against a bare ``os.scandir`` walk of the same tree; the three again as
a backup runs them, the verification in a child process alongside the walk,
five times, each paired with a bare walk, and the least two CPUs could
take for the same work in the same pairs (the manifest, then the
verification and the walk each timed alone, shared evenly);
the floor of any stat cache (the bare walk plus one ``os.lstat`` per
installed file with a recorded digest: content edited in place changes
nothing else); rsync ``--files-from`` that list with ``--link-dest`` (what
jwbackup's rsync builder does, minus the overlap), and the linker on the same
list.  Each new generation goes to a scratch directory next to the real ones
and is removed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import contenders as c  # noqa: E402
import synth  # noqa: E402
from jwbackup import config, rsync, transfer  # noqa: E402
from jwbackup.generate import load_manifest, make_selector  # noqa: E402
from jwbackup.managers import record_algorithm  # noqa: E402


def cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def lstat_each(paths: list[bytes]) -> None:
    lstat = os.lstat
    for path in paths:
        try:
            lstat(path)
        except OSError:
            pass


def wall_time(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


class Steps:
    def __init__(self):
        self.rows = []

    def time(self, name, fn, *args):
        subprocess.run(["sync"])
        w0, c0 = time.perf_counter(), cpu()
        value = fn(*args)
        self.rows.append((name, time.perf_counter() - w0, cpu() - c0))
        print(f"  {name:<44} wall {self.rows[-1][1]:6.2f} s  cpu {self.rows[-1][2]:6.2f} s", flush=True)
        return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, default=200_000)
    p.add_argument("--work", default="/var/tmp/jwbackup-bench")
    p.add_argument("--cprofile", action="store_true", help="also print the linker's top functions")
    args = p.parse_args(argv)
    meta = synth.build(os.path.join(args.work, "systems", str(args.scale)), args.scale)
    root = meta["root"]
    jw = c.Jwbackup(root, os.path.join(args.work, "runs", str(args.scale)))
    gens = jw.generations() if os.path.isdir(jw.dest) else []
    if not gens:
        print(f"no generation in {jw.dest} yet: making the first one", flush=True)
        jw.wipe()
        jw.backup()
        gens = jw.generations()
    latest = os.path.join(jw.dest, gens[-1])
    cfg = config.load(jw.config())
    steps = Steps()
    print(f"unchanged run over {meta['entries']:,} entries, linking against {latest}")
    synth.warm(os.fsencode(root))  # a tree left cold since it was built would weigh on the first steps only
    manifest = steps.time("manifest (dpkg database)", load_manifest, cfg, root)
    prefix = os.fsencode(root)
    compared = [prefix + path for path, record in manifest.records() if record_algorithm(record)]
    selector = steps.time("verify (stat cache warm) + selector", make_selector, cfg, root, manifest)
    paths = steps.time("walk alone (select into a list)", lambda: list(selector.select(cfg.roots)))
    print(f"  {len(paths):,} paths selected of {meta['entries']:,} entries")
    overhead = sum(wall for _, wall, _ in steps.rows)
    bare = min(wall_time(synth.count_entries, os.fsencode(root)) for _ in range(3))
    print(f"  overhead (manifest + verification + walk) {overhead:.2f} s; a bare os.scandir walk of the root "
          f"(best of 3) {bare:.2f} s: {overhead / bare:.1f} x", flush=True)

    def alongside() -> int:
        manifest = load_manifest(cfg, root)
        selector = make_selector(cfg, root, manifest, alongside=True)
        try:
            return len(list(selector.select(cfg.roots)))
        finally:
            selector.close()

    def apart() -> tuple[float, float, float]:
        """The manifest, the verification and the walk, one after the other."""
        started = time.perf_counter()
        manifest = load_manifest(cfg, root)
        loaded = time.perf_counter()
        selector = make_selector(cfg, root, manifest)
        verified = time.perf_counter()
        list(selector.select(cfg.roots))
        return loaded - started, verified - loaded, time.perf_counter() - verified

    # As a backup runs them (the verification alongside the walk, on two
    # CPUs), in pairs with the bare walk: the machine's speed drifts more
    # within a minute than the difference being measured.  The same pairs
    # time the three steps apart, for the least two CPUs could take: the
    # manifest, then the walk and the verification shared evenly.
    ratios, floors = [], []
    for _ in range(5):
        walk = wall_time(synth.count_entries, os.fsencode(root))
        steps.time("manifest + verification alongside the walk", alongside)
        ratios.append(steps.rows[-1][1] / walk)
        manifest, verification, selection = apart()
        floors.append((manifest + (verification + selection) / 2) / walk)
    print(f"  overhead with the verification alongside / the bare walk, pair by pair: "
          f"{' '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f} x", flush=True)
    print(f"  two CPUs at best (manifest + (verification + walk) / 2, each timed alone) / the bare walk: "
          f"{' '.join(f'{r:.2f}' for r in floors)}; median {statistics.median(floors):.2f} x", flush=True)
    stats = min(wall_time(lstat_each, compared) for _ in range(3))
    print(f"  floor: the bare walk plus {len(compared):,} os.lstat calls (best of 3, {stats:.2f} s) = "
          f"{bare + stats:.2f} s: {(bare + stats) / bare:.1f} x the bare walk; the overhead is "
          f"{overhead / (bare + stats):.1f} x the floor", flush=True)

    scratch = os.path.join(jw.dest, "..", "scratch")

    def fresh() -> str:
        subprocess.run(["rm", "-rf", scratch], check=True)
        os.makedirs(scratch)
        return scratch

    argv = rsync.make_command(root, fresh(), [latest])
    result = steps.time("rsync --files-from (list ready) --link-dest", rsync.transfer, argv, iter(paths))
    print(f"  rsync: exit {result.returncode}, {result.stats.transferred} copied")
    target = fresh()
    if args.cprofile:
        prof = cProfile.Profile()
        result = steps.time("linker (list ready), under cProfile", prof.runcall, transfer.build, root, iter(paths), target, [latest])
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue())
    else:
        result = steps.time("linker (list ready)", transfer.build, root, iter(paths), target, [latest])
    print(f"  linker: exit {result.returncode}, {result.stats.transferred} copied")
    subprocess.run(["rm", "-rf", scratch], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

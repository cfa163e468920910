#!/usr/bin/env python3
"""Where jwbackup stands against the alternatives, in one command.

    .venv/bin/python bench/run.py [--scale N] [--quick] [--work DIR] [--pairs K]
    .venv/bin/python bench/run.py --sweep 50000,200000,1000000   # growth, and a plot

Builds (or reuses) a synthetic Debian system of N entries (``synth.py``), then
runs every scenario with jwbackup and each contender on the same data, in
rounds (jwbackup, contender 1, contender 2, ..., then again), and prints
medians and pair-by-pair ratios.  Raw figures go to ``WORK/results/*.json``.
Not part of the test suite.  Needs root (sshd), rsync, rsnapshot, borgbackup,
borgmatic (Debian packages).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import contenders as c  # noqa: E402
import report  # noqa: E402
import synth  # noqa: E402

DEFAULT_WORK = "/var/tmp/jwbackup-bench"
TESTS = os.path.join(c.PROJECT, "tests")

# scenario -> (what happens to the source before each round, contenders' kind)
SCENARIOS = {
    "first": "empty destinations: a full backup",
    "unchanged": "nothing changed since the last generation",
    "change-1%": "1% of the admin's files rewritten",
    "upgrade-5%": "packages holding 5% of the installed files upgraded (files and dpkg database)",
    "retention": "unchanged, and the oldest generation removed",
    "ssh-first": "full backup to 127.0.0.1 over ssh",
    "ssh-unchanged": "unchanged, over ssh",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, default=200_000, help="entries in the synthetic system (default 200000)")
    p.add_argument("--quick", action="store_true",
                   help="50k entries, jwbackup and rsync only (no borg, rsnapshot, excludes), one round")
    p.add_argument("--pairs", type=int, help="rounds of jwbackup vs rsync per scenario (default 3; 1 with --quick)")
    p.add_argument("--first-pairs", type=int, default=1, help="rounds of the full-backup scenarios (default 1)")
    p.add_argument("--work", default=DEFAULT_WORK, help=f"work directory (default {DEFAULT_WORK})")
    p.add_argument("--scenarios", help="comma-separated subset of: " + ",".join(SCENARIOS).replace("%", "%%"))
    p.add_argument("--no-borg", action="store_true", help="leave out borgmatic (slow)")
    p.add_argument("--tools", help="comma-separated tools (e.g. jwbackup,rsync); each takes part in every round")
    p.add_argument("--sweep", help="comma-separated scales: first+unchanged, jwbackup vs rsync, one pair, and a plot")
    args = p.parse_args(argv)
    if args.quick:
        args.scale = 50_000
        args.no_borg = True
        args.pairs = args.pairs or 1
    args.pairs = args.pairs or 3
    return args


def journal_less_ext4(path: str) -> bool:
    """Is ``path`` on ext4 without a journal?

    There, a new inode is allocated past every inode freed in the last minute
    (six, while its inode table block is not written back), checking them one at a
    time (fs/ext4/ialloc.c, ``recently_deleted``).  Right after a wipe of 200k
    files, creating files costs several times the system time it costs a
    moment later, whichever tool creates them: first-run figures then measure
    the wipe.
    """
    st = os.stat(path)
    try:
        device = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))
    except OSError:
        return False  # not on a block device
    if not os.path.isdir(f"/proc/fs/ext4/{device}"):
        return False
    journals = os.listdir("/proc/fs/jbd2") if os.path.isdir("/proc/fs/jbd2") else []
    return not any(journal.rpartition("-")[0] == device for journal in journals)  # named like vda-8


def warn_about(work: str) -> bool:
    if not journal_less_ext4(work):
        return False
    print(f"warning: {work} is on ext4 without a journal: creating files right after a wipe costs several "
          "times the system time it does later (see journal_less_ext4); first-run figures are not reliable. "
          "Give --work a journaled filesystem.", flush=True)
    return True


def machine() -> dict:
    rsync = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    borg = subprocess.run(["borg", "--version"], capture_output=True, text=True).stdout.strip()
    with open("/etc/debian_version") as f:
        debian = f.read().strip()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"cores": os.cpu_count(), "debian": debian, "kernel": platform.release(), "rsync": rsync,
            "borg": borg, "python": platform.python_version(), "load_at_start": load,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def start_sshd(work: str):
    sys.path.insert(0, TESTS)
    from sshd import SshServer, short_private_dir  # the test suite's real sshd on 127.0.0.1

    server = SshServer(short_private_dir("jwb-bench-")).start()
    ssh = c.Ssh(server.host, server.port, server.user, server.key, server.known_hosts, server.process.pid)
    return server, ssh


def mutate(scenario: str, system_dir: str) -> dict:
    if scenario == "change-1%":
        return {"changed_files": synth.change_unowned(system_dir, 0.01)}
    if scenario == "upgrade-5%":
        return {"replaced_files": synth.upgrade(system_dir, 0.05)}
    return {}


# Tools beyond jwbackup and plain rsync run one round, in these scenarios only,
# to keep a default run near 20 minutes; rsync with one exclude rule per
# installed file is so slow that one full backup says it all.
EXTRA_SCENARIOS = {"first", "unchanged"}
EXCLUDES_SCENARIOS = {"first"}


def rounds(args, scenario: str) -> int:
    return args.first_pairs if scenario.endswith("first") else args.pairs


def takes_part(tool, scenario: str, round_: int) -> bool:
    if tool.name in ("jwbackup", "rsync"):
        return True
    if round_ > 0:
        return False
    if isinstance(tool, c.RsyncExcludes):
        return scenario in EXCLUDES_SCENARIOS
    return scenario in EXTRA_SCENARIOS


def uses_jwbackup(tool) -> bool:
    return isinstance(tool, (c.Jwbackup, c.RsyncExcludes, c.BorgmaticExcludes))


def seed(tool) -> None:
    """A first backup, not measured, for a tool that has none to compare the next one with."""
    if os.path.isdir(tool.dest) and tool.generations():
        return
    print(f"  seeding {tool.name}: a first backup, not measured", flush=True)
    tool.wipe()
    tool.backup()


def run_scenarios(args, meta: dict, system_dir: str, scenarios: list[str], work: str) -> list[dict]:
    root = meta["root"]
    jw = c.Jwbackup(root, work)
    local = [jw, c.RsyncTree(root, work)]
    if not args.quick:
        local += [c.Jwbackup(root, work, transfer="rsync"), c.RsyncExcludes(root, work, jw), c.Rsnapshot(root, work)]
    if not args.no_borg:
        local += [c.Borgmatic(root, work), c.BorgmaticExcludes(root, work, jw)]
    server = ssh_pair = None
    if any(s.startswith("ssh") for s in scenarios):
        server, ssh = start_sshd(work)
        remote = os.path.join(work, "ssh")
        ssh_pair = [c.Jwbackup(root, remote, ssh), c.RsyncTree(root, remote, ssh)]
    rows = []
    try:
        for scenario in scenarios:
            tools = ssh_pair if scenario.startswith("ssh") else local
            for round_ in range(rounds(args, scenario)):
                named = args.tools.split(",") if args.tools else None
                taking = [t for t in tools if (t.name in named if named else takes_part(t, scenario, round_))]
                for tool in taking:
                    if scenario.endswith("first"):
                        tool.wipe()
                    else:
                        seed(tool)
                change = mutate(scenario, system_dir)
                # A B, then B A: what one run leaves behind (dirty pages to write
                # back, a warm or cold cache) does not always fall on the same tool.
                for tool in taking if round_ % 2 == 0 else taking[::-1]:
                    warmed = None
                    if scenario.endswith("first"):
                        if uses_jwbackup(tool):
                            jw.forget_digests()  # each pays for hashing every installed file once
                        warmed = synth.warm(os.fsencode(root))  # each starts with the tree in the page cache
                    subprocess.run(["sync"])
                    outcome = tool.backup(prune_one=scenario == "retention")
                    row = {"scenario": scenario, "round": round_, "tool": tool.name, **change, "warmed_s": warmed,
                           "run": outcome.run.as_dict(), "written": outcome.written,
                           "entries": outcome.entries, **outcome.extra}
                    rows.append(row)
                    print(report.progress_line(row), flush=True)
    finally:
        if server is not None:
            server.stop()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(os.path.join(args.work, "results"), exist_ok=True)
    started = time.time()
    info = machine()
    info["work_on_journal_less_ext4"] = warn_about(args.work)
    if args.sweep:
        return sweep(args, [int(s) for s in args.sweep.split(",")], info)
    system_dir = os.path.join(args.work, "systems", str(args.scale))
    meta = synth.build(system_dir, args.scale)
    print(f"system: {meta['entries']:,} entries, {meta['packages']} packages, "
          f"{meta['regular_files']:,} files, {meta['bytes'] / 2**20:.0f} MiB (built in {meta['seconds']} s)", flush=True)
    scenarios = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    rows = run_scenarios(args, meta, system_dir, scenarios, os.path.join(args.work, "runs", str(args.scale)))
    result = {"machine": info, "system": meta, "args": vars(args), "rows": rows,
              "seconds": round(time.time() - started, 1), "scenarios": {s: SCENARIOS[s] for s in scenarios}}
    name = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else f"-{args.scale}")
    path = os.path.join(args.work, "results", name + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    text = report.render(result)
    with open(path[:-5] + ".md", "w") as f:
        f.write(text)
    print("\n" + text)
    print(f"raw figures: {path}; whole run {result['seconds']:.0f} s")
    return 0


def sweep(args, scales: list[int], info: dict) -> int:
    """first + unchanged for jwbackup and rsync at each scale: how the cost grows."""
    args.pairs, args.no_borg = 1, True
    points = []
    for scale in scales:
        system_dir = os.path.join(args.work, "systems", str(scale))
        meta = synth.build(system_dir, scale)
        print(f"system {scale}: {meta['entries']:,} entries (built in {meta['seconds']} s)", flush=True)
        work = os.path.join(args.work, "runs", f"sweep-{scale}")
        root = meta["root"]
        tools = [c.Jwbackup(root, work), c.RsyncTree(root, work)]
        for tool in tools:
            tool.wipe()
        for scenario in ("first", "unchanged"):
            for tool in tools:
                if scenario == "first":
                    if uses_jwbackup(tool):
                        tools[0].forget_digests()
                    synth.warm(os.fsencode(root))  # jwbackup goes first: it must not meet a colder cache
                subprocess.run(["sync"])
                o = tool.backup()
                row = {"scale": scale, "entries_total": meta["entries"], "scenario": scenario, "tool": tool.name,
                       "run": o.run.as_dict(), "written": o.written, "entries": o.entries, **o.extra}
                points.append(row)
                print(report.progress_line(row), flush=True)
        for tool in tools:  # a 1M-entry system leaves several GB of generations behind
            subprocess.run(["rm", "-rf", "--one-file-system", tool.work], check=True)
    result = {"machine": info, "sweep": points}
    path = os.path.join(args.work, "results", time.strftime("%Y%m%d-%H%M%S") + "-sweep.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    text = report.render_sweep(result)
    png = os.path.join(os.path.dirname(path), "scaling.png")
    plotted, how = report.plot(path, png, args.work)
    with open(path[:-5] + ".md", "w") as f:
        f.write(text)
    print("\n" + text)
    print(f"raw figures: {path}; plot: {png + ' (drawn by ' + how + ')' if plotted else 'not drawn: ' + how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Running one command and measuring it: wall time, CPU, peak RSS, exit status.

CPU comes from ``os.wait4`` on the child: user+sys of the child and of every
descendant it waited for (rsync's generator and receiver, ssh, mv, rm).  Peak
RSS comes from ``/usr/bin/time -f %M``, which runs the command: a process
forked straight from this (large) Python would inherit its high-water mark,
and ``ru_maxrss`` would report the benchmark's own size.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime

import synth


@dataclass
class Run:
    wall: float = 0.0
    user: float = 0.0
    sys: float = 0.0
    maxrss_kib: int = 0
    status: int = 0
    commands: list = field(default_factory=list)

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    def add(self, other: "Run") -> "Run":
        return Run(
            self.wall + other.wall, self.user + other.user, self.sys + other.sys,
            max(self.maxrss_kib, other.maxrss_kib), self.status or other.status,
            self.commands + other.commands,
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "cpu": self.cpu}


TIME = "/usr/bin/time"  # GNU time (Debian package time)


class Failed(Exception):
    pass


def run(argv, *, env=None, log: str | None = None, ok=(0,), timeout: float | None = None) -> Run:
    """Run ``argv`` (output to ``log`` or discarded); raise Failed on an unexpected status."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    fd, rss_file = tempfile.mkstemp(prefix="bench-rss-")
    os.close(fd)
    try:
        started = time.perf_counter()
        proc = subprocess.Popen([TIME, "-q", "-f", "%M", "-o", rss_file] + [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
        deadline = None if timeout is None else started + timeout
        while True:
            pid, wstatus, usage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, wstatus, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(wstatus)
        with open(rss_file) as f:
            lines = f.read().split()
        maxrss = int(lines[-1]) if lines and lines[-1].isdigit() else 0
    finally:
        if log:
            out.close()
        os.unlink(rss_file)
    result = Run(wall, usage.ru_utime, usage.ru_stime, maxrss, proc.returncode,
                 [" ".join(map(str, argv))])
    if proc.returncode not in ok:
        tail = ""
        if log:
            with open(log, "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace")
        raise Failed(f"{argv[0]} exited {proc.returncode} after {wall:.1f} s: {' '.join(map(str, argv))}\n{tail}")
    return result


def new_bytes(previous: str | None, new: str) -> int:
    """Disk bytes the generation ``new`` added: du counts inodes shared with ``previous`` once."""
    argv = ["du", "-s", "-B1", "-x"] + ([previous] if previous else []) + [new]
    lines = subprocess.run(argv, capture_output=True, check=True).stdout.splitlines()
    return int(lines[-1].split()[0])


def du(path: str) -> int:
    return int(subprocess.run(["du", "-s", "-B1", path], capture_output=True, check=True).stdout.split()[0])


def count_entries(top: str) -> int:
    """Entries below ``top`` (not following symlinks)."""
    return synth.count_entries(os.fsencode(top))


def children_cpu(pid: int) -> float:
    """cutime+cstime of ``pid`` (seconds): CPU of the descendants it reaped, e.g. sshd's sessions."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


# -- jwbackup's log -----------------------------------------------------------

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \[\d+\] (\w+) ([\w.]+): (.*)")


_BUILDER = re.compile(r" with (\w+) \([^()]*\)$")


def phases(log: str, wrapper: dict) -> dict:
    """jwbackup's own split of one run, from its DEBUG log and the wrapper's timestamps.

    ``startup``: interpreter, imports, configuration; ``manifest`` and
    ``verify``: as jwbackup reports them (a verification alongside the walk is
    within ``walk+transfer``); ``prepare``: the rest before the
    transfer (package state, lock, destination checks); ``walk+transfer``: the
    selection walk streamed into rsync or the linker (they overlap), up to the
    next command jwbackup runs (the commit); ``commit``: rename, ``latest``,
    statistics; ``prune``: removing expired generations.
    """
    marks: dict[str, float] = {}
    reported: dict[str, float] = {}
    alongside = False
    with open(log, errors="replace") as f:
        for line in f:
            m = _LINE.match(line)
            if not m:
                continue
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            message = m.group(4)
            if "manifest:" in message and " paths in " in message and "manifest" not in reported:
                marks["manifest_end"] = when
                reported["manifest"] = float(message.rsplit(" in ", 1)[1].split()[0])
            elif message.startswith("verified ") and " s" in message and "verify" not in reported:
                reported["verify"] = float(message.split(" in ", 1)[1].split()[0])
                alongside = " alongside the walk" in message  # not before the transfer: within it
            elif message.startswith("backing up ") and "transfer_start" not in marks:
                marks["transfer_start"] = when
                builder = _BUILDER.search(message)
                marks["builder"] = builder.group(1) if builder else "rsync"
            elif "transfer_start" in marks and "transfer_end" not in marks and (
                message.startswith("rsync exited") if marks["builder"] in ("rsync", "remote")
                else message.startswith("run: ")  # the linker: the first command after it is the commit
            ):
                marks["transfer_end"] = when
            elif message.startswith("removing expired generation") and "prune_start" not in marks:
                marks["prune_start"] = when
            elif message.startswith("generation ") and " in " in message:
                marks["summary"] = when
    start, end = wrapper["start"], wrapper["end"]
    out: dict = {k: None for k in ("startup", "manifest", "verify", "prepare", "walk+transfer", "commit")}
    out.update(reported)
    out["prune"] = 0.0
    out["total"] = end - start
    if "manifest_end" in marks:
        out["startup"] = max(0.0, marks["manifest_end"] - reported["manifest"] - start)
    if "transfer_start" in marks and "manifest_end" in marks:
        before = 0.0 if alongside else reported.get("verify", 0.0)
        out["prepare"] = max(0.0, marks["transfer_start"] - marks["manifest_end"] - before)
    if "transfer_start" in marks and "transfer_end" in marks:
        out["walk+transfer"] = marks["transfer_end"] - marks["transfer_start"]
    finish = marks.get("summary", end)
    if "transfer_end" in marks:
        out["commit"] = marks.get("prune_start", finish) - marks["transfer_end"]
    if "prune_start" in marks:
        out["prune"] = finish - marks["prune_start"]
    out = {k: (round(v, 3) if v is not None else None) for k, v in out.items()}
    out["builder"] = marks.get("builder")
    return out

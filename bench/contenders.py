"""The tools compared, each behind the same three calls.

``wipe()`` empties the destination (not timed), ``backup(prune_one)`` makes
one generation (and, with ``prune_one``, removes the oldest as that tool's
retention would) and returns an ``Outcome``; ``generations()`` counts them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field

import measure

BENCH = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(BENCH)
VENV_PYTHON = os.path.join(PROJECT, ".venv", "bin", "python")
JWBACKUP = os.path.join(PROJECT, ".venv", "bin", "jwbackup")
RSYNC_FLAGS = ["-aHAX", "--numeric-ids", "--stats"]
BORG_ENV_BASE = {
    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    "BORG_CHECK_I_KNOW_WHAT_I_AM_DOING": "YES",
}
_JW_NAME = re.compile(r"^\d{4}-\d\d-\d\d-\d\d:\d\d:\d\d(\.\d+)?$")


@dataclass
class Outcome:
    run: measure.Run
    written: int | None  # bytes the new generation added at the destination
    entries: int | None  # entries in the new generation
    extra: dict = field(default_factory=dict)


@dataclass
class Ssh:
    host: str
    port: int
    user: str
    key: str
    known_hosts: str
    sshd_pid: int

    def command(self) -> str:
        return (f"ssh -p {self.port} -i {self.key} -o UserKnownHostsFile={self.known_hosts} "
                "-o StrictHostKeyChecking=yes -o BatchMode=yes")


class Contender:
    name = "?"

    def __init__(self, root: str, work: str, ssh: Ssh | None = None):
        self.root = root
        self.work = os.path.join(work, self.name)
        self.dest = os.path.join(self.work, "dest")
        self.logs = os.path.join(self.work, "logs")
        self.ssh = ssh
        self.runs = 0

    def log(self) -> str:
        os.makedirs(self.logs, exist_ok=True)
        self.runs += 1
        path = os.path.join(self.logs, f"run{self.runs:03d}.log")
        if os.path.exists(path):
            os.unlink(path)  # left by an earlier bench run: jwbackup would append to it
        return path

    def wipe(self) -> None:
        if os.path.exists(self.work):
            subprocess.run(["rm", "-rf", "--one-file-system", self.work], check=True)
        os.makedirs(self.dest, mode=0o700)

    def _remote_cpu(self) -> float:
        return measure.children_cpu(self.ssh.sshd_pid) if self.ssh else 0.0


# -- jwbackup -------------------------------------------------------------------


class Jwbackup(Contender):
    """The installed development version; ``transfer`` as in its configuration (auto: the
    local linker where it can, else rsync)."""

    name = "jwbackup"

    def __init__(self, root: str, work: str, ssh: Ssh | None = None, transfer: str = "auto"):
        if transfer != "auto":
            self.name = f"jwbackup-{transfer}"
        super().__init__(root, work, ssh)
        self.transfer = transfer

    def forget_digests(self) -> None:
        """Drop the verification cache under the root: the next run hashes every installed file, as a
        first backup on a machine does."""
        subprocess.run(["rm", "-rf", os.path.join(self.root, "var/lib/jwbackup/cache")], check=True)

    def config(self, generations: int = 10000) -> str:
        path = os.path.join(self.work, "jwbackup.yaml")
        remote = ""
        if self.ssh:
            s = self.ssh
            remote = (f"  host: {s.host}\n  port: {s.port}\n  user: {s.user}\n  key: {s.key}\n"
                      f"  known_hosts: {s.known_hosts}\n")
        with open(path, "w") as f:
            f.write(f"root: /\nlock_file: {self.work}/jwbackup.lock\ntransfer: {self.transfer}\n"
                    f"destination:\n  directory: {self.dest}\n  generations: {generations}\n{remote}")
        return path

    def generations(self) -> list[str]:
        return sorted(n for n in os.listdir(self.dest) if _JW_NAME.match(n))

    def backup(self, prune_one: bool = False) -> Outcome:
        before = self.generations()
        cfg = self.config(len(before) if prune_one else 10000)
        log = self.log()
        result = log[:-4] + ".json"
        remote0 = self._remote_cpu()
        run = measure.run([VENV_PYTHON, os.path.join(BENCH, "jwrun.py"), result, "--root", self.root,
                           "-c", cfg, "-l", log, "-L", "DEBUG"], ok=(0, 1))
        with open(result) as f:
            wrapper = json.load(f)
        after = self.generations()
        new = os.readlink(os.path.join(self.dest, "latest"))
        previous = [g for g in after if g < new]
        extra = {
            "phases": measure.phases(log, wrapper),
            "python_cpu": round(wrapper["python_user"] + wrapper["python_sys"], 3),
            "children_cpu": round(wrapper["children_user"] + wrapper["children_sys"], 3),
            "python_maxrss_kib": wrapper["python_maxrss_kib"],
            "removed": len(set(before) - set(after)),
            "log": log,
        }
        if self.ssh:
            extra["remote_cpu"] = round(self._remote_cpu() - remote0, 3)
        written = measure.new_bytes(os.path.join(self.dest, previous[-1]) if previous else None,
                                    os.path.join(self.dest, new))
        return Outcome(run, written, measure.count_entries(os.path.join(self.dest, new)), extra)

    def excludes(self, fmt: str, output: str, null: bool = False) -> measure.Run:
        cfg = self.config()
        return measure.run([JWBACKUP, "--root", self.root, "-c", cfg, "-l", "-", "-L", "WARNING",
                            "excludes", "--format", fmt, "-o", output] + (["-0"] if null else []),
                           log=self.log())


# -- plain rsync ----------------------------------------------------------------


class RsyncTree(Contender):
    """``rsync -aHAX --link-dest`` of the whole tree into a new directory."""

    name = "rsync"

    def generations(self) -> list[str]:
        return sorted(n for n in os.listdir(self.dest) if n.startswith("gen-"))

    def extra_args(self) -> tuple[list[str], measure.Run]:
        return [], measure.Run()

    def backup(self, prune_one: bool = False) -> Outcome:
        before = self.generations()
        new = f"gen-{len(before) and int(before[-1][4:]) + 1:05d}"
        args, pre = self.extra_args()
        argv = ["rsync", *RSYNC_FLAGS, *args]
        if before:
            argv.append(f"--link-dest={os.path.join(self.dest, before[-1])}")
        target = os.path.join(self.dest, new) + "/"
        if self.ssh:
            argv += ["-e", self.ssh.command()]
            target = f"{self.ssh.user}@{self.ssh.host}:{target}"
        remote0 = self._remote_cpu()
        run = pre.add(measure.run(argv + [self.root + "/", target], log=self.log(), ok=(0, 24)))
        if prune_one and before:
            run = run.add(measure.run(["rm", "-rf", "--one-file-system", os.path.join(self.dest, before[0])]))
        extra = {"removed": int(prune_one and bool(before))}
        if self.ssh:
            extra["remote_cpu"] = round(self._remote_cpu() - remote0, 3)
        written = measure.new_bytes(os.path.join(self.dest, before[-1]) if before else None,
                                    os.path.join(self.dest, new))
        return Outcome(run, written, measure.count_entries(os.path.join(self.dest, new)), extra)


class RsyncExcludes(RsyncTree):
    """The whole tree with one ``--exclude`` rule per installed file (``jwbackup excludes --format rsync``)."""

    name = "rsync-excludes"

    def __init__(self, root: str, work: str, jw: Jwbackup, ssh: Ssh | None = None):
        super().__init__(root, work, ssh)
        self.jw = jw

    def extra_args(self) -> tuple[list[str], measure.Run]:
        rules = os.path.join(self.work, "excludes.rsync")
        pre = self.jw.excludes("rsync", rules, null=True)
        return ["--from0", f"--exclude-from={rules}"], pre


# -- rsnapshot ------------------------------------------------------------------


class Rsnapshot(Contender):
    name = "rsnapshot"

    def config(self, retain: int) -> str:
        path = os.path.join(self.work, "rsnapshot.conf")
        lines = [
            ("config_version", "1.2"), ("snapshot_root", self.dest + "/"), ("no_create_root", "1"),
            ("cmd_rsync", "/usr/bin/rsync"), ("link_dest", "1"), ("retain", "daily", str(retain)),
            ("verbose", "1"), ("loglevel", "2"), ("lockfile", os.path.join(self.work, "rsnapshot.pid")),
            ("rsync_short_args", "-aHAX"),
            ("rsync_long_args", "--delete --numeric-ids --relative --delete-excluded"),
            ("backup", self.root + "/", "localhost/"),
        ]
        with open(path, "w") as f:
            f.write("".join("\t".join(fields) + "\n" for fields in lines))
        return path

    def generations(self) -> list[str]:
        return [n for n in os.listdir(self.dest) if n.startswith("daily.")]

    def backup(self, prune_one: bool = False) -> Outcome:
        before = len(self.generations())
        cfg = self.config(max(before, 1) if prune_one else 10000)
        run = measure.run(["rsnapshot", "-c", cfg, "daily"], log=self.log())
        new = os.path.join(self.dest, "daily.0")
        previous = os.path.join(self.dest, "daily.1")
        written = measure.new_bytes(previous if os.path.exists(previous) else None, new)
        return Outcome(run, written, measure.count_entries(new),
                       {"removed": before + 1 - len(self.generations())})


# -- borg through borgmatic --------------------------------------------------------


class Borgmatic(Contender):
    """Debian's borgmatic 1.7 driving borg 1.2, whole tree (lz4, no encryption)."""

    name = "borgmatic"
    borgmatic = "/usr/bin/borgmatic"

    @property
    def repo(self) -> str:
        return os.path.join(self.dest, "repo")

    @property
    def env(self) -> dict:
        return {**BORG_ENV_BASE, "BORG_BASE_DIR": os.path.join(self.work, "borg-home"),
                "HOME": os.path.join(self.work, "borg-home")}

    def exclude_lines(self) -> str:
        return ""

    def config(self, keep: int = 10000) -> str:
        path = os.path.join(self.work, "borgmatic.yaml")
        with open(path, "w") as f:
            f.write(f"location:\n  source_directories:\n    - {self.root}\n  repositories:\n    - {self.repo}\n"
                    f"  one_file_system: true\n{self.exclude_lines()}"
                    f"storage:\n  compression: lz4\n"
                    f"retention:\n  keep_secondly: {keep}\n")
        return path

    def wipe(self) -> None:
        super().wipe()
        os.makedirs(self.env["HOME"])
        if self.exclude_lines():
            open(self.rules, "wb").close()
        measure.run([self.borgmatic, "-c", self.config(), "init", "--encryption", "none"],
                    env=self.env, log=self.log())

    def archives(self) -> list[dict]:
        out = subprocess.run(["borg", "list", "--json", self.repo], env={**os.environ, **self.env},
                             capture_output=True, check=True).stdout
        return json.loads(out)["archives"]

    def generations(self) -> list[str]:
        return [a["name"] for a in self.archives()]

    def pre(self) -> measure.Run:
        return measure.Run()

    def backup(self, prune_one: bool = False) -> Outcome:
        before = len(self.archives())
        size0 = measure.du(self.repo)
        run = self.pre().add(measure.run([self.borgmatic, "-c", self.config(), "create"],
                                         env=self.env, log=self.log()))
        if prune_one:
            run = run.add(measure.run([self.borgmatic, "-c", self.config(before), "prune", "compact"],
                                      env=self.env, log=self.log()))
        info = subprocess.run(["borg", "info", "--json", "--last", "1", self.repo],
                              env={**os.environ, **self.env}, capture_output=True, check=True).stdout
        nfiles = json.loads(info)["archives"][0]["stats"]["nfiles"]
        return Outcome(run, measure.du(self.repo) - size0, nfiles,
                       {"removed": before + 1 - len(self.archives())})


class BorgmaticExcludes(Borgmatic):
    """The same with jwbackup's borg exclude file (``pf:`` rules) refreshed before each run."""

    name = "borgmatic-excludes"

    def __init__(self, root: str, work: str, jw: Jwbackup):
        super().__init__(root, work)
        self.jw = jw

    @property
    def rules(self) -> str:
        return os.path.join(self.work, "excludes.borg")

    def exclude_lines(self) -> str:
        return f"  exclude_from:\n    - {self.rules}\n"

    def pre(self) -> measure.Run:
        return self.jw.excludes("borg", self.rules)

"""Helpers for the fault-injection tests: snapshots of every complete
generation, one-line error checks, and seams made of stand-in programs.

A *seam* is a directory put first on ``PATH`` holding small shell scripts
named like the programs jwbackup runs (``rsync``, ``mv``, ``rm``, ``ln``).
Each script does something at an exact moment of the run (kill jwbackup,
wait for the test, change the source tree) and then runs the real program,
so a fault lands at the same point every time, without sleeping and hoping.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from backupenv import System, tree_state


from jwbackup import generations

# Seams that stand in for rsync need the rsync builder (a local destination
# would otherwise get the built-in linker).
RSYNC = "transfer: rsync\n"
JWBACKUP = Path(sys.executable).with_name("jwbackup")
REAL = {name: shutil.which(name) for name in ("rsync", "mv", "rm", "ln", "cat", "sh")}


def complete_generations(dest) -> list[str]:
    """Complete generations at ``dest`` (real directories only), oldest first."""
    return sorted(
        e.name for e in os.scandir(dest)
        if e.is_dir(follow_symlinks=False) and generations.parse(e.name) is not None
    )


def snapshot(dest) -> dict[str, dict]:
    """Content, mode, owner, mtime and inode of everything in every complete generation."""
    return {name: tree_state(Path(dest) / name) for name in complete_generations(dest)}


def assert_untouched(before: dict[str, dict], dest) -> None:
    """Every generation in ``before`` is still there, byte for byte and inode for inode."""
    after = snapshot(dest)
    for name, state in before.items():
        assert name in after, f"generation {name} disappeared"
        assert after[name] == state, f"generation {name} changed"


def one_error_line(result) -> str:
    """The single ``jwbackup: error: ...`` line of a failed run."""
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    assert result.returncode != 0, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("jwbackup: error: "), lines
    return lines[0]


def backup(jwbackup, system: System, *args, ok: bool = True, env=None):
    result = jwbackup("-c", system.config, "--root", system.root_dir, *args, env=env)
    if ok:
        assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


class Seam:
    """Stand-in programs first on PATH; ``env`` is what a run needs to use them."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    # $JWBACKUP_PID: the jwbackup process above this one (it may run the
    # stand-in directly or through "sh -c").
    FIND_JWBACKUP = (
        'JWBACKUP_PID=$PPID\n'
        'while [ "$JWBACKUP_PID" -gt 1 ] && [ "$(cat /proc/$JWBACKUP_PID/comm 2>/dev/null)" != jwbackup ]; do\n'
        '    JWBACKUP_PID=$(cut -d" " -f4 /proc/$JWBACKUP_PID/stat)\n'
        'done\n'
    )

    def program(self, name: str, script: str) -> None:
        """``name`` runs ``script`` (sh); ``$REAL`` is the real program, ``$JWBACKUP_PID`` the run."""
        path = self.dir / name
        path.write_text(f"#!{REAL['sh']}\nREAL={REAL[name]}\n{self.FIND_JWBACKUP}{script}\n")
        path.chmod(0o755)

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.dir}:{os.environ['PATH']}"}


def start(system: System, log, *args, env=None) -> subprocess.Popen:
    """A backup run in the background (``jwbackup -c ... --root ...``)."""
    return subprocess.Popen(
        [JWBACKUP, "-l", str(log), "-c", system.config, "--root", system.root_dir, *map(os.fsdecode, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
    )


def processes_with(marker: bytes) -> list[int]:
    """Pids of processes whose command line mentions ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def kill_all(pids, sig=signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def big_file(path: bytes, size: int) -> None:
    """A file of ``size`` bytes that rsync has to read and write in full."""
    with open(path, "wb") as f:
        chunk = b"\1" * (8 << 20)
        for _ in range(size // len(chunk)):
            f.write(chunk)


def writing_big_file(system: System) -> bool:
    """Is a run writing ``/srv/zz-big`` (rsync's temporary name) into its ``.partial``?"""
    partials = system.partials()
    srv = system.dest / partials[0] / "srv" if partials else None
    return srv is not None and srv.is_dir() and any(n.startswith(".zz-big.") for n in os.listdir(srv))


def start_during_a_big_transfer(jwbackup, system: System, log, size: int, timeout: float):
    """A first generation, then a run with a big new file to copy, returned while it copies that
    file: ``(first generation, snapshot of the generations, the running process)``."""
    backup(jwbackup, system)
    (first,) = complete_generations(system.dest)
    before = snapshot(system.dest)
    system.write(b"/srv/small", b"x")
    big_file(system.path(b"/srv/zz-big"), size)
    proc = start(system, log)
    try:
        wait_for(lambda: writing_big_file(system), timeout, "the transfer of the big file")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return first, before, proc

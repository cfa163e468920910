"""Crashes: jwbackup or rsync killed at each step of a run, and what power loss leaves.

Each test takes a snapshot of the complete generations first, injects the
crash at an exact seam, checks that nothing complete changed and that no new
generation became visible, then runs a normal backup that must succeed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest

from backupenv import System
from faultkit import (
    RSYNC, Seam, assert_untouched, backup, big_file, complete_generations, kill_all, one_error_line, processes_with,
    snapshot, start, wait_for, writing_big_file,
)


@pytest.fixture
def system(tmp_path):
    system = System(tmp_path)
    system.configure(extra=RSYNC)
    return system


def _first_generation(jwbackup, system):
    backup(jwbackup, system)
    (first,) = complete_generations(system.dest)
    return first, snapshot(system.dest)


def _after_the_crash(jwbackup, system, first, before):
    """No new generation is visible, ``latest`` is unchanged, the next run succeeds."""
    assert complete_generations(system.dest) == [first]
    assert os.readlink(system.dest / "latest") == first
    assert_untouched(before, system.dest)
    wait_for(lambda: not processes_with(os.fsencode(system.dest)), 30, "the killed run's processes to end")
    backup(jwbackup, system)
    gens = complete_generations(system.dest)
    assert len(gens) == 2 and gens[0] == first
    assert os.readlink(system.dest / "latest") == gens[1]
    assert system.partials() == []
    assert_untouched(before, system.dest)
    with open(system.in_generation(gens[1], b"/home/alice/notes.txt"), "rb") as f:
        assert f.read() == b"remember the milk\n"
    return gens[1]


def _many_files(system, count=3000):
    """A selection much larger than a pipe buffer, so the walk cannot finish alone."""
    for i in range(count):
        system.write(b"/srv/many/%04d-%s" % (i, b"x" * 120), b"%d\n" % i)


def test_jwbackup_killed_during_the_walk(jwbackup, system, tmp_path):
    first, before = _first_generation(jwbackup, system)
    _many_files(system)
    seam = Seam(tmp_path / "seam")
    # rsync has read one byte of the selection; the walk is blocked on a full pipe
    seam.program("rsync", 'head -c 1 >/dev/null; kill -KILL $JWBACKUP_PID; exit 1')
    result = backup(jwbackup, system, ok=False, env=seam.env)
    assert result.returncode == -signal.SIGKILL
    new = _after_the_crash(jwbackup, system, first, before)
    assert len(os.listdir(system.dest / new / "srv" / "many")) == 3000


@pytest.mark.parametrize("moment", ["early", "late"])
def test_jwbackup_killed_during_the_transfer_takes_rsync_with_it(jwbackup, system, tmp_path, moment):
    first, before = _first_generation(jwbackup, system)
    _many_files(system, 200)
    big_file(system.path(b"/srv/zz-big"), 256 << 20)
    proc = start(system, tmp_path / "run.log")
    marker = os.fsencode(system.dest)

    def reached():
        return system.partials() if moment == "early" else writing_big_file(system)

    wait_for(reached, 60, f"the {moment} transfer")
    rsyncs = [p for p in processes_with(marker) if p != proc.pid]
    kill_all(rsyncs, signal.SIGSTOP)  # freeze the transfer where it is
    proc.kill()
    proc.wait()
    kill_all(rsyncs, signal.SIGCONT)
    # the transfer stops with jwbackup: no orphan rsync keeps writing
    wait_for(lambda: not processes_with(marker), 10, "rsync to end with jwbackup")
    (partial,) = system.partials()
    assert not os.path.exists(system.dest / partial / "srv" / "zz-big")
    _after_the_crash(jwbackup, system, first, before)


@pytest.mark.parametrize("sig, status, message", [
    ("TERM", 143, "terminated (SIGTERM)"),
    ("INT", 130, "interrupted"),
])
def test_jwbackup_stopped_by_a_signal_runs_the_on_error_hooks_and_stops_rsync(
        jwbackup, system, tmp_path, sig, status, message):
    """systemctl stop and shutdown send SIGTERM: the on_error hooks still run
    (they may unmount the backup disk), as on Ctrl-C."""
    first, before = _first_generation(jwbackup, system)
    system.configure(extra=RSYNC + 'hooks:\n  on_error: ["env > $OUT"]\n')
    _many_files(system, 200)
    seam = Seam(tmp_path / "seam")
    seam.program("rsync", f'sleep 0.5; kill -{sig} $JWBACKUP_PID; exec "$REAL" "$@"')
    # A job started in the background (nohup ... &) inherits SIGINT ignored, and so would jwbackup.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = backup(jwbackup, system, ok=False, env={**seam.env, "OUT": str(tmp_path / "env")})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.returncode == status
    assert one_error_line(result) == f"jwbackup: error: {message}"
    seen = (tmp_path / "env").read_text().splitlines()
    assert "JWBACKUP_STATUS=failed" in seen
    assert f"JWBACKUP_ERROR={message}" + (" (SIGINT)" if sig == "INT" else "") in seen
    _after_the_crash(jwbackup, system, first, before)


def test_rsync_killed_early_keeps_the_partial_for_the_next_run(jwbackup, system, tmp_path):
    first, before = _first_generation(jwbackup, system)
    _many_files(system, 200)
    seam = Seam(tmp_path / "seam")
    # rsync starts, then dies by SIGKILL before it has written anything
    seam.program("rsync", '"$REAL" "$@" & kill -KILL $!; wait $!; exit $?')
    result = backup(jwbackup, system, ok=False, env=seam.env)
    assert result.returncode == 74
    line = result.stderr.decode().strip()
    assert "\n" not in line and "earlier generations are untouched" in line, line
    _after_the_crash(jwbackup, system, first, before)


def test_jwbackup_killed_between_the_transfer_and_the_rename(jwbackup, system, tmp_path):
    first, before = _first_generation(jwbackup, system)
    system.write(b"/home/alice/new.txt", b"new\n")
    seam = Seam(tmp_path / "seam")
    seam.program("mv", 'case "$*" in *.partial*) kill -KILL $JWBACKUP_PID; exit 1;; esac\nexec "$REAL" "$@"')
    result = backup(jwbackup, system, ok=False, env=seam.env)
    assert result.returncode == -signal.SIGKILL
    (partial,) = system.partials()
    copied = os.lstat(system.dest / partial / "home/alice/new.txt").st_ino
    new = _after_the_crash(jwbackup, system, first, before)
    # what the interrupted run copied is linked, not copied again
    assert os.lstat(system.dest / new / "home/alice/new.txt").st_ino == copied


def test_jwbackup_killed_between_the_rename_and_latest(jwbackup, system, tmp_path):
    first, before = _first_generation(jwbackup, system)
    seam = Seam(tmp_path / "seam")
    seam.program("ln", 'kill -KILL $JWBACKUP_PID; exit 1')
    result = backup(jwbackup, system, ok=False, env=seam.env)
    assert result.returncode == -signal.SIGKILL
    gens = complete_generations(system.dest)
    assert len(gens) == 2 and gens[0] == first  # complete, only latest is behind
    assert os.readlink(system.dest / "latest") == first
    assert_untouched(before, system.dest)
    backup(jwbackup, system)
    assert len(complete_generations(system.dest)) == 3
    assert os.readlink(system.dest / "latest") == complete_generations(system.dest)[-1]
    assert_untouched(before, system.dest)


def _expired(system, first, names):
    """Old generations sharing every file with ``first``, as daily runs would leave them."""
    for name in names:
        subprocess.run(["cp", "-al", system.dest / first, system.dest / name], check=True)


def test_jwbackup_killed_during_retention(jwbackup, system, tmp_path):
    system.configure(destination="  generations: 2\n", extra=RSYNC)
    first, _ = _first_generation(jwbackup, system)
    old = [f"2001-01-{day:02d}-03:00:00" for day in range(1, 7)]
    _expired(system, first, old)
    seam = Seam(tmp_path / "seam")
    # the first removal has deleted part of the tree when jwbackup dies
    seam.program("rm", 'case "$*" in *.deleting-*) for a; do case "$a" in *.deleting-*) '
                 '"$REAL" -rf "$a/etc";; esac; done; kill -KILL $JWBACKUP_PID; exit 1;; esac\nexec "$REAL" "$@"')
    result = backup(jwbackup, system, ok=False, env=seam.env)
    assert result.returncode == -signal.SIGKILL
    gens = complete_generations(system.dest)
    newest = gens[-1]
    assert os.readlink(system.dest / "latest") == newest
    # every expired generation is renamed out of the namespace before any is deleted
    leftovers = [n for n in os.listdir(system.dest) if n.startswith(".deleting-")]
    assert sorted(leftovers) == [".deleting-" + name for name in old]
    before = snapshot(system.dest)
    listed = jwbackup("-c", system.config, "list", "--json")
    shown = [g["name"] for g in json.loads(listed.stdout)["generations"]]
    assert not any(name.startswith(".deleting-") for name in shown)
    assert not set(old) & set(shown)
    backup(jwbackup, system)
    assert [n for n in os.listdir(system.dest) if n.startswith(".deleting-")] == []
    gens = complete_generations(system.dest)
    assert len(gens) == 2 and gens[0] in (first, newest)
    for name in (first, newest):
        if name in gens:
            assert snapshot(system.dest)[name] == before[name]


def test_leftovers_of_a_power_loss_are_finished_by_the_next_run(jwbackup, system):
    first, before = _first_generation(jwbackup, system)
    # an interrupted transfer, a half-removed generation, a half-made latest
    shutil.copytree(system.dest / first, system.dest / "2001-01-01-00:00:00.partial", symlinks=True)
    shutil.copytree(system.dest / first, system.dest / ".deleting-2000-01-01-00:00:00", symlinks=True)
    os.symlink(first, system.dest / ".latest.new")
    # the prefix alone is no sign of a removal: this one is the admin's
    (system.dest / ".deleting-notes").mkdir()
    (system.dest / ".deleting-notes" / "keep").write_text("mine\n")
    new = _after_the_crash(jwbackup, system, first, before)
    assert sorted(os.listdir(system.dest)) == sorted([first, new, "latest", ".stats", ".deleting-notes"])
    assert (system.dest / ".deleting-notes" / "keep").read_text() == "mine\n"


def test_dangling_latest_is_replaced(jwbackup, system):
    first, before = _first_generation(jwbackup, system)
    os.unlink(system.dest / "latest")
    os.symlink("2000-01-01-00:00:00", system.dest / "latest")
    backup(jwbackup, system)
    gens = complete_generations(system.dest)
    assert os.readlink(system.dest / "latest") == gens[-1] != first
    assert_untouched(before, system.dest)

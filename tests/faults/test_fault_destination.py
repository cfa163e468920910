"""Destination faults: full, read-only, missing, a file, hostile entries, a
generation removed under a running backup."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from backupenv import System
from faultkit import RSYNC, Seam, assert_untouched, backup, complete_generations, one_error_line, snapshot


@pytest.fixture
def system(tmp_path):
    return System(tmp_path)


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


def test_full_disk_on_the_first_run_fails_cleanly_and_the_next_run_succeeds(jwbackup, system, tmpfs):
    system.configure(directory=str(tmpfs))
    big = system.write(b"/home/alice/big", os.urandom(2 << 20))
    result = backup(jwbackup, system, ok=False)
    line = one_error_line(result)
    assert result.returncode in (74, 2) and "No space left on device" in line, line
    assert complete_generations(tmpfs) == [] and not os.path.lexists(tmpfs / "latest")
    os.unlink(big)
    backup(jwbackup, system)
    assert len(complete_generations(tmpfs)) == 1


def test_read_only_destination_is_one_line_and_changes_nothing(jwbackup, system, tmpfs):
    system.configure(directory=str(tmpfs))
    backup(jwbackup, system)
    before = snapshot(tmpfs)
    subprocess.run(["mount", "-o", "remount,ro", tmpfs], check=True)
    try:
        result = backup(jwbackup, system, ok=False)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", tmpfs], check=True)
    line = one_error_line(result)
    assert result.returncode == 75 and "not writable" in line, line
    assert_untouched(before, tmpfs)
    backup(jwbackup, system)
    assert len(complete_generations(tmpfs)) == 2


def test_destination_that_is_a_file_is_one_line_and_the_file_is_untouched(jwbackup, system, tmp_path):
    target = tmp_path / "a-file"
    target.write_bytes(b"not a directory\n")
    system.configure(directory=str(target))
    result = backup(jwbackup, system, ok=False)
    assert result.returncode == 75 and "not a directory" in one_error_line(result)
    assert target.read_bytes() == b"not a directory\n"


def test_generation_named_symlink_to_root_is_never_used_listed_or_pruned(jwbackup, system):
    system.configure(destination="  generations: 1\n", extra="")
    names = ["2000-01-01-00:00:00", "2099-12-31-23:59:59", "2001-01-01-00:00:00.partial",
             ".deleting-2002-01-01-00:00:00"]
    for name in names:
        os.symlink("/", system.dest / name)
    watched = ["/", "/etc", "/usr", "/var"]
    mtimes = {p: os.lstat(p).st_mtime_ns for p in watched}
    log = system.tmp / "debug.log"
    for _ in range(2):
        result = jwbackup("-c", system.config, "--root", system.root_dir, "-L", "DEBUG", log_file=log)
        assert result.returncode == 0, result.stderr
    for name in names[:3]:
        assert os.readlink(system.dest / name) == "/"
    assert not os.path.lexists(system.dest / names[3])  # the symlink itself, not what it points to
    assert {p: os.lstat(p).st_mtime_ns for p in watched} == mtimes
    text = log.read_text(errors="replace")
    for name in names:
        assert f"--link-dest={system.dest}/{name}" not in text
    listed = json.loads(jwbackup("-c", system.config, "list", "--json").stdout)
    assert [g["name"] for g in listed["generations"]] == complete_generations(system.dest)[::-1]
    assert listed["partial"] == []
    assert len(complete_generations(system.dest)) == 1


def test_latest_generation_deleted_by_another_process_during_the_run(jwbackup, system, tmp_path):
    system.configure(extra=RSYNC)
    backup(jwbackup, system)
    backup(jwbackup, system)
    first, second = complete_generations(system.dest)
    before = snapshot(system.dest)
    del before[second]
    seam = Seam(tmp_path / "seam")
    seam.program("rsync", f'"{os.path.realpath("/bin/rm")}" -rf "{system.dest / second}"\nexec "$REAL" "$@"')
    result = backup(jwbackup, system, ok=False, env=seam.env)
    assert result.returncode in (0, 1), result.stderr
    assert_untouched(before, system.dest)
    gens = complete_generations(system.dest)
    assert first in gens and second not in gens and len(gens) == 2
    assert os.readlink(system.dest / "latest") == gens[-1]
    backup(jwbackup, system)
    assert_untouched(before, system.dest)

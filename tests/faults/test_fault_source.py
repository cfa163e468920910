"""Source faults: a live system changes while it is being backed up."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from backupenv import System
from faultkit import RSYNC, Seam, backup, complete_generations


@pytest.fixture
def system(tmp_path):
    return System(tmp_path)


def _listing_then(seam: Seam, action: str) -> None:
    """rsync reads the whole selection first (the walk is over), then ``action`` runs, then the transfer."""
    seam.program("rsync", f'list="$(mktemp)"\n"$REAL_CAT" > "$list"\n{action}\nexec "$REAL" "$@" < "$list"')


def test_files_vanishing_and_appearing_after_the_walk_are_a_success(jwbackup, system, tmp_path):
    system.configure(extra=RSYNC)
    for i in range(5):
        system.write(b"/srv/live/f%d" % i, b"%d\n" % i)
    seam = Seam(tmp_path / "seam")
    live = os.fsdecode(system.path(b"/srv/live"))
    _listing_then(seam, f'rm -f "{live}/f1" "{live}/f3"; echo new > "{live}/appeared"')
    seam_env = {**seam.env, "REAL_CAT": shutil.which("cat")}
    result = backup(jwbackup, system, ok=False, env=seam_env)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    (gen,) = complete_generations(system.dest)
    kept = sorted(os.listdir(system.dest / gen / "srv" / "live"))
    assert kept == ["f0", "f2", "f4"]


def test_growing_file_is_committed_with_a_prefix_of_its_content(jwbackup, system):
    system.configure(extra=RSYNC)
    path = system.write(b"/var/log/growing.log", b"")
    stop = threading.Event()
    written = []

    def grow():
        with open(path, "ab", buffering=0) as f:
            n = 0
            while not stop.is_set():
                line = b"line %08d\n" % n
                f.write(line)
                written.append(line)
                n += 1
                stop.wait(0.0005)

    writer = threading.Thread(target=grow)
    writer.start()
    try:
        result = backup(jwbackup, system, ok=False)
    finally:
        stop.set()
        writer.join()
    assert result.returncode in (0, 1), result.stderr
    (gen,) = complete_generations(system.dest)
    copy = (system.dest / gen / "var/log/growing.log").read_bytes()
    assert b"".join(written).startswith(copy)
    backup(jwbackup, system)


def _swap_docs_for_a_symlink(system, tmp_path):
    system.write(b"/home/alice/docs/a.txt", b"alice's\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.txt").write_bytes(b"SECRET outside the root\n")
    docs = os.fsdecode(system.path(b"/home/alice/docs"))
    seam = Seam(tmp_path / "seam")
    _listing_then(seam, f'mv "{docs}" "{docs}.old" && ln -s "{outside}" "{docs}"')
    return outside, {**seam.env, "REAL_CAT": shutil.which("cat")}


def test_directory_swapped_for_a_symlink_after_the_walk_writes_nothing_outside(jwbackup, system, tmp_path):
    """A user replaces a directory of theirs by a symlink to a place outside the
    root while the backup runs: the transfer writes nothing there, and the next
    run backs up the symlink as a symlink."""
    system.configure(extra=RSYNC)
    outside, env = _swap_docs_for_a_symlink(system, tmp_path)
    result = backup(jwbackup, system, ok=False, env=env)
    assert result.returncode in (0, 1), result.stderr
    assert sorted(os.listdir(outside)) == ["a.txt"]
    assert (outside / "a.txt").read_bytes() == b"SECRET outside the root\n"
    backup(jwbackup, system)
    newest = complete_generations(system.dest)[-1]
    assert os.readlink(system.dest / newest / "home/alice/docs") == os.fsencode(outside).decode()


@pytest.mark.parametrize("over", ["local", "ssh"])
def test_directory_swapped_for_a_symlink_after_the_walk_brings_nothing_from_outside(
        jwbackup, system, tmp_path, over, request):
    """rsync reads through a nosymfollow view of the source (jwbackup.confine): the
    swapped path fails and is reported; nothing from outside enters a generation."""
    if over == "ssh":
        sshd = request.getfixturevalue("sshd")
        system.configure(destination=f"  host: 127.0.0.1\n  port: {sshd.port}\n  user: {sshd.user}\n"
                                     f"  key: {sshd.key}\n  known_hosts: {sshd.known_hosts}\n")
    else:
        system.configure(extra=RSYNC)
    outside, env = _swap_docs_for_a_symlink(system, tmp_path)
    result = backup(jwbackup, system, ok=False, env=env)
    assert result.returncode == 1, result.stderr
    assert b"Too many levels of symbolic links" in result.stderr
    for top in complete_generations(system.dest) + system.partials():
        for dirpath, dirnames, filenames in os.walk(system.dest / top):
            for name in filenames:
                path = Path(dirpath) / name
                assert path.is_symlink() or b"SECRET" not in path.read_bytes(), path

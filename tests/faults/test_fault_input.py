"""Hostile input: file names, configuration values that look like shell, bad
configuration files through the CLI, secrets, locks and concurrent runs."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from backupenv import System
from faultkit import JWBACKUP, RSYNC, Seam, backup, complete_generations, one_error_line, processes_with, start, wait_for


@pytest.fixture
def system(tmp_path):
    return System(tmp_path)


NAMES = [b"new\nline", b"tab\there", b"back\\slash", b"*?[", b"-leading", b"--rsync-option=x", b"co:lon",
         b"\xff\xfe-not-utf8", b"n" * 255]


@pytest.mark.parametrize("builder", ["", RSYNC])
def test_hostile_names_and_deep_paths_are_backed_up_and_linked(jwbackup, system, builder):
    system.configure(extra=builder)
    for name in NAMES:
        system.write(b"/home/alice/" + name, name)
    deep = b"/srv/" + b"/".join([b"d" * 200] * 19) + b"/leaf"  # a path of ~3.8 KiB
    system.write(deep, b"deep\n")
    backup(jwbackup, system)
    backup(jwbackup, system)
    first, second = complete_generations(system.dest)
    for path in [b"/home/alice/" + n for n in NAMES] + [deep]:
        copies = [system.in_generation(g, path) for g in (first, second)]
        with open(copies[1], "rb") as f:
            assert f.read() == (b"deep\n" if path == deep else path.rsplit(b"/", 1)[1])
        assert os.lstat(copies[0]).st_ino == os.lstat(copies[1]).st_ino


def test_fifo_named_cachedir_tag_does_not_hang_the_walk(jwbackup, system):
    os.makedirs(system.path(b"/home/alice/trap"))
    os.mkfifo(system.path(b"/home/alice/trap/CACHEDIR.TAG"))
    system.write(b"/home/alice/trap/kept", b"kept\n")
    system.configure()
    result = jwbackup("-c", system.config, "--root", system.root_dir, timeout=60)
    assert result.returncode == 0, result.stderr
    (gen,) = complete_generations(system.dest)
    assert os.path.isfile(system.in_generation(gen, b"/home/alice/trap/kept"))


def test_shell_in_the_destination_directory_runs_nothing(jwbackup, system, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weird = tmp_path / "d ;touch pwned; $(touch pwned) `touch pwned` 'q' \"dq\""
    weird.mkdir(mode=0o700)
    system.configure(directory=f"'{str(weird).replace(chr(39), chr(39) * 2)}'", extra=RSYNC)
    backup(jwbackup, system)
    assert len(complete_generations(weird)) == 1
    assert not (tmp_path / "pwned").exists() and not (weird / "pwned").exists()


@pytest.mark.parametrize("key, value", [
    ("host", "-oProxyCommand=touch MARKER"),
    ("host", "127.0.0.1;touch MARKER"),
    ("user", "x$(touch MARKER)"),
    ("key", "/nonexistent/k `touch MARKER`"),
])
def test_shell_in_ssh_settings_runs_nothing(jwbackup, system, tmp_path, key, value):
    marker = tmp_path / "pwned"
    values = {"host": "127.0.0.1", "user": "root"}
    values[key] = value.replace("MARKER", str(marker))
    system.configure(destination="  port: 1\n" + "".join(f"  {k}: '{v}'\n" for k, v in values.items()))
    result = backup(jwbackup, system, ok=False)
    assert result.returncode == 75, result.stderr
    one_error_line(result)
    assert not marker.exists()


BAD_CONFIGS = {
    "alias bomb": "a: &a [x, x]\nb: &b [*a, *a]\nroot: [*b, *b]\n",
    "huge": "# " + "x" * (2 << 20) + "\n",
    "destination a list": "destination: [1]\n",
    "directory a number": "destination:\n  directory: 5\n",
    "generations yes": "destination:\n  directory: /x\n  generations: yes\n",
    "port a string": "destination:\n  directory: /x\n  port: '22'\n",
    "roots a mapping": "roots: {}\n",
    "lock_file a number": "lock_file: 3\n",
    "keep negative": "destination:\n  directory: /x\n  keep: {daily: -1}\n",
    "deep nesting": "roots: " + "[" * 50 + "]" * 50 + "\n",
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_configuration_is_exit_78_and_one_line(jwbackup, tmp_path, name):
    config = tmp_path / "bad.yaml"
    config.write_text(BAD_CONFIGS[name])
    result = jwbackup("-c", config)
    assert result.returncode == 78, result.stderr
    assert str(config) in one_error_line(result)


def test_group_readable_password_is_refused_with_the_fix(jwbackup, system):
    system.configure(destination="  host: 127.0.0.1\n  password: hunter2-secret\n")
    os.chmod(system.config, 0o640)
    result = backup(jwbackup, system, ok=False)
    line = one_error_line(result)
    assert result.returncode == 78 and f"chmod 600 {system.config}" in line
    assert "hunter2-secret" not in line


def test_lock_directory_writable_by_others_is_refused(jwbackup, system, tmp_path):
    lockdir = tmp_path / "lock"
    lockdir.mkdir(mode=0o777)
    os.chmod(lockdir, 0o777)
    system.configure()
    result = backup(jwbackup, system, ok=False)
    assert result.returncode == 78
    assert one_error_line(result) == (
        f"jwbackup: error: {system.config}:2: lock_file: {lockdir} is writable by other users: "
        "put the lock in a directory of its own, such as /run/lock/jwbackup"
    )
    assert complete_generations(system.dest) == []


def test_run_leaves_a_private_lock_directory(jwbackup, system, tmp_path):
    system.configure()
    backup(jwbackup, system)
    st = os.lstat(tmp_path / "lock")
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(tmp_path / "lock" / "jwbackup.lock").st_mode) == 0o600


def _hold(seam: Seam, program: str, hold, when: str = "*") -> None:
    """``program`` waits while the file ``hold`` exists (its arguments matching ``when``)."""
    hold.touch()
    seam.program(program, f'case "$*" in {when}) while [ -e "{hold}" ]; do sleep 0.01; done;; esac\nexec "$REAL" "$@"')


def test_two_runs_at_once_one_waits_out_with_75_the_other_succeeds(jwbackup, system, tmp_path):
    system.configure(extra=RSYNC)
    seam = Seam(tmp_path / "seam")
    hold = tmp_path / "hold"
    _hold(seam, "rsync", hold)
    first = start(system, tmp_path / "first.log", env=seam.env)
    try:
        wait_for(lambda: processes_with(os.fsencode(system.dest)), 30, "the first run to reach its transfer")
        second = backup(jwbackup, system, ok=False)
        assert second.returncode == 75 and "holds the lock" in one_error_line(second)
    finally:
        hold.unlink()
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert len(complete_generations(system.dest)) == 1


def test_backup_while_prune_works_gets_the_lock_message(jwbackup, system, tmp_path):
    system.configure(destination="  generations: 1\n", extra=RSYNC)
    backup(jwbackup, system)
    for day in range(1, 4):
        subprocess.run(["cp", "-al", system.dest / complete_generations(system.dest)[-1],
                        system.dest / f"2001-01-{day:02d}-00:00:00"], check=True)
    seam = Seam(tmp_path / "seam")
    hold = tmp_path / "hold"
    _hold(seam, "rm", hold, "*.deleting-*")
    prune = subprocess.Popen([str(JWBACKUP), "-l", str(tmp_path / "prune.log"),
                              "-c", str(system.config), "prune"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **seam.env})
    try:
        wait_for(lambda: [n for n in os.listdir(system.dest) if n.startswith(".deleting-")], 30, "prune to start")
        result = backup(jwbackup, system, ok=False)
        assert result.returncode == 75 and "holds the lock" in one_error_line(result)
    finally:
        hold.unlink()
        prune.communicate(timeout=60)
    assert prune.returncode == 0
    backup(jwbackup, system)
    assert len(complete_generations(system.dest)) == 1

"""A password destination end to end: the password reaches ssh only through
sshpass's environment, never a command line, the log or a message."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from backupenv import System
from test_transport import cmdlines_seen


@pytest.fixture
def remote_dir(password_user):
    """A destination directory the password user owns, outside root's private tmp."""
    name, _ = password_user
    path = tempfile.mkdtemp(prefix="jwbackup-pw-", dir="/var/tmp")
    shutil.chown(path, user=name)
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_password_is_in_no_command_line_log_or_message(jwbackup, tmp_path, sshd, password_user, remote_dir):
    name, password = password_user
    system = System(tmp_path)
    system.configure(directory=str(remote_dir), destination=(
        f"  host: 127.0.0.1\n  port: {sshd.port}\n  user: {name}\n"
        f"  known_hosts: {sshd.known_hosts}\n  password: {password}\n"
    ))
    os.chmod(system.config, 0o600)
    log = tmp_path / "debug.log"
    with cmdlines_seen(b"sshpass", password.encode()) as seen:
        result = jwbackup("-L", "DEBUG", "-c", system.config, "--root", system.root_dir, log_file=log)
    assert result.returncode == 0, result.stderr
    generations = [n for n in os.listdir(remote_dir) if n[:1].isdigit()]
    assert len(generations) == 1
    assert (remote_dir / generations[0] / "home/alice/notes.txt").read_bytes() == b"remember the milk\n"
    assert any(b"sshpass" in c for c in seen), "the run was not observed"
    assert not [c for c in seen if password.encode() in c]
    for text in (log.read_bytes(), result.stdout, result.stderr):
        assert password.encode() not in text
    assert b"sshpass -e ssh" in log.read_bytes()  # the commands were logged, without it

    # a wrong password: one line, no password in it
    system.configure(directory=str(remote_dir), destination=(
        f"  host: 127.0.0.1\n  port: {sshd.port}\n  user: {name}\n"
        f"  known_hosts: {sshd.known_hosts}\n  password: not-{password}\n"
    ))
    os.chmod(system.config, 0o600)
    failed = jwbackup("-c", system.config, "--root", system.root_dir)
    lines = failed.stderr.decode().strip().splitlines()
    assert failed.returncode == 75 and len(lines) == 1 and "permission denied" in lines[0], lines
    assert password not in lines[0]

"""Shared fixtures: the installed ``jwbackup`` command run as a user would, a real sshd, a user with a password."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
JWBACKUP = Path(sys.executable).with_name("jwbackup")


@pytest.fixture
def jwbackup(tmp_path):
    """Run the installed ``jwbackup`` console script; returns the CompletedProcess.

    The log goes to a file in the test's temporary directory, never to
    /var/log, and stdout stays bytes (file names are bytes).
    """

    def run(*args, input=None, env=None, timeout=300, log_file=None):
        argv = [str(JWBACKUP), "-l", str(log_file or tmp_path / "jwbackup.log"), *map(os.fsdecode, args)]
        return subprocess.run(
            argv,
            input=input,
            capture_output=True,
            env={**os.environ, **(env or {})},
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1 (see ``tests/sshd.py``); tests that stop it restart it."""
    from sshd import SshServer

    server = SshServer(tmp_path_factory.mktemp("sshd")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def real_state_dir_restored():
    """Runs against the live system (root /) write jwbackup's verification cache
    under /var/lib/jwbackup; whatever the suite created there is removed."""
    state = "/var/lib/jwbackup"
    existed = {name: os.path.lexists(os.path.join(state, name)) for name in ("", "cache", "packages")}
    yield
    for name in ("cache", "packages"):
        if not existed[name]:
            shutil.rmtree(os.path.join(state, name), ignore_errors=True)
    if not existed[""] and os.path.isdir(state) and not os.listdir(state):
        os.rmdir(state)


@pytest.fixture
def password_user():
    """A temporary local user with a password; removed even when the test fails."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd")
    name = f"jwbt{os.getpid() % 100000}"
    password = "pw " + secrets.token_hex(8)
    subprocess.run(["useradd", "--no-create-home", "--home-dir", "/", "--shell", "/bin/sh", name],
                   check=True, capture_output=True)
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True, capture_output=True)
        yield name, password
    finally:
        subprocess.run(["userdel", name], capture_output=True)

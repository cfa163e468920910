"""Network faults over a real sshd: down before the run, killed mid-transfer, a changed host key."""

from __future__ import annotations

import os

import pytest

from backupenv import System
from faultkit import (
    assert_untouched, backup, complete_generations, one_error_line, start_during_a_big_transfer,
)
from sshd import keygen


@pytest.fixture
def system(tmp_path):
    return System(tmp_path)


def _ssh(sshd, known_hosts=None) -> str:
    return (f"  host: 127.0.0.1\n  port: {sshd.port}\n  user: {sshd.user}\n  key: {sshd.key}\n"
            f"  known_hosts: {known_hosts or sshd.known_hosts}\n")


def test_sshd_down_before_the_run_is_75_and_one_line(jwbackup, system, sshd):
    system.configure(destination=_ssh(sshd))
    sshd.stop()
    try:
        result = backup(jwbackup, system, ok=False)
    finally:
        sshd.start()
    assert result.returncode == 75 and "connection refused" in one_error_line(result)
    assert os.listdir(system.dest) == []


def test_changed_host_key_is_refused_even_with_accept_new(jwbackup, system, sshd, tmp_path):
    impostor = keygen(tmp_path / "impostor")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(open(f'{impostor}.pub').read().split()[:2])}\n")
    system.configure(destination=_ssh(sshd, known) + "  accept_new_host_key: true\n")
    result = backup(jwbackup, system, ok=False)
    assert result.returncode == 75 and "host key verification failed" in one_error_line(result)
    assert os.listdir(system.dest) == []


def test_sshd_killed_mid_transfer_keeps_generations_and_the_next_run_succeeds(jwbackup, system, sshd, tmp_path):
    system.configure(destination=_ssh(sshd))
    first, before, proc = start_during_a_big_transfer(jwbackup, system, tmp_path / "run.log", 128 << 20, 60)
    try:
        sshd.stop()
        _, err = proc.communicate(timeout=120)
    finally:
        sshd.start()
    lines = err.decode().strip().splitlines()
    assert proc.returncode in (74, 75) and len(lines) == 1 and lines[0].startswith("jwbackup: error: "), lines
    assert complete_generations(system.dest) == [first]
    assert os.readlink(system.dest / "latest") == first
    assert_untouched(before, system.dest)
    os.unlink(system.path(b"/srv/zz-big"))
    backup(jwbackup, system)
    assert len(complete_generations(system.dest)) == 2 and system.partials() == []
    assert_untouched(before, system.dest)

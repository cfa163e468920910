"""``hooks: before/after/on_error``: the real ``jwbackup`` command, real /bin/sh, real rsync."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap

import pytest
from conftest import JWBACKUP
from fakeroot import DebianRoot


@pytest.fixture
def setup(tmp_path):
    """A small Debian root, a destination directory and a writer for the config file."""
    root = DebianRoot(tmp_path / "root")
    root.package("demo", files={b"/usr/bin/demo": b"binary"})
    root.write()
    (tmp_path / "root" / "etc").mkdir(exist_ok=True)
    (tmp_path / "root" / "etc" / "local.conf").write_text("mine\n")
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)

    def config(hooks: str, directory=dest) -> str:
        path = tmp_path / "jwbackup.yaml"
        path.write_text(
            f"root: /\nprune: []\nlock_file: {tmp_path / 'lock'}\n"
            f"destination:\n  directory: {directory}\n" + textwrap.dedent(hooks)
        )
        return str(path)

    return tmp_path, dest, config


def env_file(path) -> dict[str, str]:
    """The JWBACKUP_* variables a hook wrote with ``env > FILE``."""
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.startswith("JWBACKUP_"))


def generations(dest) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name[:1].isdigit())


def test_failing_before_hook_stops_the_run_with_its_message_and_writes_nothing(setup, jwbackup):
    tmp, dest, config = setup
    cfg = config("""\
        hooks:
          before: ["echo checking the disk; echo 'backup disk is not mounted' >&2; exit 3"]
          after: ["touch $MARK"]
        """)
    result = jwbackup("-c", cfg, "--root", tmp / "root", env={"MARK": str(tmp / "after-ran")})
    assert result.returncode == 2
    errors = result.stderr.decode().strip().splitlines()
    assert len(errors) == 1
    assert "before hook" in errors[0] and "exited with status 3" in errors[0]
    assert "backup disk is not mounted" in errors[0]
    assert list(dest.iterdir()) == []
    assert not (tmp / "after-ran").exists()
    log = (tmp / "jwbackup.log").read_text()
    assert "INFO jwbackup.hooks: before hook: | checking the disk" in log
    assert result.stdout == b""


def test_on_error_hook_runs_when_a_before_hook_fails(setup, jwbackup):
    tmp, dest, config = setup
    cfg = config("""\
        hooks:
          before: ["exit 1"]
          on_error: ["env > $OUT"]
        """)
    result = jwbackup("-c", cfg, "--root", tmp / "root", env={"OUT": str(tmp / "env")})
    assert result.returncode == 2
    seen = env_file(tmp / "env")
    assert seen["JWBACKUP_STATUS"] == "failed"
    assert "before hook 'exit 1' exited with status 1" in seen["JWBACKUP_ERROR"]
    assert seen["JWBACKUP_GENERATION"] == ""


def test_on_error_hook_sees_the_failure_when_the_destination_is_missing(setup, jwbackup):
    tmp, dest, config = setup
    missing = tmp / "unmounted" / "backup"
    cfg = config("""\
        hooks:
          after: ["touch $MARK"]
          on_error: ["env > $OUT", "echo notified"]
        """, directory=missing)
    result = jwbackup("-c", cfg, "--root", tmp / "root", env={"OUT": str(tmp / "env"), "MARK": str(tmp / "after-ran")})
    assert result.returncode != 0
    seen = env_file(tmp / "env")
    assert seen["JWBACKUP_STATUS"] == "failed"
    assert seen["JWBACKUP_DESTINATION"] == str(missing)
    error_line = result.stderr.decode().strip().splitlines()[-1]
    assert seen["JWBACKUP_ERROR"] in error_line
    assert not missing.exists() and not (tmp / "after-ran").exists()
    assert "on_error hook: | notified" in (tmp / "jwbackup.log").read_text()


def test_on_error_hook_runs_when_the_transfer_fails(setup, jwbackup):
    """A destination on a full disk: a 512 KiB tmpfs, mounted in a private mount namespace."""
    tmp, dest, config = setup
    if not shutil.which("unshare") or subprocess.run(
        ["unshare", "-m", "mount", "-t", "tmpfs", "none", str(dest)], capture_output=True
    ).returncode != 0:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    (tmp / "root" / "etc" / "big").write_bytes(os.urandom(2 << 20))
    cfg = config("""\
        hooks:
          on_error: ["env > $OUT"]
        """)
    script = 'mount -t tmpfs -o size=512k none "$1" && shift && exec "$@"'
    argv = ["unshare", "-m", "sh", "-c", script, "sh", str(dest), str(JWBACKUP), "-l", str(tmp / "jwbackup.log"),
            "-c", cfg, "--root", str(tmp / "root")]
    result = subprocess.run(argv, capture_output=True, env={**os.environ, "OUT": str(tmp / "env")}, timeout=120)
    assert result.returncode not in (0, 1)
    error_line = result.stderr.decode().strip().splitlines()[-1]
    assert "No space left on device" in error_line
    seen = env_file(tmp / "env")
    assert seen["JWBACKUP_STATUS"] == "failed"
    assert seen["JWBACKUP_ERROR"] in error_line
    assert seen["JWBACKUP_GENERATION"]


def test_after_hook_sees_the_generation_and_its_output_goes_to_the_log_not_stdout(setup, jwbackup):
    tmp, dest, config = setup
    cfg = config("""\
        hooks:
          before: ["echo before says hello"]
          after:
            - env > "$OUT"
            - |
              echo first line
              echo second line >&2
        """)
    result = jwbackup("-c", cfg, "--root", tmp / "root", env={"OUT": str(tmp / "env")})
    assert result.returncode == 0, result.stderr
    [generation] = generations(dest)
    seen = env_file(tmp / "env")
    assert seen["JWBACKUP_GENERATION"] == generation
    assert seen["JWBACKUP_STATUS"] == "success"
    assert seen["JWBACKUP_DESTINATION"] == str(dest)
    assert seen["JWBACKUP_ERROR"] == ""
    assert (dest / generation / "etc" / "local.conf").read_text() == "mine\n"
    assert b"hello" not in result.stdout and b"line" not in result.stdout
    log = (tmp / "jwbackup.log").read_text()
    for line in ("before hook: | before says hello", "after hook: | first line", "after hook: | second line"):
        assert f"INFO jwbackup.hooks: {line}" in log


def test_failing_after_hook_keeps_the_generation_and_ends_with_warnings(setup, jwbackup):
    tmp, dest, config = setup
    cfg = config("""\
        hooks:
          after: ["echo cannot unmount >&2; exit 5", "touch $MARK"]
        """)
    result = jwbackup("-c", cfg, "--root", tmp / "root", env={"MARK": str(tmp / "second-ran")})
    assert result.returncode == 1
    assert "after hook" in result.stderr.decode() and "cannot unmount" in result.stderr.decode()
    assert len(generations(dest)) == 1
    assert (tmp / "second-ran").exists()


def test_dry_run_runs_no_hooks(setup, jwbackup):
    tmp, dest, config = setup
    cfg = config("""\
        hooks:
          before: ["touch $MARK"]
          after: ["touch $MARK"]
        """)
    result = jwbackup("-c", cfg, "--root", tmp / "root", "--dry-run", env={"MARK": str(tmp / "ran")})
    assert result.returncode == 0, result.stderr
    assert not (tmp / "ran").exists()

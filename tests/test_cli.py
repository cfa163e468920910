"""The command line as a user meets it: help, version, errors, logging."""

from __future__ import annotations

import grp
import logging
import os
import subprocess
import tempfile

import pytest

from conftest import JWBACKUP

import jwbackup
from jwbackup import cli


def run(*args, env=None):
    return subprocess.run([str(JWBACKUP), *map(os.fsdecode, args)], capture_output=True, env={**os.environ, **(env or {})})


def test_version():
    result = run("-V")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"jwbackup {jwbackup.__version__}"


def test_help_names_the_commands_and_options():
    text = run("-h").stdout.decode()
    for word in ("--config", "--version", "--log-level", "--log-file", "--root", "--dry-run",
                 "backup", "init", "list", "prune", "files", "excludes", "config"):
        assert word in text, word


def test_module_entry_point_is_the_same_program():
    result = subprocess.run([str(JWBACKUP.with_name("python")), "-m", "jwbackup", "--version"], capture_output=True)
    assert result.stdout.decode().strip() == f"jwbackup {jwbackup.__version__}"


def test_usage_errors_exit_64():
    result = run("no-such-command")
    assert result.returncode == 64
    assert "invalid choice" in result.stderr.decode()


def test_missing_config_is_one_line_exit_78(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = run("-l", "-", "-c", missing, "files")
    assert result.returncode == 78
    assert result.stderr.decode().splitlines() == [f"jwbackup: error: {missing}: configuration file not found"]


def test_options_after_the_command_work_too(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("root: [/etc]\ndestination: {directory: /srv/backup, password: s3cret, host: example.org}\n")
    cfg.chmod(0o600)
    result = run("config", "check", "-c", cfg, "-l", "-")
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout.decode()
    assert "********" in result.stdout.decode()


def test_config_check_warns_when_no_backup_could_run(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("root: [/etc]\n")
    result = run("-l", "-", "-c", cfg, "config", "check")
    assert result.returncode == 1
    assert "root:\n  - /etc\n" in result.stdout.decode()
    assert result.stderr.decode().splitlines() == [
        f"jwbackup: {cfg} has no destination section: files and excludes can run, "
        "backup, list, prune, restore and diff cannot"]
    assert run("-l", "-", "-c", cfg, "backup").returncode == 78


def test_restore_packages_from_a_directory_needs_no_configuration(tmp_path):
    """On a rescue system there may be no /etc/jwbackup.yaml at all."""
    state = tmp_path / "var/lib/jwbackup/packages"
    state.mkdir(parents=True)
    (state / "packages").write_text("curl 7.88.1-10 amd64\nlibcurl4 7.88.1-10 amd64\n")
    (state / "manual").write_text("curl\n")
    result = run("-l", "-", "-c", tmp_path / "missing.yaml", "restore", "--packages", "--from", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "apt-get install curl" in result.stdout.decode().splitlines()
    both = run("-l", "-", "-c", tmp_path / "missing.yaml", "restore", "--packages", "--from", tmp_path, "-g", "x")
    assert both.returncode == 64 and b"not both" in both.stderr


def test_unwritable_log_file_falls_back_to_stderr(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("root: [/etc]\n")
    cfg.chmod(0o644)
    log = tmp_path / "no-such-dir" / "jwbackup.log"
    result = run("-c", cfg, "-l", log, "files")
    assert result.returncode == 0
    assert f"cannot write the log file {log}" in result.stderr.decode()


@pytest.mark.parametrize("umask", [0o022, 0o077])  # cron's, jwbackup.service's
def test_log_file_is_created_for_root_and_adm_only_also_after_logrotate_moves_it(tmp_path, umask):
    log = tmp_path / "jwbackup.log"
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    umask = os.umask(umask)
    try:
        cli.setup_logging("INFO", str(log))
        logging.getLogger("jwbackup").info("first run")
        st = os.stat(log)
        assert (st.st_mode & 0o777, grp.getgrgid(st.st_gid).gr_name) == (0o640, "adm")
        log.rename(tmp_path / "jwbackup.log.1")
        logging.getLogger("jwbackup").info("still running")
        st = os.stat(log)
        assert (st.st_mode & 0o777, grp.getgrgid(st.st_gid).gr_name) == (0o640, "adm")
        assert "still running" in log.read_text() and "first run" not in log.read_text()
    finally:
        os.umask(umask)
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


def test_non_root_user_gets_a_warning_not_a_crash():
    """The default log file is root's; nobody can still list what would be backed up."""
    with tempfile.TemporaryDirectory() as public:  # pytest's tmp_path is private to root
        os.chmod(public, 0o755)
        cfg = os.path.join(public, "c.yaml")
        with open(cfg, "w") as f:
            f.write("root: [/etc/apt]\n")
        os.chmod(cfg, 0o644)
        result = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", str(JWBACKUP), "-c", cfg, "files"],
            capture_output=True,
        )
    assert result.returncode == 0, result.stderr
    assert b"cannot write the log file /var/log/jwbackup.log" in result.stderr
    assert b"/etc/apt" in result.stdout

"""Packaging: the files in etc/, the .deb, the ebuild and the man page.

The first tests read the tree only.  The rest build the .deb from a copy of
the tree with dpkg-buildpackage, check it with lintian, install it on this
machine with apt-get, and purge it again in teardown, restoring any /etc file
the package would have replaced.
"""

from __future__ import annotations

import argparse
import grp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

TREE = Path(__file__).resolve().parent.parent
EBUILD_DIR = TREE / "gentoo" / "app-backup" / "jwbackup"
VENV_JWBACKUP = Path(sys.executable).with_name("jwbackup")
PACKAGE_ETC_FILES = (
    "/etc/jwbackup.yaml", "/etc/default/jwbackup", "/etc/cron.daily/jwbackup", "/etc/logrotate.d/jwbackup",
)
STATE_DIR = "/var/lib/jwbackup"  # removed by purge
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def run(*argv, check=True, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 300)
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def version() -> str:
    return re.search(r'^__version__ = "([^"]+)"', (TREE / "jwbackup" / "__init__.py").read_text(), re.M).group(1)


def changelog_version(path: Path) -> str:
    return re.match(r"jwbackup \(([^)]+)\)", path.read_text()).group(1)


# --- the tree ------------------------------------------------------------------------


def test_version_agrees_across_program_setup_py_changelog_and_ebuild():
    program = run(VENV_JWBACKUP, "--version").stdout.split()[-1]
    setup_py = run(sys.executable, "setup.py", "--version", cwd=TREE).stdout.strip().splitlines()[-1]
    debian = changelog_version(TREE / "debian" / "changelog").rsplit("-", 1)[0]
    ebuilds = sorted(p.name for p in EBUILD_DIR.glob("*.ebuild"))
    assert (program, setup_py, debian) == (version(),) * 3
    assert ebuilds == [f"jwbackup-{version()}.ebuild"]


@pytest.mark.parametrize("config", ["etc/jwbackup.yaml", "etc/examples/jwbackup-quick.yaml"])
def test_shipped_config_validates(config):
    result = run(VENV_JWBACKUP, "-l", "-", "-c", TREE / config, "config", "check")
    assert "directory: /var/backups/jwbackup/" in result.stdout


def uncomment_examples(text: str) -> str:
    """The config with every commented-out example setting (``# key: value``, ``# - item``) made active."""
    from jwbackup import config

    keys = "|".join(config.TOP_KEYS + config.DESTINATION_KEYS + config.KEEP_KEYS + config.HOOK_KEYS)
    setting = re.compile(rf"^(\s*)# (\s*(?:{keys}):(?: .*)?)$")
    item = re.compile(r"^(\s*)# (\s*- .*)$")  # a list item right after an example setting
    lines, in_example = [], False
    for line in text.splitlines():
        match = setting.match(line) or (in_example and item.match(line))
        in_example = bool(match)
        lines.append(match.group(1) + match.group(2) if match else line)
    return "\n".join(lines) + "\n"


def test_every_commented_example_in_shipped_config_validates(tmp_path):
    active = tmp_path / "jwbackup.yaml"
    active.write_text(uncomment_examples((TREE / "etc" / "jwbackup.yaml").read_text()))
    active.chmod(0o600)  # it holds the example password
    result = run(VENV_JWBACKUP, "-l", "-", "-c", active, "config", "check")
    for setting in ("host: backup.example.org", "daily: 7", "manager: dpkg", "- umount /var/backups"):
        assert setting in result.stdout


def test_shipped_config_leaves_lock_file_at_its_default():
    active = [line for line in (TREE / "etc" / "jwbackup.yaml").read_text().splitlines() if not line.startswith("#")]
    assert not any(line.startswith("lock_file") for line in active)


def test_cron_script_is_an_executable_posix_shell_script():
    script = TREE / "etc" / "cron.daily" / "jwbackup"
    assert os.access(script, os.X_OK)
    run("sh", "-n", script)


def ebuild_installed_sources() -> set[str]:
    text = (EBUILD_DIR / f"jwbackup-{version()}.ebuild").read_text()
    return set(re.findall(r"(?<![\w/])((?:etc|man)/[\w./-]+)", text))


def debian_installed_sources() -> set[str]:
    sources = set()
    for name in ("jwbackup.install", "jwbackup.manpages", "jwbackup.examples"):
        for line in (TREE / "debian" / name).read_text().splitlines():
            if line.strip():
                sources.add(line.split()[0])
    return sources


def test_ebuild_is_valid_bash_and_installs_only_files_that_exist():
    run("bash", "-n", EBUILD_DIR / f"jwbackup-{version()}.ebuild")
    missing = [p for p in ebuild_installed_sources() if not (TREE / p).is_file()]
    assert ebuild_installed_sources() and not missing


def test_deb_and_ebuild_install_every_file_under_etc():
    under_etc = {str(p.relative_to(TREE)) for p in (TREE / "etc").rglob("*") if p.is_file()}
    assert debian_installed_sources() == ebuild_installed_sources() == under_etc | {"man/jwbackup.8"}


def test_man_page_matches_the_argument_parser():
    fresh = run(sys.executable, TREE / "tools" / "manpage.py").stdout
    assert (TREE / "man" / "jwbackup.8").read_text() == fresh, "man/jwbackup.8 is stale: run 'make man'"


def test_man_page_names_every_option_command_and_exit_code():
    from jwbackup import cli

    page = (TREE / "man" / "jwbackup.8").read_text().replace("\\-", "-")
    parsers = [cli.build_parser()]
    names = []
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            names.extend(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                names.extend(action.choices)
                parsers.extend(action.choices.values())
    assert "--dry-run" in names and "excludes" in names
    assert [n for n in names if f"\\fB{n}\\fR" not in page] == []
    codes = re.findall(r"^\s+(\d+)\s", cli.__doc__.split("Exit codes", 1)[1], re.M)
    assert codes and [c for c in codes if f".B {c}\n" not in page] == []


# --- building the .deb -----------------------------------------------------------------


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    """(first, upgrade): the .deb of the tree, and a -2 revision with a changed config.

    Both are built in one copy of the working tree, so the second build also
    shows that a build leaves the tree fit for the next one.
    """
    out = tmp_path_factory.mktemp("debs")
    src = out / f"jwbackup-{version()}"
    shutil.copytree(TREE, src, ignore=COPY_IGNORE, symlinks=True)
    run("dpkg-buildpackage", "-us", "-uc", "-b", cwd=src)
    first = out / f"jwbackup_{changelog_version(src / 'debian' / 'changelog')}_all.deb"
    assert first.is_file()
    kept = out / "first" / first.name
    kept.parent.mkdir()
    first.rename(kept)

    changelog = src / "debian" / "changelog"
    upgrade_version = f"{version()}-99"
    changelog.write_text(
        f"jwbackup ({upgrade_version}) unstable; urgency=medium\n\n  * Upgrade test.\n\n"
        " -- Test <test@example.org>  Thu, 26 Nov 2026 23:05:10 +0000\n\n" + changelog.read_text()
    )
    with open(src / "etc" / "jwbackup.yaml", "a") as f:
        f.write("# a line added by the next version\n")
    run("dpkg-buildpackage", "-us", "-uc", "-b", cwd=src)
    upgrade = out / f"jwbackup_{upgrade_version}_all.deb"
    assert upgrade.is_file()
    return kept, upgrade


def test_lintian_reports_no_errors_or_warnings(debs):
    result = run("lintian", "--fail-on", "error,warning", debs[0], check=False)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert (result.returncode, tags) == (0, [])


def test_deb_holds_program_units_cron_script_and_man_page(debs):
    listing = run("dpkg-deb", "-c", debs[0]).stdout
    for path in (
        "./usr/bin/jwbackup", "./lib/systemd/system/jwbackup.service", "./lib/systemd/system/jwbackup.timer",
        "./etc/cron.daily/jwbackup", "./usr/share/man/man8/jwbackup.8.gz", "./etc/jwbackup.yaml",
    ):
        assert f" {path}\n" in listing + "\n"
    assert re.search(r"^-rwxr-xr-x .* \./etc/cron\.daily/jwbackup$", listing, re.M)


# --- the installed package ---------------------------------------------------------------


def installed_version() -> str | None:
    result = run("dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Version}", "jwbackup", check=False)
    return result.stdout.split()[-1] if result.stdout.startswith("ii") else None


def changelog_version_of(deb: Path) -> str:
    return run("dpkg-deb", "-f", deb, "Version").stdout.strip()


def package_state() -> str | None:
    result = run("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "jwbackup", check=False)
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() not in ("", "un") else None


def apt_install(deb: Path) -> None:
    run("apt-get", "install", "-y", "-q", "--no-install-recommends",
        "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold", deb, env=APT_ENV)


@pytest.fixture(scope="module")
def installed(debs, tmp_path_factory):
    """The first .deb installed; purged afterwards, the machine's state put back.

    /etc files the package owns are restored as they were, and so is
    /var/lib/jwbackup (the caches and package state that purging removes); a
    jwbackup of the same version installed before (``make backup``) is
    installed again.
    """
    before = installed_version()
    if package_state() is not None and before != changelog_version_of(debs[0]):
        pytest.skip(f"jwbackup {before or '(half-installed)'} is installed here; these tests would purge it")
    saved = tmp_path_factory.mktemp("etc-saved")
    previous = {}
    for path in PACKAGE_ETC_FILES + tuple(p + ".dpkg-dist" for p in PACKAGE_ETC_FILES):
        if os.path.lexists(path):
            previous[path] = saved / path.strip("/").replace("/", "_")
            shutil.copy2(path, previous[path], follow_symlinks=False)
    state = saved / "var-lib-jwbackup"
    if os.path.isdir(STATE_DIR):
        shutil.copytree(STATE_DIR, state, symlinks=True)
    try:
        apt_install(debs[0])
        yield debs
    finally:
        run("dpkg", "--purge", "jwbackup", check=False, env=APT_ENV)
        for path, copy in previous.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copy2(copy, path, follow_symlinks=False)
        if state.is_dir():
            shutil.rmtree(STATE_DIR, ignore_errors=True)
            shutil.copytree(state, STATE_DIR, symlinks=True)
        if before is not None:
            apt_install(debs[0])
            for path in PACKAGE_ETC_FILES:  # dpkg's copy of a file kept by --force-confold
                dist = path + ".dpkg-dist"
                if dist not in previous and os.path.lexists(dist):
                    os.unlink(dist)


def test_installed_command_reports_the_version(installed):
    assert run("/usr/bin/jwbackup", "--version").stdout.strip() == f"jwbackup {version()}"


def test_files_under_etc_are_registered_conffiles(installed):
    conffiles = run("dpkg-query", "-W", "-f", "${Conffiles}", "jwbackup").stdout
    registered = {line.split()[0] for line in conffiles.strip().splitlines()}
    assert registered == set(PACKAGE_ETC_FILES)


def test_installed_config_validates(installed):
    result = run("/usr/bin/jwbackup", "-l", "-", "config", "check")
    assert "directory: /var/backups/jwbackup/" in result.stdout


def test_man_page_renders(installed, tmp_path):
    page = Path("/usr/share/man/man8/jwbackup.8.gz")
    if not page.exists():  # dpkg may be told to leave out documentation (path-exclude)
        run("dpkg-deb", "-x", installed[0], tmp_path)
        page = tmp_path / "usr/share/man/man8/jwbackup.8.gz"
    result = run("man", "-l", page, env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "80"})
    assert "EXIT STATUS" in result.stdout and "jwbackup.timer" in result.stdout


def test_timer_is_enabled_and_the_service_is_not(installed):
    assert os.path.islink("/etc/systemd/system/timers.target.wants/jwbackup.timer")
    assert not any(Path("/etc/systemd/system").glob("*.wants/jwbackup.service"))


def test_systemd_accepts_the_units(installed):
    result = run("systemd-analyze", "verify", "/lib/systemd/system/jwbackup.service",
                 "/lib/systemd/system/jwbackup.timer", check=False)
    ours = [line for line in result.stderr.splitlines() if "jwbackup" in line]
    assert (result.returncode, ours) == (0, [])


def test_logrotate_accepts_the_config(installed):
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate is not installed")
    result = run("logrotate", "--debug", "/etc/logrotate.d/jwbackup")
    assert "/var/log/jwbackup.log" in result.stdout + result.stderr


def test_logrotate_leaves_a_log_for_root_and_adm_only(tmp_path):
    """Even a log that was world-readable before (jwbackup 0.1 under cron's umask)."""
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate is not installed")
    log = tmp_path / "jwbackup.log"
    log.write_text("a line\n")
    log.chmod(0o644)
    conf = tmp_path / "logrotate.conf"
    conf.write_text((TREE / "etc" / "logrotate.d" / "jwbackup").read_text().replace("/var/log/jwbackup.log", str(log)))
    run("logrotate", "--force", "--state", str(tmp_path / "state"), str(conf))
    assert (tmp_path / "jwbackup.log.1").read_text() == "a line\n"  # delaycompress: the newest stays plain
    st = os.stat(log)
    assert (st.st_size, st.st_mode & 0o777, st.st_uid, grp.getgrgid(st.st_gid).gr_name) == (0, 0o640, 0, "adm")


def cron_daily(opts: str | None, systemd: bool = False) -> subprocess.CompletedProcess:
    """Run /etc/cron.daily/jwbackup as cron would, with or without systemd's marker directory.

    The script steps aside when /run/systemd/system exists; a private mount
    namespace shows it the /run it should see without changing the machine's.
    ``opts``: JWBACKUP_OPTS in the environment (None: not set).
    """
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"} | ({} if opts is None else {"JWBACKUP_OPTS": opts})
    has_systemd = os.path.isdir("/run/systemd/system")
    if systemd == has_systemd:
        return run("/etc/cron.daily/jwbackup", check=False, env=env)
    if shutil.which("unshare") is None or run("unshare", "-m", "true", check=False).returncode != 0:
        pytest.skip("cannot make a private mount namespace here")
    setup = "mount -t tmpfs none /run && mkdir -p /run/systemd/system" if systemd else "mount -t tmpfs none /run/systemd"
    return run("unshare", "-m", "sh", "-c", f"{setup} && exec /etc/cron.daily/jwbackup", check=False, env=env)


@pytest.fixture
def small_config(tmp_path):
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "kept.txt").write_text("unchanged between runs\n")
    dest = tmp_path / "dest"
    lock = tmp_path / "lock"
    lock.mkdir(mode=0o700)
    config = tmp_path / "jwbackup.yaml"
    config.write_text(
        f"roots: [{source}]\nprune: []\n"
        f"destination:\n  directory: {dest}\n  generations: 5\n"
        f"lock_file: {lock}/jwbackup.lock\n"
    )
    return config, source, dest, tmp_path / "jwbackup.log"


def generation_dirs(dest: Path) -> list[Path]:
    return sorted(p for p in dest.iterdir() if re.fullmatch(r"\d{4}-\d\d-\d\d-\d\d:\d\d:\d\d", p.name))


def test_cron_daily_backs_up_and_links_unchanged_files(installed, small_config):
    config, source, dest, log = small_config
    run("/usr/bin/jwbackup", "-l", log, "-c", config, "init")
    first = cron_daily(f"-c {config} -l {log}")
    second = cron_daily(f"-c {config} -l {log}")
    for result in (first, second):  # progress and the summary go to the log, not into cron's mail
        assert (result.returncode, result.stdout) == (0, ""), result.stderr
        assert "complete" not in result.stderr
    generations = generation_dirs(dest)
    assert len(generations) == 2
    copies = [g / str(source).lstrip("/") / "sub" / "kept.txt" for g in generations]
    assert copies[0].read_text() == "unchanged between runs\n"
    assert copies[0].stat().st_ino == copies[1].stat().st_ino
    assert "complete" in log.read_text()


@pytest.mark.parametrize("quote", ["", '"', "'"])
def test_cron_daily_reads_the_options_file_as_systemd_does(installed, small_config, quote):
    """systemd takes JWBACKUP_OPTS=-c FILE unquoted; run as shell, that line would run FILE."""
    config, source, dest, log = small_config
    run("/usr/bin/jwbackup", "-l", log, "-c", config, "init")
    defaults = Path("/etc/default/jwbackup")
    saved = defaults.read_bytes()
    try:
        defaults.write_text(f"# as an admin edits it\nJWBACKUP_OPTS={quote}-c {config} -l {log}{quote}  \n")
        result = cron_daily(None)
    finally:
        defaults.write_bytes(saved)
    assert (result.returncode, result.stderr) == (0, "")
    assert len(generation_dirs(dest)) == 1


def test_cron_daily_exits_with_the_program_status(installed, tmp_path):
    result = cron_daily(f"-c {tmp_path}/missing.yaml -l -")
    assert result.returncode == 78
    assert "missing.yaml" in result.stderr


def test_cron_daily_does_nothing_under_systemd(installed, small_config):
    config, source, dest, log = small_config
    run("/usr/bin/jwbackup", "-l", log, "-c", config, "init")
    result = cron_daily(f"-c {config} -l {log}", systemd=True)
    assert (result.returncode, result.stderr, generation_dirs(dest)) == (0, "", [])


def test_cron_daily_while_another_run_holds_the_lock_exits_75(installed, small_config):
    """Cron and the timer (or an admin's manual run) firing together: one waits out."""
    from lock_holder import held_lock

    config, source, dest, log = small_config
    run("/usr/bin/jwbackup", "-l", log, "-c", config, "init")
    with held_lock(config.parent / "lock" / "jwbackup.lock"):
        result = cron_daily(f"-c {config} -l {log}")
    assert result.returncode == 75
    assert "another jwbackup run" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert generation_dirs(dest) == []
    assert cron_daily(f"-c {config} -l {log}").returncode == 0
    assert len(generation_dirs(dest)) == 1


def test_upgrade_with_confold_keeps_the_changed_config(installed):
    config = Path("/etc/jwbackup.yaml")
    config.write_text(config.read_text() + "# changed by the admin\n")
    apt_install(installed[1])
    assert installed_version() == changelog_version_of(installed[1])
    assert config.read_text().endswith("# changed by the admin\n")
    assert Path("/etc/jwbackup.yaml.dpkg-dist").read_text().endswith("# a line added by the next version\n")


def test_remove_keeps_config_and_purge_leaves_only_backups_and_log(installed, small_config):
    config, source, dest, log = small_config
    run("/usr/bin/jwbackup", "-l", log, "-c", config, "init")
    run("/usr/bin/jwbackup", "-l", log, "-c", config)
    files = [p for p in run("dpkg", "-L", "jwbackup").stdout.splitlines() if os.path.isfile(p)]
    assert "/usr/bin/jwbackup" in files

    run("dpkg", "--remove", "jwbackup", env=APT_ENV)
    assert not os.path.exists("/usr/bin/jwbackup")
    assert all(os.path.exists(p) for p in PACKAGE_ETC_FILES)
    assert cron_daily(f"-c {config}").returncode == 0  # the program is gone: nothing to do

    run("dpkg", "--purge", "jwbackup", env=APT_ENV)
    left = [p for p in files if os.path.lexists(p)]
    left += [p for p in ("/usr/lib/python3/dist-packages/jwbackup", "/usr/share/doc/jwbackup",
                         "/etc/systemd/system/timers.target.wants/jwbackup.timer", "/var/lib/jwbackup")
             if os.path.lexists(p)]
    left += [str(p) for p in Path("/etc").glob("jwbackup.yaml*")]
    assert left == []
    assert package_state() is None
    assert len(generation_dirs(dest)) == 1 and log.exists()

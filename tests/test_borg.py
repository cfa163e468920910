"""jwbackup as borgmatic's pre-backup generator, proven with real borgmatic and borg.

Debian's borgmatic 1.7 (``/usr/bin/borgmatic``, old config layout, ``hooks:
before_backup``) and borgmatic 2 from PyPI (in the test venv, ``commands:``),
both with Debian's borg 1.2.  Each creates an archive of a fake Debian root;
the files in it must be exactly the files of a jwbackup rsync generation of
the same root: unowned and modified files in, installed ones out, names with
spaces, UTF-8, non-UTF-8 bytes, trailing (Unicode) white space and glob
characters included.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import JWBACKUP
from fakeroot import DebianRoot

from jwbackup.excludes import write_rules

BORGMATIC_1 = Path("/usr/bin/borgmatic")
BORGMATIC_2 = Path(sys.executable).with_name("borgmatic")

# Installed files whose names each tool's reader could misread, and unowned
# neighbours that a misread rule would wrongly exclude.
OWNED = {
    b"/usr/bin/demo": b"binary",
    b"/usr/share/demo/with space": b"a",
    b"/usr/share/demo/\xc3\xbcnicode": b"b",
    b"/usr/share/demo/latin1-\xff": b"c",
    b"/usr/share/demo/trailing ": b"d",
    b"/usr/share/demo/tab\t": b"d2",
    b"/usr/share/demo/nbsp\xc2\xa0": b"e",
    b"/usr/share/demo/ideographic\xe3\x80\x80": b"e2",
    b"/usr/share/demo/unit-separator\x1f": b"e3",
    b"/usr/share/demo/cr\rinside": b"e4",
    b"/usr/share/demo/glob*[x]?": b"f",
    b"/usr/share/demo/dollar$HOME": b"g",
    b"/usr/share/demo/#hash": b"h",
    b"/usr/share/demo/back\\slash": b"i",
    b"/usr/share/demo/ lead/x": b"j",
    b"/etc/demo-kept.conf": b"kept=1\n",
}
MODIFIED = b"/etc/demo.conf"
UNOWNED = [
    b"/etc/local file",
    b"/home/u/\xc3\xa9t\xc3\xa9",
    b"/home/u/raw-\xfe",
    b"/home/u/new\nline",
    b"/usr/share/demo/trailing",
    b"/usr/share/demo/tab",
    b"/usr/share/demo/nbsp",
    b"/usr/share/demo/ideographic",
    b"/usr/share/demo/unit-separator",
    b"/usr/share/demo/cr",
    b"/usr/share/demo/globax",
    b"/usr/share/demo/dollar",
    b"/usr/local/bin/tool",
    b"/root/.profile",
]
# Skipped by jwbackup's walk, and by the other tools when told to (exclude_caches, exclude_if_present).
SKIPPED = {
    b"/home/u/.cache/CACHEDIR.TAG": b"Signature: 8a477f597d28d172789f06886806bc55\n",
    b"/home/u/.cache/blob": b"cached",
    b"/home/u/scratch/.no-backup": b"",
    b"/home/u/scratch/big": b"scratch",
}


# Under directories of jwbackup's default prune list: left out by its walk, and by the rules.
PRUNED = {
    b"/mnt/data/file": b"another disk",
    b"/lost+found/x": b"fsck's finds",
    b"/tmp/x": b"scratch",
    b"/var/cache/app/blob": b"cached",
}


def build_root(path: Path) -> bytes:
    """A fake Debian root with the files above; returns it as bytes."""
    root = DebianRoot(path, usrmerge=True)
    root.package("demo", files={**OWNED, MODIFIED: b"x=1\n"}, conffiles=[MODIFIED, b"/etc/demo-kept.conf"])
    root.write()
    with open(root.path(MODIFIED), "wb") as f:
        f.write(b"x=2\n")
    for name, content in [*((n, b"local") for n in UNOWNED), *SKIPPED.items()]:
        os.makedirs(os.path.dirname(root.path(name)), exist_ok=True)
        with open(root.path(name), "wb") as f:
            f.write(content)
    return root.root


def non_directories(top: bytes) -> set[bytes]:
    """Every non-directory under ``top``, as a path relative to it with a leading slash."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            found.add(os.path.join(dirpath, name)[len(top):])
    return found


def write_jwbackup_config(tmp: Path, default_prune: bool = False) -> Path:
    path = tmp / "jwbackup.yaml"
    prune = "" if default_prune else "prune: []\n"
    path.write_text(f"root: /\n{prune}lock_file: {tmp / 'lock'}\ndestination:\n  directory: {tmp / 'dest'}\n")
    return path


@pytest.fixture
def system(tmp_path):
    return backed_up_system(tmp_path)


def backed_up_system(tmp_path: Path, default_prune: bool = False):
    """The fake root, a jwbackup config for it, and the file set of its rsync generation.

    With ``default_prune``, the config keeps jwbackup's default prune list and
    the root has files under it (:data:`PRUNED`).
    """
    root = build_root(tmp_path / "root")
    if default_prune:
        for name, content in PRUNED.items():
            os.makedirs(os.path.dirname(root + name), exist_ok=True)
            with open(root + name, "wb") as f:
                f.write(content)
    cfg = write_jwbackup_config(tmp_path, default_prune)
    (tmp_path / "dest").mkdir(mode=0o700)
    result = subprocess.run([JWBACKUP, "-l", str(tmp_path / "jwbackup.log"), "-c", cfg, "--root", root],
                            capture_output=True)
    assert result.returncode == 0, result.stderr
    [generation] = [p for p in (tmp_path / "dest").iterdir() if p.name[:1].isdigit()]
    expected = non_directories(os.fsencode(generation))
    assert MODIFIED in expected and set(UNOWNED) <= expected
    assert not expected & (set(OWNED) | set(SKIPPED) | set(PRUNED))
    return root, cfg, expected


def borg_env(tmp: Path) -> dict[str, str]:
    """borg and borgmatic keep their caches, keys and state under ``tmp``, not in /root."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "HOME": str(home),
        "BORG_BASE_DIR": str(home),
        "XDG_RUNTIME_DIR": str(home),
        "XDG_STATE_HOME": str(home / "state"),
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "LANG": "C.UTF-8",
    }


def run(argv, env, cwd=None) -> subprocess.CompletedProcess:
    result = subprocess.run([os.fspath(a) for a in argv], capture_output=True, env=env, cwd=cwd, timeout=120)
    assert result.returncode == 0, (argv, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"))
    return result


def archived_files(tmp: Path, repo: Path, root: bytes, env) -> set[bytes]:
    """Extract the newest archive and return its non-directories under ``root``, relative to it."""
    archive = run(["borg", "list", "--short", "--last", "1", repo], env).stdout.decode().strip()
    target = tmp / "extracted"
    target.mkdir()
    run(["borg", "extract", f"{repo}::{archive}"], env, cwd=target)
    return non_directories(os.fsencode(target) + root)


def generate_command(tmp: Path, cfg: Path, root: bytes, excludes: Path) -> str:
    return shlex.join([str(JWBACKUP), "-l", str(tmp / "hook.log"), "-c", str(cfg), "--root", os.fsdecode(root),
                       "excludes", "--format", "borg", "-o", str(excludes)])


def borgmatic_1_config(tmp: Path, cfg: Path, root: bytes, repo: Path, excludes: Path) -> Path:
    path = tmp / "borgmatic-1.7.yaml"
    path.write_text(yaml.safe_dump({
        "location": {"source_directories": [os.fsdecode(root)], "repositories": [str(repo)],
                     "exclude_from": [str(excludes)], "exclude_caches": True, "exclude_if_present": [".no-backup"]},
        "hooks": {"before_backup": [generate_command(tmp, cfg, root, excludes)]},
    }))
    return path


def borgmatic_2_config(tmp: Path, cfg: Path, root: bytes, repo: Path, excludes: Path) -> Path:
    path = tmp / "borgmatic-2.yaml"
    path.write_text(yaml.safe_dump({
        "source_directories": [os.fsdecode(root)],
        "repositories": [{"path": str(repo), "label": "local"}],
        "exclude_from": [str(excludes)],
        "exclude_caches": True,
        "exclude_if_present": [".no-backup"],
        "commands": [{"before": "action", "when": ["create"], "run": [generate_command(tmp, cfg, root, excludes)]}],
    }))
    return path


needs_borg = pytest.mark.skipif(not shutil.which("borg"), reason="borg is not installed (Debian package borgbackup)")


@needs_borg
@pytest.mark.skipif(not BORGMATIC_1.exists(), reason="Debian's borgmatic is not installed")
def test_borgmatic_1_7_archive_holds_exactly_the_files_jwbackup_keeps(system, tmp_path):
    root, cfg, expected = system
    env = borg_env(tmp_path)
    repo, excludes = tmp_path / "repo", tmp_path / "excludes.borg"
    config = borgmatic_1_config(tmp_path, cfg, root, repo, excludes)
    run([BORGMATIC_1, "-c", config, "init", "--encryption", "none"], env)
    run([BORGMATIC_1, "-c", config, "create"], env)
    assert excludes.exists()
    assert archived_files(tmp_path, repo, root, env) == expected


@needs_borg
@pytest.mark.skipif(not BORGMATIC_1.exists(), reason="Debian's borgmatic is not installed")
def test_the_archive_holds_the_package_state_the_hook_wrote_and_restore_reads_it(tmp_path):
    """No jwbackup backup ever ran: the exclude hook alone puts the package list into the archive."""
    root = build_root(tmp_path / "root")
    cfg = write_jwbackup_config(tmp_path)
    env = borg_env(tmp_path)
    repo, excludes = tmp_path / "repo", tmp_path / "excludes.borg"
    config = borgmatic_1_config(tmp_path, cfg, root, repo, excludes)
    run([BORGMATIC_1, "-c", config, "init", "--encryption", "none"], env)
    run([BORGMATIC_1, "-c", config, "create"], env)
    files = archived_files(tmp_path, repo, root, env)
    assert {b"/var/lib/jwbackup/packages/packages", b"/var/lib/jwbackup/packages/manual"} <= files
    restored = os.fsdecode(os.fsencode(tmp_path / "extracted") + root)
    plan = run([JWBACKUP, "-l", "-", "-c", cfg, "restore", "--packages", "--from", restored], env).stdout.decode()
    assert "apt-get install demo\n" in plan


def borgmatic_2_version() -> str | None:
    try:
        return importlib.metadata.version("borgmatic")
    except importlib.metadata.PackageNotFoundError:
        return None


@needs_borg
@pytest.mark.skipif(not (borgmatic_2_version() or "").startswith("2."), reason="borgmatic 2 is not in the test venv")
def test_borgmatic_2_archive_holds_exactly_the_files_jwbackup_keeps_and_dry_run_needs_the_file(system, tmp_path):
    root, cfg, expected = system
    env = borg_env(tmp_path)
    repo, excludes = tmp_path / "repo", tmp_path / "excludes.borg"
    config = borgmatic_2_config(tmp_path, cfg, root, repo, excludes)
    run([BORGMATIC_2, "-c", config, "repo-create", "--encryption", "none"], env)

    # --dry-run skips command hooks but reads exclude_from: without the file it fails ...
    dry = [BORGMATIC_2, "-c", config, "--dry-run", "create"]
    missing = subprocess.run(dry, capture_output=True, env=env, timeout=120)
    assert missing.returncode != 0 and str(excludes).encode() in missing.stdout + missing.stderr
    # ... and after the one-time generation at install time it works, leaving the file alone
    run(shlex.split(generate_command(tmp_path, cfg, root, excludes)), env)
    before = excludes.stat().st_mtime_ns
    run(dry, env)
    assert excludes.stat().st_mtime_ns == before

    run([BORGMATIC_2, "-c", config, "create"], env)
    assert excludes.stat().st_mtime_ns != before  # the hook ran again
    archive = run(["borg", "list", "--short", repo], env).stdout.decode().strip()
    listing = run(["borg", "list", "--format", "{path}{NL}", f"{repo}::{archive}"], env).stdout.decode()
    prefix = os.fsdecode(root).lstrip("/")
    assert f"{prefix}/etc/local file" in listing
    assert f"{prefix}/usr/share/demo/with space" not in listing
    assert archived_files(tmp_path, repo, root, env) == expected


@needs_borg
@pytest.mark.parametrize("borgmatic", [
    pytest.param(1, marks=pytest.mark.skipif(not BORGMATIC_1.exists(), reason="Debian's borgmatic is not installed")),
    pytest.param(2, marks=pytest.mark.skipif(not (borgmatic_2_version() or "").startswith("2."),
                                             reason="borgmatic 2 is not in the test venv")),
])
def test_the_archive_leaves_out_the_prune_list_as_jwbackup_does(tmp_path, borgmatic):
    """/mnt, /lost+found, /tmp, /var/cache: the rules carry jwbackup's default prune list."""
    root, cfg, expected = backed_up_system(tmp_path, default_prune=True)
    env = borg_env(tmp_path)
    repo, excludes = tmp_path / "repo", tmp_path / "excludes.borg"
    if borgmatic == 1:
        config = borgmatic_1_config(tmp_path, cfg, root, repo, excludes)
        run([BORGMATIC_1, "-c", config, "init", "--encryption", "none"], env)
        run([BORGMATIC_1, "-c", config, "create"], env)
    else:
        config = borgmatic_2_config(tmp_path, cfg, root, repo, excludes)
        run([BORGMATIC_2, "-c", config, "repo-create", "--encryption", "none"], env)
        run([BORGMATIC_2, "-c", config, "create"], env)
    assert archived_files(tmp_path, repo, root, env) == expected
    assert b"pp:" + root + b"/lost+found" in excludes.read_bytes().split(b"\n")


@needs_borg
def test_a_directory_rule_borg_would_trim_leaves_out_that_directory_alone(tmp_path):
    """A pruned directory named "odd " gets an re: rule; "odd" beside it and "odd x" stay."""
    top = tmp_path / "top"
    for name in ("odd /inside", "odd /deeper/file", "odd/kept", "odd x/kept"):
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_text("x")
    rules = io.BytesIO()
    write_rules([b"/odd "], "borg", rules, root=os.fsencode(top), directories=True)
    assert rules.getvalue().startswith(b"re:^")
    (tmp_path / "excludes.borg").write_bytes(rules.getvalue())
    env = borg_env(tmp_path)
    repo = tmp_path / "repo"
    run(["borg", "init", "--encryption", "none", repo], env)
    run(["borg", "create", "--exclude-from", tmp_path / "excludes.borg", f"{repo}::a", top], env)
    assert archived_files(tmp_path, repo, os.fsencode(top), env) == {b"/odd/kept", b"/odd x/kept"}


@needs_borg
def test_borg_rules_survive_borgs_line_trimming_and_name_every_owned_file(system, tmp_path):
    """The rule file itself: plain pf: rules where borg reads them back unchanged, anchored re: otherwise."""
    root, cfg, expected = system
    excludes = tmp_path / "excludes.borg"
    result = subprocess.run([JWBACKUP, "-l", "-", "-c", cfg, "--root", root, "excludes", "--format", "borg",
                             "-o", excludes], capture_output=True)
    assert result.returncode == 0, result.stderr
    assert b"cannot express" not in result.stderr
    lines = excludes.read_bytes().split(b"\n")[:-1]
    assert len(lines) == len(OWNED)
    assert b"pf:" + root + b"/usr/share/demo/with space" in lines
    assert [line for line in lines if line.endswith(b"/usr/share/demo/trailing\\x20\\Z")][0].startswith(b"re:^tmp/")
    assert all(line == line.strip() for line in lines)
    excludes.read_bytes().decode("utf-8")  # borg and borgmatic read it as UTF-8 text


@pytest.mark.skipif(not BORGMATIC_1.exists(), reason="Debian's borgmatic is not installed")
def test_documented_borgmatic_1_7_config_is_valid(tmp_path):
    docs = Path(__file__).parent.parent / "docs"
    run(["validate-borgmatic-config", "-c", docs / "borgmatic-1.7.yaml"], borg_env(tmp_path))


@pytest.mark.skipif(not (borgmatic_2_version() or "").startswith("2."), reason="borgmatic 2 is not in the test venv")
def test_documented_borgmatic_2_config_is_valid(tmp_path):
    docs = Path(__file__).parent.parent / "docs"
    run([BORGMATIC_2, "config", "validate", "-c", docs / "borgmatic-2.yaml"], borg_env(tmp_path))

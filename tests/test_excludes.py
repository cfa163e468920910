"""``jwbackup excludes`` round trip through the real rsync: the rules leave out
exactly the installed, unmodified files, whatever their names."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from conftest import JWBACKUP
from fakeroot import DebianRoot

# Installed files with names that rule syntaxes find hard.
HARD_NAMES = [
    b"plain",
    b"with space",
    b"star*",
    b"question?",
    b"bracket[ab]",
    b"back\\slash",
    b"back\\slash*star",
    b"-leading-dash",
    b"+ plus",
    b"# hash",
    b"; semicolon",
    b"trailing space ",
    b"latin1-\xe9",
    b"dollar$HOME",
]


@pytest.fixture
def root(tmp_path):
    root = DebianRoot(tmp_path / "system")
    files = {b"/usr/share/hard/" + name: b"installed " + name for name in HARD_NAMES}
    files[b"/etc/hard.conf"] = b"pristine\n"
    files[b"/etc/changed.conf"] = b"pristine\n"
    root.package("hard", files=files, conffiles=[b"/etc/hard.conf", b"/etc/changed.conf"])
    root.write()
    with open(root.path(b"/etc/changed.conf"), "ab") as f:
        f.write(b"# the admin's change\n")
    # the admin's files, next to the installed ones, with look-alike names
    for name in (b"mine", b"star-not-glob", b"plain2", b"bracketa"):
        with open(root.path(b"/usr/share/hard/" + name), "wb") as f:
            f.write(b"mine")
    return root


def tree(top: bytes) -> set[bytes]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            found.add(os.path.join(dirpath, name)[len(top):])
    return found


def excludes(jwbackup, root, tmp_path, fmt, *args) -> bytes:
    cfg = tmp_path / "jwbackup.yaml"
    cfg.write_text("root: [/]\n")
    out = tmp_path / f"excludes.{fmt}"
    result = jwbackup("-c", cfg, "--root", root.root, "excludes", "--format", fmt, "-o", out, *args)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("null", [False, True], ids=["lines", "nul"])
def test_rsync_rules_exclude_exactly_the_installed_unmodified_files(jwbackup, root, tmp_path, null):
    rules = excludes(jwbackup, root, tmp_path, "rsync", *(["-0"] if null else []))
    dest = tmp_path / "copy"
    # rsync reads the rules when it meets --exclude-from: --from0 must come first
    argv = ["rsync", "-a", *(["--from0"] if null else []), f"--exclude-from={rules}", root.root + b"/", os.fsencode(dest) + b"/"]
    subprocess.run(argv, check=True)
    copied = tree(os.fsencode(dest))
    installed = {b"/usr/share/hard/" + name for name in HARD_NAMES} | {b"/etc/hard.conf"}
    assert not copied & installed, sorted(copied & installed)
    assert tree(root.root) - installed == copied


def test_a_pruned_name_that_is_a_symlink_is_kept_as_the_walk_keeps_it(jwbackup, root, tmp_path):
    os.makedirs(root.path(b"/run/lock"))
    os.makedirs(root.path(b"/tmp/scratch"))
    os.symlink(b"/run", root.path(b"/var/run"))  # as on every Debian; /var/run is in the default prune list
    rules = excludes(jwbackup, root, tmp_path, "rsync")
    subprocess.run(["rsync", "-a", f"--exclude-from={rules}", root.root + b"/", tmp_path / "copy"], check=True)
    copy = os.fsencode(tmp_path / "copy")
    assert os.readlink(copy + b"/var/run") == b"/run"
    assert not os.path.lexists(copy + b"/tmp/scratch") and not os.path.lexists(copy + b"/run/lock")
    listed = jwbackup("-c", config(tmp_path), "--root", root.root, "files")
    assert root.path(b"/var/run") in listed.stdout.split(b"\n")


def test_a_conffile_the_admin_changed_is_not_excluded(jwbackup, root, tmp_path):
    rules = excludes(jwbackup, root, tmp_path, "plain").read_bytes().split(b"\n")
    assert root.path(b"/etc/hard.conf") in rules
    assert root.path(b"/etc/changed.conf") not in rules


def test_swap_files_are_excluded_like_installed_files(jwbackup, root, tmp_path):
    with open(root.path(b"/etc/fstab"), "wb") as f:
        f.write(b"/swapfile none swap sw 0 0\n")
    rules = excludes(jwbackup, root, tmp_path, "plain").read_bytes().split(b"\n")
    assert root.path(b"/swapfile") in rules
    assert root.path(b"/etc/fstab") not in rules


def test_output_file_is_replaced_atomically(jwbackup, root, tmp_path):
    out = excludes(jwbackup, root, tmp_path, "borg")
    inode = os.stat(out).st_ino
    excludes(jwbackup, root, tmp_path, "borg")
    assert os.stat(out).st_ino != inode  # a new file renamed over the old one
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".jwbackup-")]


def test_a_swap_file_named_through_a_symlinked_directory_is_excluded_where_rsync_meets_it(jwbackup, root, tmp_path):
    """fstab says /swaplink/swap2; the walk of / meets it as /srv/swapdir/swap2."""
    os.makedirs(root.path(b"/srv/swapdir"))
    with open(root.path(b"/srv/swapdir/swap2"), "wb") as f:
        f.write(b"memory pages")
    os.symlink(b"srv/swapdir", root.path(b"/swaplink"))
    with open(root.path(b"/etc/fstab"), "wb") as f:
        f.write(b"/swaplink/swap2 none swap sw 0 0\n")
    rules = excludes(jwbackup, root, tmp_path, "rsync")
    dest = tmp_path / "copy"
    subprocess.run(["rsync", "-a", f"--exclude-from={rules}", root.root + b"/", os.fsencode(dest) + b"/"], check=True)
    copied = tree(os.fsencode(dest))
    assert b"/etc/fstab" in copied
    assert b"/srv/swapdir/swap2" not in copied
    assert b"- /swaplink/swap2" in rules.read_bytes().split(b"\n")  # the name fstab gives, for a tool given that path


def config(tmp_path):
    cfg = tmp_path / "jwbackup.yaml"
    cfg.write_text("root: [/]\n")
    return cfg


@pytest.mark.parametrize("where, reason", [
    ("missing/excludes", "No such file or directory"),
    ("a-directory", "Is a directory"),
    ("a-file/excludes", "Not a directory"),
])
def test_an_output_file_that_cannot_be_written_fails_in_one_line_naming_it(jwbackup, root, tmp_path, where, reason):
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "a-file").write_text("")
    out = tmp_path / where
    result = jwbackup("-c", config(tmp_path), "--root", root.root, "excludes", "--no-package-state", "-o", out)
    assert result.returncode == 73, result.stderr
    assert result.stderr.decode().splitlines()[-1] == f"jwbackup: error: cannot write {out}: {reason}"
    assert b"internal error" not in result.stderr and b".jwbackup-" not in result.stderr
    assert os.listdir(tmp_path / "a-directory") == []


def test_an_existing_output_file_is_left_as_it_was_when_the_run_fails(jwbackup, root, tmp_path):
    out = tmp_path / "excludes.borg"
    out.write_bytes(b"pf:/the/old/rules\n")
    result = jwbackup("-c", config(tmp_path), "--root", root.root, "excludes", "--format", "borg", "-0", "-o", out)
    assert result.returncode == 64
    assert out.read_bytes() == b"pf:/the/old/rules\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".jwbackup-")]


def test_an_empty_output_name_is_a_usage_error_not_stdout(jwbackup, root, tmp_path):
    result = jwbackup("-c", config(tmp_path), "--root", root.root, "excludes", "-o", "")
    assert result.returncode == 64
    assert result.stdout == b""
    assert b"-o needs a file name" in result.stderr


@pytest.mark.parametrize("command", [["excludes"], ["files"]])
def test_a_full_stdout_fails_in_one_line(root, tmp_path, command):
    with open("/dev/full", "wb") as full:
        result = subprocess.run([JWBACKUP, "-l", "-", "-c", config(tmp_path), "--root", root.root, *command],
                                stdout=full, stderr=subprocess.PIPE)
    assert result.returncode == 73, result.stderr
    assert result.stderr.decode().splitlines()[-1] == "jwbackup: error: cannot write stdout: No space left on device"


def test_an_existing_output_file_keeps_its_mode_and_a_new_one_is_private(jwbackup, root, tmp_path):
    kept, new = tmp_path / "kept", tmp_path / "new"
    kept.write_bytes(b"")
    kept.chmod(0o640)
    for out in (kept, new):
        result = jwbackup("-c", config(tmp_path), "--root", root.root, "excludes", "-o", out)
        assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    assert root.path(b"/etc/hard.conf") in kept.read_bytes().split(b"\n")

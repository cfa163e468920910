"""The kept manifest: used while the package database is unchanged, never after.

Fake Debian roots through ``jwbackup files``: each test compares what a run
selects with the kept manifest against what it selects without one.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from fakeroot import DebianRoot
from gentooroot import GentooRoot
from jwbackup import cachedir, manifestcache
from jwbackup.managers.portage import Portage

KEPT = b"/var/lib/jwbackup/cache/manifest-dpkg"


def settle():
    """Let the database just written age past the racy window, so that its manifest is kept."""
    time.sleep(cachedir.RACY_NS / 1e9 + 0.1)


@pytest.fixture
def debian(tmp_path):
    root = DebianRoot(tmp_path / "system", usrmerge=True)
    root.package("tool", files={b"/usr/bin/tool": b"tool\n", b"/bin/legacy": b"legacy\n",
                                b"/usr/share/doc/tool/README": b"the tool\n"})
    root.write()
    os.makedirs(root.path(b"/opt/app"))
    with open(root.path(b"/opt/app/data"), "wb") as f:
        f.write(b"the admin's\n")
    return root


def files(jwbackup, root: DebianRoot, tmp_path) -> tuple[set[bytes], bytes, str]:
    """(selected system paths, warnings on stderr, INFO log) of ``jwbackup files`` over the fake root."""
    cfg = tmp_path / "jwbackup.yaml"
    cfg.write_text("root: [/]\nprune: [/var/lib/dpkg]\n")
    log = tmp_path / "run.log"
    log.unlink(missing_ok=True)
    result = jwbackup("-c", cfg, "--root", root.root, "-L", "INFO", "files", "-0", log_file=log)
    assert result.returncode == 0, result.stderr
    return {p[len(root.root):] for p in result.stdout.split(b"\0")[:-1]}, result.stderr, log.read_text()


def fresh(jwbackup, root: DebianRoot, tmp_path) -> set[bytes]:
    """What a run selects with no kept manifest (the kept one is put back after)."""
    kept = root.path(KEPT)
    aside = kept + b".aside"
    os.rename(kept, aside)
    try:
        selected, _, log = files(jwbackup, root, tmp_path)
    finally:
        os.replace(aside, kept)
    assert "kept from an earlier run" not in log
    return selected


def test_unchanged_database_is_not_read_again_and_selects_the_same(jwbackup, debian, tmp_path):
    settle()
    first, _, log = files(jwbackup, debian, tmp_path)
    assert "kept from an earlier run" not in log
    assert os.stat(debian.path(KEPT)).st_mode & 0o777 == 0o600
    second, _, log = files(jwbackup, debian, tmp_path)
    assert "dpkg manifest: " in log and "(kept from an earlier run)" in log
    assert second == first
    assert b"/opt/app/data" in second and b"/usr/bin/tool" not in second and b"/usr/bin/legacy" not in second


def test_a_package_installed_since_is_seen_at_once(jwbackup, debian, tmp_path):
    settle()
    before, _, _ = files(jwbackup, debian, tmp_path)
    assert b"/opt/app/data" in before
    debian.package("app", files={b"/opt/app/data": b"the admin's\n"})
    debian.write()
    after, _, log = files(jwbackup, debian, tmp_path)
    assert "kept from an earlier run" not in log and b"/opt/app/data" not in after
    settle()
    files(jwbackup, debian, tmp_path)
    kept, _, log = files(jwbackup, debian, tmp_path)
    assert "kept from an earlier run" in log and kept == after


def test_a_list_file_edited_in_place_is_seen_at_once(jwbackup, debian, tmp_path):
    os.symlink(b"data", debian.path(b"/opt/app/link"))
    settle()
    assert b"/opt/app/link" in files(jwbackup, debian, tmp_path)[0]
    with open(debian.admin(b"info", b"tool.list"), "ab") as f:
        f.write(b"/opt/app\n/opt/app/link\n")  # a symlink: listed without an md5
    # At once: too recent to be told from a second write, so read from the database.
    selected, _, log = files(jwbackup, debian, tmp_path)
    assert "kept from an earlier run" not in log and b"/opt/app/link" not in selected
    settle()
    selected, _, log = files(jwbackup, debian, tmp_path)
    assert "kept dpkg manifest not used: the package database changed" in log
    assert b"/opt/app/link" not in selected


def test_a_changed_merged_usr_symlink_makes_the_manifest_read_again(jwbackup, debian, tmp_path):
    settle()
    files(jwbackup, debian, tmp_path)
    # /bin stops being a symlink: dpkg's "/bin/legacy" now means the file in the real /bin.
    os.unlink(debian.path(b"/bin"))
    shutil.copytree(debian.path(b"/usr/bin"), debian.path(b"/bin"), symlinks=True)
    selected, warnings, log = files(jwbackup, debian, tmp_path)
    assert "kept dpkg manifest not used: the symlink /bin changed" in log
    assert selected == fresh(jwbackup, debian, tmp_path)
    assert b"/bin/legacy" not in selected and b"/usr/bin/legacy" in selected


def test_a_package_directory_turned_into_a_symlink_makes_the_manifest_read_again(jwbackup, debian, tmp_path):
    settle()
    files(jwbackup, debian, tmp_path)
    # The admin moves a package's directory away and links it back.
    os.rename(debian.path(b"/usr/share/doc/tool"), debian.path(b"/opt/app/tool-doc"))
    os.symlink(b"/opt/app/tool-doc", debian.path(b"/usr/share/doc/tool"))
    selected, _, log = files(jwbackup, debian, tmp_path)
    assert "kept dpkg manifest not used: /usr/share/doc/tool is a symlink now" in log
    assert b"/usr/share/doc/tool" in selected  # the admin's symlink is backed up
    assert b"/opt/app/tool-doc/README" not in selected  # the package's file, moved with it
    assert selected == fresh(jwbackup, debian, tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "a flipped byte", "garbage"])
def test_damaged_kept_manifest_is_ignored_with_a_warning_and_rebuilt(jwbackup, debian, tmp_path, damage):
    settle()
    good, _, _ = files(jwbackup, debian, tmp_path)
    kept = debian.path(KEPT)
    with open(kept, "rb") as f:
        data = f.read()
    middle = len(data) // 2
    data = {"truncated": data[:middle],
            "a flipped byte": data[:middle] + bytes([data[middle] ^ 0x20]) + data[middle + 1:],
            "garbage": b"\0\1garbage" * 100}[damage]
    with open(kept, "wb") as f:
        f.write(data)
    selected, warnings, log = files(jwbackup, debian, tmp_path)
    assert selected == good
    assert b"kept dpkg manifest" in warnings and b"ignored" in warnings, warnings
    assert "WARNING" in log
    _, _, log = files(jwbackup, debian, tmp_path)
    assert "kept from an earlier run" in log


def test_a_kept_manifest_of_an_earlier_format_is_read_again_quietly(jwbackup, debian, tmp_path):
    settle()
    good, _, _ = files(jwbackup, debian, tmp_path)
    kept = debian.path(KEPT)
    with open(kept, "rb") as f:
        head, rest = f.read().split(b"\n", 1)
    assert head == b"jwbackup-manifest-cache %d dpkg" % manifestcache.VERSION
    with open(kept, "wb") as f:
        f.write(b"jwbackup-manifest-cache 1 dpkg\n" + rest)  # format 1 kept whole paths
    selected, warnings, log = files(jwbackup, debian, tmp_path)
    assert "kept dpkg manifest not used: another format" in log and b"kept" not in warnings
    assert selected == good
    _, _, log = files(jwbackup, debian, tmp_path)
    assert "kept from an earlier run" in log


def test_a_manager_without_a_fingerprint_is_read_every_time(tmp_path):
    root = GentooRoot(tmp_path)
    root.package("app-misc/foo-1.0", files={b"/usr/bin/foo": b"foo"})
    root.write()
    settle()
    for _ in range(2):
        manifest, kept = manifestcache.load(Portage(), str(tmp_path))
        assert not kept and b"/usr/bin/foo" in manifest
    assert not os.path.exists(os.path.join(tmp_path, "var/lib/jwbackup/cache"))

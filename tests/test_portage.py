"""The portage manager, reading fake Gentoo roots through portage's own API."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gentooroot import MTIME, GentooRoot

from jwbackup.errors import ManifestError
from jwbackup.managers import DIR, FILE, OTHER, SYMLINK, Digest, Package, available
from jwbackup.managers import portage
from jwbackup.managers.portage import Portage

REPO = Path(__file__).resolve().parent.parent


def md5(data: bytes) -> Digest:
    return Digest("md5", hashlib.md5(data).hexdigest())


@pytest.fixture
def gentoo(tmp_path) -> GentooRoot:
    """A Gentoo root with a few packages, one config file changed since install."""
    root = GentooRoot(tmp_path / "gentoo")
    root.package(
        "app-misc/foo-1.0",
        files={
            b"/usr/bin/foo": b"#!/bin/sh\necho foo\n",
            b"/usr/share/foo/read me.txt": b"spaces in the name\n",
            b"/etc/foo.conf": b"colour=blue\n",
        },
        dirs=[b"/var/lib/foo"],
        symlinks={b"/usr/bin/foo -> alias": b"foo", b"/usr/bin/f": b"read me"},
        fifos=[b"/var/lib/foo/control"],
    )
    root.package(
        "sys-apps/bar-2.3-r1",
        files={b"/usr/lib/bar.so": b"\x7fELF bar", b"/etc/env.d/50bar": b"PATH=/opt/bar\n"},
    )
    root.package("dev-lang/baz-5", files={b"/usr/share/baz/data": b"baz"}, slot="5")
    root.package("dev-lang/baz-6", files={b"/usr/share/baz6/data": b"baz6"}, slot="6")
    root.world(["app-misc/foo", "dev-lang/baz:6"])
    root.write()
    (root.path / "etc/foo.conf").write_bytes(b"colour=red\n")
    return root


def test_detect_recognises_a_vdb_with_packages(gentoo):
    assert Portage().detect(str(gentoo.path))


def test_detect_rejects_missing_or_empty_vdb(tmp_path):
    assert not Portage().detect(str(tmp_path))
    (tmp_path / "var/db/pkg/app-misc").mkdir(parents=True)
    assert not Portage().detect(str(tmp_path))


def test_detect_does_not_import_portage(gentoo):
    code = (
        "import sys; from jwbackup.managers.portage import Portage; "
        f"assert Portage().detect({str(gentoo.path)!r}); print('portage' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_portage_is_registered_as_a_manager_plugin():
    assert available()["portage"] is Portage


def test_manifest_lists_every_recorded_path_with_kind_and_owner(gentoo):
    manifest = Portage().manifest(str(gentoo.path))
    kinds = {path: entry.kind for path, entry in manifest.items()}
    assert kinds == {
        b"/etc": DIR,
        b"/etc/foo.conf": FILE,
        b"/etc/env.d": DIR,
        b"/etc/env.d/50bar": FILE,
        b"/usr": DIR,
        b"/usr/bin": DIR,
        b"/usr/bin/foo": FILE,
        b"/usr/bin/foo -> alias": SYMLINK,
        b"/usr/bin/f": SYMLINK,
        b"/usr/lib": DIR,
        b"/usr/lib/bar.so": FILE,
        b"/usr/share": DIR,
        b"/usr/share/foo": DIR,
        b"/usr/share/foo/read me.txt": FILE,
        b"/usr/share/baz": DIR,
        b"/usr/share/baz/data": FILE,
        b"/usr/share/baz6": DIR,
        b"/usr/share/baz6/data": FILE,
        b"/var": DIR,
        b"/var/lib": DIR,
        b"/var/lib/foo": DIR,
        b"/var/lib/foo/control": OTHER,
    }
    assert manifest[b"/usr/bin/foo"].package == "app-misc/foo-1.0"
    assert manifest[b"/usr/lib/bar.so"].package == "sys-apps/bar-2.3-r1"
    assert manifest[b"/usr/share/baz6/data"].package == "dev-lang/baz-6"
    assert manifest.warnings == []


def test_manifest_is_the_same_however_often_it_is_frozen_while_built(gentoo, monkeypatch):
    whole = Portage().manifest(str(gentoo.path))
    monkeypatch.setattr(portage, "FREEZE_BATCH", 1)  # /usr/bin, /etc: opened again by later packages
    again = Portage().manifest(str(gentoo.path))
    assert dict(again.records()) == dict(whole.records()) and len(whole) == 22


def test_manifest_records_md5_and_mtime_of_files_and_symlinks(gentoo):
    manifest = Portage().manifest(str(gentoo.path))
    foo = manifest.get(b"/usr/bin/foo")
    assert foo.digest == md5(b"#!/bin/sh\necho foo\n")
    assert foo.mtime == MTIME
    assert manifest.get(b"/usr/share/foo/read me.txt").digest == md5(b"spaces in the name\n")
    link = manifest.get(b"/usr/bin/foo -> alias")
    assert (link.digest, link.mtime, link.target) == (None, MTIME, b"foo")
    assert manifest.get(b"/usr/bin/f").target == b"read me"
    assert manifest.get(b"/var/lib/foo").mtime is None


def test_modified_config_file_keeps_the_recorded_digest_and_is_a_conffile(gentoo):
    manifest = Portage().manifest(str(gentoo.path))
    conf = manifest.get(b"/etc/foo.conf")
    assert conf.conffile
    assert conf.digest == md5(b"colour=blue\n")
    assert conf.digest != md5((gentoo.path / "etc/foo.conf").read_bytes())


def test_config_protect_mask_and_unprotected_paths_are_not_conffiles(gentoo):
    manifest = Portage().manifest(str(gentoo.path))
    assert not manifest.get(b"/etc/env.d/50bar").conffile  # CONFIG_PROTECT_MASK=/etc/env.d
    assert not manifest.get(b"/usr/bin/foo").conffile
    assert not manifest.get(b"/etc").conffile


def test_config_protect_from_profile_env_is_honoured(tmp_path):
    root = GentooRoot(tmp_path)
    root.package("kde-frameworks/kconfig-6.0", files={b"/usr/share/config/kdeglobals": b"[General]\n",
                                                      b"/usr/share/doc/k": b"doc"})
    root.profile_env(CONFIG_PROTECT="/usr/share/config")
    root.write()
    manifest = Portage().manifest(str(root.path))
    assert manifest.get(b"/usr/share/config/kdeglobals").conffile
    assert not manifest.get(b"/usr/share/doc/k").conffile


@pytest.mark.parametrize("link", ["/var/db/repos/gentoo/profiles/default",  # as older installs made it
                                  "../../var/db/repos/gentoo/profiles/default"])
def test_config_protect_from_the_profile_is_read_inside_the_root(tmp_path, link):
    root = GentooRoot(tmp_path)
    root.package("kde-frameworks/kconfig-6.0", files={b"/usr/share/config/kdeglobals": b"[General]\n"})
    root.write()
    profile = root.path / "var/db/repos/gentoo/profiles/default"
    profile.mkdir(parents=True)
    (profile / "make.defaults").write_text('CONFIG_PROTECT="/usr/share/config"\n')
    (root.path / "etc/portage").mkdir(parents=True, exist_ok=True)
    os.symlink(link, root.path / "etc/portage/make.profile")  # an absolute target is the root's, not this host's
    assert not os.path.exists(f"/{link}"), "this host has that profile itself"
    assert Portage().manifest(str(root.path)).get(b"/usr/share/config/kdeglobals").conffile


def test_symlink_name_containing_arrow_is_parsed_by_portage(gentoo):
    contents = gentoo.contents_file("app-misc/foo-1.0").read_bytes()
    assert b"sym /usr/bin/foo -> alias -> foo " in contents
    manifest = Portage().manifest(str(gentoo.path))
    assert b"/usr/bin/foo -> alias" in manifest
    assert b"/usr/bin/foo -> alias -> foo" not in manifest
    assert os.readlink(gentoo.join(b"/usr/bin/foo -> alias")) == b"foo"


def test_manifest_reads_the_root_quietly(gentoo, capfd):
    Portage().manifest(str(gentoo.path))
    Portage().packages(str(gentoo.path))
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_garbage_contents_line_warns_and_keeps_the_rest(tmp_path, capfd):
    root = GentooRoot(tmp_path)
    root.package("app-misc/ok-1", files={b"/usr/bin/ok": b"ok"})
    root.package("app-misc/broken-1", files={b"/usr/bin/good": b"good"},
                 extra_lines=["obj /usr/bin/truncated", "this is not a CONTENTS line"])
    root.write()
    manifest = Portage().manifest(str(root.path))
    assert b"/usr/bin/ok" in manifest and b"/usr/bin/good" in manifest
    assert b"/usr/bin/truncated" not in manifest
    contents = root.contents_file("app-misc/broken-1")
    bad = [n for n, line in enumerate(contents.read_text().splitlines(), 1) if "truncated" in line or "this" in line]
    assert len(manifest.warnings) == 1
    assert str(contents) in manifest.warnings[0]
    assert all(f"line {n}:" in manifest.warnings[0] for n in bad)
    assert "!!!" not in capfd.readouterr().err


def test_a_contents_warning_is_printed_once_by_the_command(jwbackup, tmp_path):
    root = GentooRoot(tmp_path / "system")
    root.package("app-misc/broken-1", files={b"/usr/bin/good": b"good"}, extra_lines=["this is not a CONTENTS line"])
    root.write()
    config = tmp_path / "jwbackup.yaml"
    config.write_text("root: [/usr]\n")
    for run in (1, 2):  # the manifest read, then perhaps kept from the first run
        result = jwbackup("-c", config, "--root", root.path, "-l", "-", "files", "--no-package-state")
        assert result.returncode == 0, result.stderr
        assert result.stderr.count(str(root.contents_file("app-misc/broken-1")).encode()) == 1, (run, result.stderr)


def test_undecodable_name_is_left_out_with_a_warning(tmp_path):
    root = GentooRoot(tmp_path)
    root.package("app-misc/latin-1", files={b"/usr/bin/plain": b"p"},
                 extra_lines=[b"obj /usr/share/caf\xe9 0cc175b9c0f1b6a831c399e269772661 1700000000"])
    root.write()
    manifest = Portage().manifest(str(root.path))
    assert b"/usr/bin/plain" in manifest
    assert not [p for p in manifest if p.startswith(b"/usr/share/caf")]
    assert str(root.contents_file("app-misc/latin-1")) in manifest.warnings[0]


def test_md5_that_is_not_hex_leaves_the_file_to_the_backup_with_a_warning(tmp_path):
    root = GentooRoot(tmp_path)
    root.package("app-misc/odd-1", files={b"/usr/bin/fine": b"f"},
                 extra_lines=["obj /usr/bin/odd not-an-md5-at-all-but-32-chars!! 1700000000",
                              "obj /usr/bin/late 0cc175b9c0f1b6a831c399e269772661 99999999999999999999"])
    root.write()
    manifest = Portage().manifest(str(root.path))
    assert manifest.get(b"/usr/bin/fine").digest == md5(b"f")
    assert b"/usr/bin/odd" not in manifest  # not owned: the walk keeps it
    late = manifest.get(b"/usr/bin/late")  # an mtime beyond 64 bits is not one: left unrecorded
    assert late.digest == Digest("md5", "0cc175b9c0f1b6a831c399e269772661") and late.mtime is None
    assert f"{root.contents_file('app-misc/odd-1')}: 1 md5s are not 32 hex digits" in manifest.warnings[0]


def test_paths_through_merged_usr_symlinks_are_canonical(tmp_path):
    root = GentooRoot(tmp_path)
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    root.package("sys-apps/coreutils-9.4", files={b"/bin/ls": b"ls"}, symlinks={b"/bin/dir": b"ls"})
    root.write()
    manifest = Portage().manifest(str(root.path))
    assert manifest.get(b"/usr/bin/ls").digest == md5(b"ls")
    assert manifest.get(b"/usr/bin/dir").kind == SYMLINK
    assert b"/bin/ls" not in manifest
    assert manifest.get(b"/usr/bin").kind == DIR  # "dir /bin" means the directory /usr/bin


def test_file_owned_by_two_packages_belongs_to_the_one_merged_last(tmp_path):
    root = GentooRoot(tmp_path)
    root.package("app-misc/old-1", files={b"/usr/bin/shared": b"old"})
    root.package("app-misc/new-1", files={b"/usr/bin/shared": b"new"})
    root.write()
    entry = Portage().manifest(str(root.path)).get(b"/usr/bin/shared")
    assert (entry.package, entry.digest) == ("app-misc/new-1", md5(b"new"))


def test_directory_entry_never_hides_a_symlink_of_the_same_name(tmp_path):
    root = GentooRoot(tmp_path)
    root.package("sys-apps/baselayout-2", symlinks={b"/lib": b"lib64"})
    root.package("sys-libs/glibc-2", files={b"/lib64/libc.so.6": b"libc"})
    root.package("app-misc/late-1", extra_lines=["dir /lib"])  # merged after the symlink
    root.write()
    manifest = Portage().manifest(str(root.path))
    assert manifest.get(b"/lib").kind == SYMLINK
    assert manifest.get(b"/lib64").kind == DIR


def test_packages_report_versions_and_world_as_manual(gentoo):
    packages = Portage().packages(str(gentoo.path))
    assert packages == [
        Package("app-misc/foo", "1.0", None, manual=True),
        Package("dev-lang/baz", "5", None, manual=False),
        Package("dev-lang/baz", "6", None, manual=True),
        Package("sys-apps/bar", "2.3-r1", None, manual=False),
    ]


def test_packages_in_world_sets_are_manual(tmp_path, caplog):
    root = GentooRoot(tmp_path)
    for cpv in ("app-misc/a-1", "app-misc/b-1", "app-misc/c-1", "app-misc/d-1"):
        root.package(cpv)
    root.world(["app-misc/a", "not an atom!"])
    root.world_sets(["@desktop", "@system", "@nowhere"])
    root.set("desktop", ["app-misc/b", "@more"])
    root.set("more", ["app-misc/c", "@desktop"])  # a loop must terminate
    root.write()
    with caplog.at_level(logging.INFO):
        packages = Portage().packages(str(root.path))
    assert {p.name: p.manual for p in packages} == {
        "app-misc/a": True, "app-misc/b": True, "app-misc/c": True, "app-misc/d": False,
    }
    assert "not an atom!" in caplog.text
    assert "@nowhere" in caplog.text


def test_missing_vdb_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="no portage package database"):
        Portage().manifest(str(tmp_path))
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("name", ["etc/portage/make.conf", "etc/portage/make.conf/50-flags", "etc/make.conf"])
def test_a_make_conf_portage_cannot_parse_is_named_in_the_error(gentoo, name):
    path = gentoo.path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('COMMON_FLAGS="-O2 -pipe\nUSE="X"\nFEATURES=""\n')  # the first quote is never closed
    with pytest.raises(ManifestError) as caught:
        Portage().manifest(str(gentoo.path))
    assert str(caught.value) == f"{path}: portage cannot parse it: No closing quotation"


def test_python_without_portage_gets_a_clear_error(gentoo):
    python = "/usr/bin/python3"
    probe = subprocess.run([python, "-c", "import portage"], capture_output=True)
    if probe.returncode == 0 or not os.path.exists(python):
        pytest.skip("needs a Python without the portage module")
    code = (
        "from jwbackup.managers.portage import Portage\n"
        "from jwbackup.errors import ManifestError\n"
        f"try:\n    Portage().manifest({str(gentoo.path)!r})\n"
        "except ManifestError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "the portage Python module is not installed" in result.stdout


def test_packages_are_sorted_by_name_then_version_order(tmp_path):
    root = GentooRoot(tmp_path)
    for cpv in ("dev-lang/z-10", "dev-lang/z-9", "app-misc/a-1.0_rc1", "app-misc/a-1.0"):
        root.package(cpv)
    root.write()
    versions = [(p.name, p.version) for p in Portage().packages(str(root.path))]
    assert versions == [("app-misc/a", "1.0_rc1"), ("app-misc/a", "1.0"), ("dev-lang/z", "9"), ("dev-lang/z", "10")]

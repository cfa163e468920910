"""The dpkg manager: this machine's real database, and fake roots built with tests/fakeroot.py."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
from fakeroot import DebianRoot, md5hex

from jwbackup import managers
from jwbackup.errors import ManifestError
from jwbackup.managers import FILE, Digest, Entry
from jwbackup.managers import dpkg
from jwbackup.managers.dpkg import Dpkg
from jwbackup.paths import Canonicalizer

ADMIN = b"/var/lib/dpkg"
on_debian = pytest.mark.skipif(not os.path.isfile(ADMIN + b"/status"), reason="needs a dpkg system")


def file_md5(path: bytes) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def dpkg_query(fmt: str, *packages: str) -> str:
    return subprocess.run(
        ["dpkg-query", "-W", "-f", fmt, *packages], capture_output=True, check=True, text=True
    ).stdout


def real_lists() -> dict[str, list[bytes]]:
    """``{owner: listed paths}`` for every .list file on this machine."""
    info = ADMIN + b"/info/"
    lists = {}
    for name in os.listdir(info):
        if name.endswith(b".list"):
            with open(info + name, "rb") as f:
                lists[os.fsdecode(name[:-5])] = f.read().split(b"\n")
    return lists


def real_diversions() -> list[tuple[bytes, bytes, str]]:
    with open(ADMIN + b"/diversions", "rb") as f:
        lines = f.read().split(b"\n")
    return [(lines[i], lines[i + 1], lines[i + 2].decode()) for i in range(0, len(lines) - 2, 3)]


@pytest.fixture(scope="module")
def real_manifest():
    return Dpkg().manifest("/")


# -- this machine ----------------------------------------------------------------


@on_debian
def test_real_start_stop_daemon_is_owned_under_its_usrmerge_name(real_manifest):
    entry = real_manifest.get(b"/usr/sbin/start-stop-daemon")
    assert entry is not None and entry.package == "dpkg" and entry.kind == FILE
    if b"/sbin/start-stop-daemon" in real_lists()["dpkg"] and os.path.islink("/sbin"):
        assert b"/sbin/start-stop-daemon" not in real_manifest


@on_debian
def test_real_manifest_is_the_same_however_often_it_is_frozen_while_built(real_manifest, monkeypatch):
    # Freezing after every package: directories shared by packages (/usr/bin,
    # /usr/share/doc) are opened again and again, and must lose nothing.
    monkeypatch.setattr(dpkg, "FREEZE_BATCH", 1)
    again = Dpkg().manifest("/")
    assert len(again) == len(real_manifest) > 1000
    assert dict(again.records()) == dict(real_manifest.records())
    assert list(again) == list(real_manifest)  # the same order: the verification cache reads in it


@on_debian
def test_real_ls_has_the_md5_of_the_installed_file(real_manifest):
    entry = real_manifest.get(b"/usr/bin/ls")
    assert entry.package == "coreutils"
    assert entry.digest == Digest("md5", file_md5(b"/usr/bin/ls"))


@on_debian
def test_real_manifest_has_no_path_under_a_symlinked_top_directory(real_manifest):
    tops = (b"bin", b"sbin", b"lib", b"lib32", b"lib64", b"libx32")
    aliases = [b"/" + n + b"/" for n in tops if os.path.islink(b"/" + n)]
    if not aliases:
        pytest.skip("not a merged-/usr system")
    assert [p for p in real_manifest if p.startswith(tuple(aliases))] == []
    assert real_manifest.warnings == []


@on_debian
def test_real_every_listed_path_is_in_the_manifest_under_its_canonical_name(real_manifest):
    canon = Canonicalizer("/")
    diverted = {frm for frm, _, _ in real_diversions()}
    installed = {
        line.split()[1]
        for line in dpkg_query("${db:Status-Status} ${binary:Package}\n").splitlines()
        if line.split()[0] not in ("not-installed", "config-files")
    }
    missing = [
        (owner, path)
        for owner, paths in real_lists().items()
        if owner in installed
        for path in paths
        if path
        and path not in diverted
        and canon(path) not in real_manifest
        and canon.directory(path) not in real_manifest
    ]
    assert missing[:5] == []


@on_debian
def test_real_diversions_put_other_packages_files_at_the_diverted_name(real_manifest):
    canon = Canonicalizer("/")
    lists = real_lists()
    for frm, to, diverter in real_diversions():
        listers = [owner for owner, paths in lists.items() if frm in paths]
        for owner in listers:
            if owner.split(":")[0] == diverter:
                # e.g. dash's own /bin/sh stays /bin/sh (canonically /usr/bin/sh)
                assert real_manifest.get(canon(frm)).package == owner, frm
            else:
                # e.g. libpq-dev's /usr/bin/pg_config lives at /usr/bin/pg_config.libpq-dev
                entry = real_manifest.get(canon(to))
                assert entry.package == owner, to
                if entry.digest is not None and os.path.isfile(canon(to)):
                    assert entry.digest.value == file_md5(canon(to))
        nobody_else = all(owner.split(":")[0] == diverter for owner in listers)
        if nobody_else and not any(to in paths for paths in lists.values()):
            assert canon(to) not in real_manifest  # e.g. /bin/sh.distrib: nobody installed it


@on_debian
def test_real_conffiles_are_flagged_with_the_md5_dpkg_query_reports(real_manifest):
    canon = Canonicalizer("/")
    diverted = {frm for frm, _, _ in real_diversions()}
    checked = 0
    state = owner = None
    for line in dpkg_query("${db:Status-Status} ${binary:Package}\n${Conffiles}\n").splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            state, owner = line.split()
            continue
        if state in ("not-installed", "config-files"):
            continue
        words = line.split()
        flags = {w for w in words[2:] if w in ("obsolete", "remove-on-upgrade")}
        path, md5 = " ".join(words[: len(words) - len(flags) - 1]), words[len(words) - len(flags) - 1]
        path = os.fsencode(path)
        entry = real_manifest.get(canon(path))
        if "obsolete" in flags:
            assert entry is None or entry.package != owner
        elif path not in diverted:
            assert entry.conffile and entry.kind == FILE and entry.package == owner, path
            assert entry.digest == (Digest("md5", md5) if len(md5) == 32 else None), path
            checked += 1
    assert checked > 0


@on_debian
def test_real_packages_agree_with_dpkg_query_and_apt_mark():
    listed = {
        tuple(line.split("\t")[1:])
        for line in dpkg_query("${db:Status-Status}\t${Package}\t${Version}\t${Architecture}\n").splitlines()
        if line.split("\t")[0] not in ("not-installed", "config-files")
    }
    packages = Dpkg().packages("/")
    assert len(packages) == len(listed)
    assert {(p.name, p.version, p.architecture) for p in packages} == listed
    auto = subprocess.run(["apt-mark", "showauto"], capture_output=True, text=True, check=True).stdout.split()
    assert {p.name for p in packages if not p.manual} == {name.split(":")[0] for name in auto}


# -- fake roots --------------------------------------------------------------------


def build_root(tmp_path) -> DebianRoot:
    root = DebianRoot(tmp_path, usrmerge=True)
    root.package(
        "tool",
        files={b"/bin/tool": b"tool binary", b"/sbin/tool-admin": b"admin", b"/etc/tool.conf": b"a=1\n"},
        conffiles=[b"/etc/tool.conf"],
        dirs=[b"/var/lib/tool"],
    )
    root.package(
        "libfoo1",
        files={b"/lib/x86_64-linux-gnu/libfoo.so.1": b"\x7fELF foo"},
        multi_arch="same",
        auto=True,
    )
    root.package(
        "removed",
        files={b"/etc/removed.conf": b"kept by dpkg", b"/usr/bin/removed": b"gone"},
        conffiles=[b"/etc/removed.conf"],
        status="deinstall ok config-files",
    )
    root.package(
        "spacey",
        files={
            b"/etc/spacey/my app.conf": b"spaces",
            b"/etc/spacey/old thing.conf": b"obsolete",
            b"/etc/spacey/both.conf": b"both flags",
            b"/etc/spacey/fr\xe9sh.conf": b"fresh",
            b"/usr/share/spacey/caf\xe9 \xff.txt": b"latin-1 name",
        },
        conffiles={
            b"/etc/spacey/my app.conf": md5hex(b"spaces") + " remove-on-upgrade",
            b"/etc/spacey/old thing.conf": md5hex(b"obsolete") + " obsolete",
            b"/etc/spacey/both.conf": md5hex(b"both flags") + " obsolete remove-on-upgrade",
            b"/etc/spacey/fr\xe9sh.conf": "newconffile",
        },
    )
    root.package("shell", files={b"/bin/sh": b"real shell", b"/usr/bin/sh.distrib": b"shipped as sh.distrib"})
    root.package("alt-shell", files={b"/bin/sh": b"alternative shell"}, version="2.0")
    root.divert(b"/bin/sh", b"/bin/sh.orig", package="shell")
    root.package("editor", files={b"/usr/bin/editor": b"packaged editor"})
    root.divert(b"/usr/bin/editor", b"/usr/bin/editor.packaged")  # local, by the admin
    root.write()
    return root


def test_fake_root_files_are_owned_with_their_md5(tmp_path):
    manifest = Dpkg().manifest(build_root(tmp_path).root)
    tool = Digest("md5", md5hex(b"tool binary"))
    assert manifest.get(b"/usr/bin/tool") == Entry(FILE, "tool", tool, False, None)
    assert manifest.get(b"/usr/sbin/tool-admin").digest == Digest("md5", md5hex(b"admin"))
    assert manifest.get(b"/var/lib/tool").kind is None  # a listed directory: dpkg records no type
    assert manifest.get(b"/").package  # "/." in the lists
    assert manifest.warnings == []


def test_fake_usrmerge_paths_are_recorded_under_usr_only(tmp_path):
    manifest = Dpkg().manifest(build_root(tmp_path).root)
    assert b"/usr/lib/x86_64-linux-gnu/libfoo.so.1" in manifest
    assert b"/usr/bin" in manifest and b"/usr/lib" in manifest
    assert [p for p in manifest if p.split(b"/")[1] in (b"bin", b"sbin", b"lib", b"lib64")] == []


def test_fake_paths_under_a_deeper_symlinked_directory_are_canonical(tmp_path):
    os.makedirs(tmp_path / "run")
    os.makedirs(tmp_path / "var")
    os.symlink("/run", tmp_path / "var" / "run")  # absolute: resolved inside the root
    root = DebianRoot(tmp_path)
    root.package("daemon", files={b"/var/run/daemon/socket.txt": b"s"}, dirs=[b"/var/run/daemon/empty"])
    root.write()
    manifest = Dpkg().manifest(root.root)
    assert manifest.get(b"/run/daemon/socket.txt").digest == Digest("md5", md5hex(b"s"))
    assert b"/run/daemon/empty" in manifest
    assert not [p for p in manifest if p.startswith(b"/var/run/")]


def test_fake_multiarch_same_package_is_read_from_its_qualified_list(tmp_path):
    manifest = Dpkg().manifest(build_root(tmp_path).root)
    entry = manifest.get(b"/usr/lib/x86_64-linux-gnu/libfoo.so.1")
    assert entry.package == "libfoo1:amd64"
    assert entry.digest == Digest("md5", md5hex(b"\x7fELF foo"))


def test_fake_conffiles_are_flagged_with_their_md5(tmp_path):
    manifest = Dpkg().manifest(build_root(tmp_path).root)
    assert manifest.get(b"/etc/tool.conf") == Entry(FILE, "tool", Digest("md5", md5hex(b"a=1\n")), True, None)
    spaced = manifest.get(b"/etc/spacey/my app.conf")
    assert spaced.conffile and spaced.digest == Digest("md5", md5hex(b"spaces"))


def test_fake_obsolete_conffiles_belong_to_the_admin(tmp_path):
    manifest = Dpkg().manifest(build_root(tmp_path).root)
    assert b"/etc/spacey/old thing.conf" not in manifest
    assert b"/etc/spacey/both.conf" not in manifest


def test_fake_newconffile_is_a_conffile_without_digest(tmp_path):
    manifest = Dpkg().manifest(build_root(tmp_path).root)
    assert manifest.get(b"/etc/spacey/fr\xe9sh.conf") == Entry(FILE, "spacey", None, True, None)


def test_fake_non_utf8_names_are_kept_as_bytes(tmp_path):
    manifest = Dpkg().manifest(build_root(tmp_path).root)
    entry = manifest.get(b"/usr/share/spacey/caf\xe9 \xff.txt")
    assert entry.digest == Digest("md5", md5hex(b"latin-1 name"))


def test_fake_config_files_package_owns_nothing(tmp_path):
    root = build_root(tmp_path)
    manifest = Dpkg().manifest(root.root)
    assert os.path.exists(root.path(b"/etc/removed.conf"))
    assert b"/etc/removed.conf" not in manifest
    assert "removed" not in {p.name for p in Dpkg().packages(root.root)}


def test_fake_package_diversion_moves_other_packages_file_and_keeps_the_diverters(tmp_path):
    root = build_root(tmp_path)
    manifest = Dpkg().manifest(root.root)
    # alt-shell's /bin/sh was installed as /bin/sh.orig; shell's own /bin/sh stays.
    alternative = Digest("md5", md5hex(b"alternative shell"))
    assert manifest.get(b"/usr/bin/sh.orig") == Entry(FILE, "alt-shell", alternative, False, None)
    assert file_md5(root.path(b"/usr/bin/sh.orig")) == md5hex(b"alternative shell")
    assert manifest.get(b"/usr/bin/sh").package == "shell"
    assert manifest.get(b"/usr/bin/sh").digest == Digest("md5", md5hex(b"real shell"))


def test_fake_local_diversion_leaves_the_original_name_to_the_admin(tmp_path):
    root = build_root(tmp_path)
    manifest = Dpkg().manifest(root.root)
    assert b"/usr/bin/editor" not in manifest
    assert manifest.get(b"/usr/bin/editor.packaged").package == "editor"
    assert os.path.isfile(root.path(b"/usr/bin/editor.packaged"))


def test_fake_garbage_list_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path):
    root = build_root(tmp_path)
    with open(root.admin(b"info", b"tool.list"), "ab") as f:
        f.write(b"usr/bin/relative\n/usr/bin/after-garbage\n")
    lines = open(root.admin(b"info", b"tool.list"), "rb").read().split(b"\n")
    manifest = Dpkg().manifest(root.root)
    lineno = lines.index(b"usr/bin/relative") + 1
    assert any("tool.list" in w and f"line {lineno}" in w for w in manifest.warnings), manifest.warnings
    assert b"/usr/bin/after-garbage" in manifest
    assert not any(b"relative" in p for p in manifest if p != b"/usr/bin/after-garbage")


def test_fake_garbage_md5sums_line_leaves_that_file_without_digest(tmp_path):
    root = build_root(tmp_path)
    md5sums = root.admin(b"info", b"tool.md5sums")
    good = open(md5sums, "rb").read()
    with open(md5sums, "wb") as f:
        f.write(b"0123456789abcdef  bin/tool\n" + good.replace(b"  bin/tool\n", b"  \n"))
    manifest = Dpkg().manifest(root.root)
    assert any("tool.md5sums, line 1" in w for w in manifest.warnings), manifest.warnings
    assert manifest.get(b"/usr/bin/tool") == Entry(None, "tool", None, False, None)
    assert manifest.get(b"/usr/sbin/tool-admin").digest == Digest("md5", md5hex(b"admin"))


def files_and_excludes(jwbackup, root: DebianRoot, tmp_path) -> tuple[list[bytes], list[bytes]]:
    """The system paths ``jwbackup files`` lists and those ``jwbackup excludes`` leaves out."""
    cfg = tmp_path / "jwbackup.yaml"
    cfg.write_text("root: [/]\n")
    listed = jwbackup("-c", cfg, "--root", root.root, "files", "-0")
    rules = jwbackup("-c", cfg, "--root", root.root, "excludes", "--format", "rsync", "-0")
    assert listed.returncode == 0 and rules.returncode == 0, listed.stderr + rules.stderr
    return ([p[len(root.root):] for p in listed.stdout.split(b"\0") if p],
            [r[len(b"- "):] for r in rules.stdout.split(b"\0") if r])


def test_fake_file_without_a_readable_md5_is_backed_up_and_not_excluded(jwbackup, tmp_path):
    """Garbage in the database may make a file be backed up needlessly, never left out."""
    root = build_root(tmp_path)
    root.package("nosums", files={b"/usr/bin/nosums": b"built without md5sums"}, md5sums=False)
    root.write()
    md5sums = root.admin(b"info", b"tool.md5sums")
    with open(md5sums, "rb") as f:
        good = f.read()
    with open(md5sums, "wb") as f:
        f.write(good.replace(b"  bin/tool\n", b" bin/tool\n"))  # one space: not dpkg's format
    for path in (b"/usr/bin/nosums", b"/usr/bin/tool"):
        with open(root.path(path), "ab") as f:
            f.write(b" changed by the admin")
    selected, excluded = files_and_excludes(jwbackup, root, tmp_path)
    assert b"/usr/bin/nosums" in selected and b"/usr/bin/tool" in selected
    assert b"/usr/bin/nosums" not in excluded and b"/usr/bin/tool" not in excluded
    assert b"/usr/sbin/tool-admin" in excluded and b"/usr/sbin/tool-admin" not in selected


def test_fake_md5sums_paths_starting_with_dot_slash_are_verified_as_dpkg_reads_them(jwbackup, tmp_path):
    root = build_root(tmp_path)
    md5sums = root.admin(b"info", b"tool.md5sums")
    with open(md5sums, "rb") as f:
        good = f.read()
    with open(md5sums, "wb") as f:  # dpkg --verify accepts both
        f.write(good.replace(b"  bin/tool\n", b"  ./bin/tool\n").replace(b"  sbin/", b"  .//sbin/"))
    with open(root.path(b"/usr/sbin/tool-admin"), "ab") as f:
        f.write(b" changed by the admin")
    selected, excluded = files_and_excludes(jwbackup, root, tmp_path)
    assert b"/usr/bin/tool" not in selected and b"/usr/bin/tool" in excluded
    assert b"/usr/sbin/tool-admin" in selected and b"/usr/sbin/tool-admin" not in excluded
    assert Dpkg().manifest(root.root).warnings == []


def test_fake_garbage_md5sums_line_is_warned_about_once(jwbackup, tmp_path):
    root = build_root(tmp_path)
    with open(root.admin(b"info", b"tool.md5sums"), "ab") as f:
        f.write(b"not an md5  usr/bin/garbage\n")
    cfg = tmp_path / "jwbackup.yaml"
    cfg.write_text("root: [/]\n")
    for run in (1, 2):  # the manifest read, then perhaps kept from the first run
        result = jwbackup("-c", cfg, "--root", root.root, "-l", "-", "files")
        assert result.returncode == 0, result.stderr
        assert result.stderr.count(b"tool.md5sums, line") == 1, (run, result.stderr)


def test_fake_installed_package_without_list_is_a_warning(tmp_path):
    root = build_root(tmp_path)
    os.unlink(root.admin(b"info", b"editor.list"))
    manifest = Dpkg().manifest(root.root)
    assert any("editor" in w and ".list" in w for w in manifest.warnings)
    assert b"/usr/bin/editor.packaged" not in manifest


def test_missing_status_file_is_a_manifest_error_naming_it(tmp_path):
    root = build_root(tmp_path)
    os.unlink(root.admin(b"status"))
    assert not Dpkg().detect(root.root)
    with pytest.raises(ManifestError, match="var/lib/dpkg/status"):
        Dpkg().manifest(root.root)


def test_fake_packages_report_version_architecture_and_manual(tmp_path):
    root = build_root(tmp_path)
    packages = {p.name: p for p in Dpkg().packages(root.root)}
    assert set(packages) == {"tool", "libfoo1", "spacey", "shell", "alt-shell", "editor"}
    assert packages["alt-shell"].version == "2.0" and packages["alt-shell"].architecture == "amd64"
    assert not packages["libfoo1"].manual
    assert packages["tool"].manual


def test_dpkg_plugin_is_found_through_its_entry_point(tmp_path):
    root = build_root(tmp_path)
    assert managers.available()["dpkg"] is Dpkg
    assert isinstance(managers.detect(os.fsdecode(root.root), name="dpkg"), Dpkg)
    assert Dpkg().detect(os.fsdecode(root.root))

"""What the walk keeps and leaves out, through ``jwbackup files`` on fake roots."""

from __future__ import annotations

import os
import textwrap

import pytest

from fakeroot import DebianRoot
from jwbackup.select import CACHEDIR_SIGNATURE


@pytest.fixture
def root(tmp_path):
    root = DebianRoot(tmp_path / "system", usrmerge=True)
    root.package(
        "tool",
        files={
            b"/usr/bin/tool": b"tool",
            b"/bin/legacy": b"listed under /bin, lives in /usr/bin",
            b"/usr/share/tool/data": b"data",
            b"/etc/tool.conf": b"x = 1\n",
        },
        symlinks={b"/usr/bin/t": b"tool"},
        conffiles=[b"/etc/tool.conf"],
    )
    root.write()
    return root


def files(jwbackup, root, tmp_path, roots=("/",), extra="", *args):
    cfg = tmp_path / "jwbackup.yaml"
    cfg.write_text("root: [%s]\n%s" % (", ".join(roots), extra))
    result = jwbackup("-c", cfg, "--root", root.root, "files", "-0", *args)
    assert result.returncode == 0, result.stderr
    prefix = root.root
    return [p[len(prefix):] or b"/" for p in result.stdout.split(b"\0")[:-1]]


def put(root, path: bytes, content: bytes = b"mine") -> bytes:
    real = root.path(path)
    os.makedirs(os.path.dirname(real), exist_ok=True)
    with open(real, "wb") as f:
        f.write(content)
    return real


def test_installed_files_are_left_out_and_the_admins_kept(jwbackup, root, tmp_path):
    put(root, b"/usr/bin/mine")
    put(root, b"/home/alice/a")
    selected = files(jwbackup, root, tmp_path)
    assert b"/usr/bin/mine" in selected and b"/home/alice/a" in selected
    for owned in (b"/usr/bin/tool", b"/usr/bin/legacy", b"/usr/bin/t", b"/usr/share/tool/data", b"/etc/tool.conf"):
        assert owned not in selected
    # the usrmerge symlinks themselves are not package content: kept
    assert b"/bin" in selected
    assert len(selected) == len(set(selected))


def test_owned_directories_appear_only_to_hold_something(jwbackup, root, tmp_path):
    put(root, b"/usr/share/tool/local-note")
    selected = files(jwbackup, root, tmp_path)
    i = selected.index(b"/usr/share/tool/local-note")
    # parents come first, in order, right before what they hold
    assert selected[i - 3 : i] == [b"/usr", b"/usr/share", b"/usr/share/tool"]
    assert b"/usr/bin" not in selected  # owned, and holds nothing kept


def test_modified_conffile_and_changed_kind_are_kept(jwbackup, root, tmp_path):
    put(root, b"/etc/tool.conf", b"x = 2\n")
    # dpkg records a regular file's md5, so a symlink in its place is a change
    os.unlink(root.path(b"/usr/share/tool/data"))
    os.symlink(b"/srv/elsewhere", root.path(b"/usr/share/tool/data"))
    selected = files(jwbackup, root, tmp_path)
    assert b"/etc/tool.conf" in selected
    assert b"/usr/share/tool/data" in selected


def test_prune_no_backup_cachedir_tag_are_skipped(jwbackup, root, tmp_path):
    put(root, b"/srv/pruned/a")
    put(root, b"/srv/marked/a")
    put(root, b"/srv/marked/.no-backup", b"")
    put(root, b"/srv/cache/a")
    put(root, b"/srv/cache/CACHEDIR.TAG", CACHEDIR_SIGNATURE + b"\n# a cache\n")
    put(root, b"/srv/fake-cache/a")
    put(root, b"/srv/fake-cache/CACHEDIR.TAG", b"not the signature")
    put(root, b"/srv/kept/a")
    selected = files(jwbackup, root, tmp_path, ["/srv"], "prune: [/srv/pruned]\n")
    assert b"/srv/kept/a" in selected
    assert b"/srv/fake-cache/a" in selected
    for gone in (b"/srv/pruned", b"/srv/marked", b"/srv/cache"):
        assert not [p for p in selected if p == gone or p.startswith(gone + b"/")], gone


def test_default_prune_list_applies_when_absent(jwbackup, root, tmp_path):
    put(root, b"/tmp/scratch")
    put(root, b"/var/cache/apt/pkgcache.bin")
    put(root, b"/var/lib/app/state")
    selected = files(jwbackup, root, tmp_path)
    assert b"/var/lib/app/state" in selected
    assert not [p for p in selected if p.startswith((b"/tmp", b"/var/cache"))]


def test_symlinks_are_not_followed(jwbackup, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not part of the system")
    os.makedirs(root.path(b"/srv"))
    os.symlink(outside, root.path(b"/srv/escape"))
    selected = files(jwbackup, root, tmp_path, ["/srv"])
    assert selected == [b"/srv", b"/srv/escape"]


def test_nested_roots_yield_each_path_once(jwbackup, root, tmp_path):
    put(root, b"/home/alice/a")
    selected = files(jwbackup, root, tmp_path, ["/home", "/home/alice", "/home"])
    assert selected == [b"/home", b"/home/alice", b"/home/alice/a"]


def test_no_dirs_lists_leaves_for_recursing_tools(jwbackup, root, tmp_path):
    put(root, b"/home/alice/a")
    os.makedirs(root.path(b"/home/empty"))
    selected = files(jwbackup, root, tmp_path, ["/home"], "", "--no-dirs")
    assert sorted(selected) == [b"/home/alice/a", b"/home/empty"]


def test_newline_names_need_null_separation(jwbackup, root, tmp_path):
    put(root, b"/home/new\nline")
    cfg = tmp_path / "nl.yaml"
    cfg.write_text("root: [/home]\n")
    text = jwbackup("-c", cfg, "--root", root.root, "files")
    assert text.returncode == 1  # the list is incomplete: a pipeline with pipefail must not carry on
    assert b"new\nline" not in text.stdout
    assert b"hold a newline" in text.stderr
    assert b"/home/new\nline" in files(jwbackup, root, tmp_path, ["/home"])


def test_a_third_party_manager_plugin_is_found_through_its_entry_point(jwbackup, tmp_path):
    """A package manager plugin installed as its own distribution is discovered and used."""
    site = tmp_path / "site"
    (site / "toypm_jwbackup").mkdir(parents=True)
    (site / "toypm_jwbackup" / "__init__.py").write_text(textwrap.dedent('''
        import os
        from jwbackup.managers import FILE, Entry, Manifest, Package

        class ToyPM:
            name = "toypm"
            def detect(self, root):
                return os.path.exists(os.path.join(root, "var/lib/toypm/db"))
            def manifest(self, root):
                with open(os.path.join(root, "var/lib/toypm/db"), "rb") as f:
                    paths = f.read().split()
                return Manifest({p: Entry(FILE, "toy") for p in paths})
            def packages(self, root):
                return [Package("toy", "1.0")]
    '''))
    dist = site / "toypm_jwbackup-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toypm-jwbackup\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[jwbackup.managers]\ntoypm = toypm_jwbackup:ToyPM\n")
    system = tmp_path / "system"
    for path in ("usr/bin/toy", "usr/bin/mine", "var/lib/toypm/db"):
        os.makedirs(system / os.path.dirname(path), exist_ok=True)
        (system / path).write_text("x")
    (system / "var/lib/toypm/db").write_text("/usr/bin/toy\n/var/lib/toypm/db\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("root: [/usr]\n")
    result = jwbackup("-c", cfg, "--root", system, "-L", "INFO", "-l", "-", "files", env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [os.fsencode(system / p) for p in ("usr", "usr/bin", "usr/bin/mine")]
    assert b"toypm manifest: 2 paths" in result.stderr


def test_a_package_directory_moved_away_and_linked_back_is_kept_and_not_excluded(jwbackup, tmp_path):
    """dpkg's lists say nothing of kinds: an empty package directory replaced by
    a symlink would pass for a symlink the package shipped."""
    root = DebianRoot(tmp_path / "system")
    root.package("db", dirs=[b"/var/lib/db"], symlinks={b"/usr/lib/libdb.so": b"libdb.so.1"},
                 files={b"/usr/lib/libdb.so.1": b"ELF"})
    root.package("db-data", dirs=[b"/srv/db"])
    root.write()
    os.rmdir(root.path(b"/var/lib/db"))
    put(root, b"/srv/db/table", b"rows")
    os.symlink(b"/srv/db", root.path(b"/var/lib/db"))  # absolute: resolved inside the root, not on this host
    selected = files(jwbackup, root, tmp_path)
    assert b"/var/lib/db" in selected and b"/srv/db/table" in selected
    assert b"/usr/lib/libdb.so" not in selected  # a symlink to a file: the package's
    cfg = tmp_path / "jwbackup.yaml"
    result = jwbackup("-c", cfg, "--root", root.root, "excludes", "--format", "rsync", "-0")
    assert result.returncode == 0, result.stderr
    rules = result.stdout.split(b"\0")
    assert not [r for r in rules if r.endswith(b"/var/lib/db")] and [r for r in rules if r.endswith(b"/libdb.so")]


def excluded(jwbackup, root, tmp_path) -> list[bytes]:
    """The system paths ``jwbackup excludes --format rsync`` leaves out (the config of the last :func:`files`)."""
    result = jwbackup("-c", tmp_path / "jwbackup.yaml", "--root", root.root, "excludes", "--format", "rsync", "-0")
    assert result.returncode == 0, result.stderr
    return [rule[len(b"- "):] for rule in result.stdout.split(b"\0") if rule]


def test_a_regular_file_where_dpkg_installed_a_symlink_or_directory_is_kept_and_not_excluded(jwbackup, tmp_path):
    """dpkg lists symlinks and directories without an md5: a regular file in
    their place has nothing to be verified against, and is the admin's."""
    root = DebianRoot(tmp_path / "system", usrmerge=True)
    root.package("base-files", files={b"/usr/lib/os-release": b"NAME=Debian\n"},
                 symlinks={b"/etc/os-release": b"../usr/lib/os-release", b"/etc/issue.net": b"../usr/lib/os-release"},
                 dirs=[b"/etc/app.d"])
    root.write()
    os.unlink(root.path(b"/etc/os-release"))
    put(root, b"/etc/os-release", b"NAME=Mine\n")
    os.rmdir(root.path(b"/etc/app.d"))
    put(root, b"/etc/app.d", b"a file where the package had an empty directory\n")
    selected = files(jwbackup, root, tmp_path)
    assert b"/etc/os-release" in selected and b"/etc/app.d" in selected
    assert b"/etc/issue.net" not in selected and b"/usr/lib/os-release" not in selected  # the package's
    rules = excluded(jwbackup, root, tmp_path)
    assert b"/etc/os-release" not in rules and b"/etc/app.d" not in rules
    assert b"/etc/issue.net" in rules and b"/usr/lib/os-release" in rules


def test_a_package_directory_linked_to_a_target_not_there_now_is_kept_and_not_excluded(jwbackup, tmp_path):
    """/var/lib/db linked to /srv/db while /srv/db is not mounted: restored, the link must be there."""
    root = DebianRoot(tmp_path / "system")
    root.package("db", dirs=[b"/var/lib/db"], symlinks={b"/usr/lib/libdb.so": b"libdb.so.1"},
                 files={b"/usr/lib/libdb.so.1": b"ELF"})
    root.write()
    os.rmdir(root.path(b"/var/lib/db"))
    os.symlink(b"/srv/db", root.path(b"/var/lib/db"))
    selected = files(jwbackup, root, tmp_path)
    assert b"/var/lib/db" in selected
    assert b"/usr/lib/libdb.so" not in selected
    rules = excluded(jwbackup, root, tmp_path)
    assert b"/var/lib/db" not in rules and b"/usr/lib/libdb.so" in rules

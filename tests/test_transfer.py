"""The local linker builds exactly the generations ``rsync -aHAX --link-dest`` builds.

Two chains of generations are built from the same source tree through a
sequence of changes, one by the real rsync command line of ``jwbackup.rsync``
and one by ``jwbackup.transfer.linker``, and compared after every step:
content, mode, owner, mtime (directories and symlinks too), xattrs, ACLs,
symlink targets, device numbers, which paths share an inode within the
generation and which are shared with each earlier generation.  Earlier
generations must stay exactly as they were.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Iterator

import pytest

from backupenv import System
from jwbackup import rsync
from jwbackup.managers import Manifest
from jwbackup.select import Selector
from jwbackup.transfer import LINKER, PREVIEW, REMOTE, RSYNC, choose, probe_filesystem
from jwbackup.repository import Repository
from jwbackup.transfer import remote
from jwbackup.transfer.linker import Linker, _helpers_share, _parts, build, read_attrs
from jwbackup.transport import Local

MTIME = 1_600_000_000_123_456_789
HOSTILE = [b"new\nline", b"latin1-\xe9t\xe9", b"-leading-dash", b"with space", b"tab\there"]


# --- building both ways -------------------------------------------------------------


UNLISTED = (b"/top-file", b"/top-dir")  # left out of the selection, yet brought by "/" (see linker._root)


def selection(src: Path) -> list[bytes]:
    return [p for p in Selector(Manifest(), os.fsencode(src)).select(["/"])
            if not any(p == u or p.startswith(u + b"/") for u in UNLISTED)]


def settle(src: Path) -> None:
    """Give every entry touched in the last minute a fixed old mtime.

    rsync compares whole seconds (--modify-window=0) and leaves a directory,
    symlink or special file with the time it got on creation when that falls
    in the same second as the source's: a source time of "now" makes rsync's
    own result depend on the clock.
    """
    recent = time.time() - 60
    for i, (rel, st) in enumerate(sorted(entries(src).items())):
        if st.st_mtime > recent:
            path = os.fsencode(src) + (rel if rel != b"/" else b"")
            t = MTIME - 10_000_000_000_000 + i * 1_000_000_007
            os.utime(path, ns=(t, t), follow_symlinks=False)


def build_rsync(src: Path, target: Path, link_dests: list[Path], paths: list[bytes]) -> rsync.Result:
    """rsync on the whole selection, counted as a run counts it."""
    argv = rsync.make_command(str(src), str(target), [str(d) for d in link_dests])
    tally = rsync.Tally(src)
    result = rsync.transfer(argv, tally.listed(paths))
    tally.into(result.stats)
    return result


def build_linker(src: Path, target: Path, link_dests: list[Path], paths: list[bytes],
                 helper: bool | None = None) -> rsync.Result:
    return build(str(src), paths, str(target), [str(d) for d in link_dests], helper=helper)


def build_linker_alone(src: Path, target: Path, link_dests: list[Path], paths: list[bytes]) -> rsync.Result:
    return build_linker(src, target, link_dests, paths, helper=False)


def build_linker_helped(src: Path, target: Path, link_dests: list[Path], paths: list[bytes]) -> rsync.Result:
    """With a helper process from the first entry on, whatever the machine."""
    return build_linker(src, target, link_dests, paths, helper=True)


STARTED: dict[Path, int] = {}  # when each generation's build started, as a run records it


def build_remote(src: Path, target: Path, link_dests: list[Path], paths: list[bytes]) -> rsync.Result:
    """What a run to an ssh destination does, through a local transport: the first
    generation by rsync, the later ones from a hard-linked copy of the newest."""
    STARTED[target] = time.time_ns()
    if not link_dests:
        return build_rsync(src, target, link_dests, paths)
    repo = Repository(Local(), str(target.parent))
    argv = rsync.make_command(str(src), str(target), [str(d) for d in link_dests])
    tally = rsync.Tally(src)
    result = remote.build(repo, os.fsencode(src), paths, link_dests[0].name, target.name, STARTED[link_dests[0]],
                          lambda listed: rsync.transfer(argv, listed), tally)
    tally.into(result.stats)
    return result


# --- what a generation is -----------------------------------------------------------


def entries(top: Path) -> dict[bytes, os.stat_result]:
    top = os.fsencode(top)
    found = {b"/": os.lstat(top)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[path[len(top):]] = os.lstat(path)
    return found


def describe(top: Path) -> dict[bytes, tuple]:
    """Every entry's content and metadata, inode numbers left out."""
    top_b = os.fsencode(top)
    result = {}
    for rel, st in entries(top).items():
        path = top_b + (rel if rel != b"/" else b"")
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                content = f.read()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            content = st.st_rdev
        else:
            content = None
        result[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                       st.st_mtime_ns, content, sorted(read_attrs(path).items()))
    return result


def structure(gens: list[Path]) -> tuple[list, dict]:
    """Which paths share an inode in the newest generation, and which of its paths
    share their inode with each earlier generation (by path there)."""
    newest = entries(gens[-1])
    groups: dict[int, list[bytes]] = {}
    for rel, st in newest.items():
        if not stat.S_ISDIR(st.st_mode):
            groups.setdefault(st.st_ino, []).append(rel)
    inside = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    shared = {}
    for i, gen in enumerate(gens[:-1]):
        by_ino: dict[int, list[bytes]] = {}
        for rel, st in entries(gen).items():
            by_ino.setdefault(st.st_ino, []).append(rel)
        shared[i] = sorted((rel, sorted(by_ino[st.st_ino])) for rel, st in newest.items() if st.st_ino in by_ino)
    return inside, shared


def frozen(top: Path) -> dict:
    """An earlier generation as it must stay: description plus inode numbers."""
    return {rel: (desc, os.lstat(os.fsencode(top) + (rel if rel != b"/" else b"")).st_ino)
            for rel, desc in describe(top).items()}


# --- the source tree and its changes ------------------------------------------------


def write(path: Path, content: bytes, mode=0o644, mtime=MTIME, owner=(0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.chown(path, *owner)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime, mtime))


def setfacl(*args) -> None:
    subprocess.run(["setfacl", *map(os.fsdecode, args)], check=True)


def keep_mtime(path: Path, change) -> None:
    st = os.lstat(path)
    change()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def initial(src: Path) -> None:
    write(src / "etc/hostname", b"box\n")
    write(src / "etc/same-size", b"aaaa\n")
    write(src / "etc/same-size-chmod", b"bbbb\n")
    write(src / "etc/chmod", b"c\n")
    write(src / "etc/chown", b"o\n", owner=(1234, 5678))
    write(src / "etc/xattr", b"x\n")
    os.setxattr(src / "etc/xattr", "user.colour", b"blue")
    os.setxattr(src / "etc/xattr", "trusted.level", b"1")
    write(src / "etc/acl", b"a\n")
    setfacl("-m", "u:4321:r", src / "etc/acl")
    write(src / "etc/mtime", b"m\n")
    write(src / "etc/mtime-seconds", b"m\n")
    write(src / "top-file", b"top\n")
    write(src / "top-dir/inside", b"not brought\n")
    write(src / "listed-top", b"listed\n")
    write(src / "etc/secret", b"s\n", mode=0o4750, owner=(0, 42))
    write(src / "home/alice/notes", b"notes\n" * 1000, owner=(1000, 1000))
    for name in HOSTILE:
        write(src / "home/alice" / os.fsdecode(name), name, owner=(1000, 1000))
    write(src / "srv/was-file", b"file\n")
    write(src / "srv/was-dir/inner", b"inner\n")
    os.symlink("target", src / "srv/was-link")
    os.symlink("/etc/hostname", src / "srv/link")
    os.lchown(src / "srv/link", 7, 8)
    os.utime(src / "srv/link", ns=(MTIME, MTIME), follow_symlinks=False)
    (src / "srv/empty").mkdir()
    os.mkfifo(src / "srv/fifo")
    os.mknod(src / "srv/null", 0o640 | stat.S_IFCHR, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fsdecode(src / "srv/socket"))
    sock.close()
    write(src / "srv/group/a", b"shared\n")
    os.link(src / "srv/group/a", src / "srv/group/b")
    os.link(src / "srv/group/a", src / "srv/other-group-member")
    write(src / "srv/split/a", b"one\n")
    os.link(src / "srv/split/a", src / "srv/split/b")
    write(src / "srv/forming/a", b"form\n")
    write(src / "srv/forming/b", b"form\n")
    write(src / "srv/leader/z", b"lead\n")
    write(src / "srv/leader/sub/x", b"LEAD\n")
    write(src / "srv/deleted-later", b"gone soon\n")
    write(src / "srv/comes-back", b"back\n")
    (src / "srv/default-acl").mkdir()
    setfacl("-d", "-m", "u:4321:rwx", src / "srv/default-acl")
    write(src / "srv/default-acl/file", b"inherits nothing in a backup\n")
    write(src / "var/ro/file", b"ro\n")
    os.chmod(src / "var/ro", 0o500)
    os.chown(src / "var/ro", 99, 99)
    (src / "var/sticky").mkdir()
    os.chmod(src / "var/sticky", 0o1777)
    os.setxattr(src / "var/sticky", "user.dir", b"attr")
    for d in ["etc", "home/alice", "srv/group", "var"]:
        os.utime(src / d, ns=(MTIME + 5, MTIME + 5))


def step_changes(src: Path) -> None:
    """Every kind of change jwbackup must back up as rsync does."""
    write(src / "etc/hostname", b"box2\nlonger\n")  # content and size
    keep_mtime(src / "etc/same-size", lambda: (src / "etc/same-size").write_bytes(b"AAAA\n"))

    def content_and_mode():
        (src / "etc/same-size-chmod").write_bytes(b"BBBB\n")
        os.chmod(src / "etc/same-size-chmod", 0o600)
    keep_mtime(src / "etc/same-size-chmod", content_and_mode)
    keep_mtime(src / "etc/chmod", lambda: os.chmod(src / "etc/chmod", 0o600))
    keep_mtime(src / "etc/chown", lambda: os.chown(src / "etc/chown", 1234, 9999))
    keep_mtime(src / "etc/xattr", lambda: os.setxattr(src / "etc/xattr", "user.colour", b"red"))
    keep_mtime(src / "etc/acl", lambda: setfacl("-m", "u:4321:rw", src / "etc/acl"))
    os.utime(src / "etc/mtime", ns=(MTIME, MTIME + 1))  # nanoseconds only: rsync sees no change
    os.utime(src / "etc/mtime-seconds", ns=(MTIME, MTIME + 2_000_000_000))
    # type changes
    (src / "srv/was-file").unlink()
    (src / "srv/was-file").mkdir()
    write(src / "srv/was-file/now-inside", b"inside\n")
    (src / "srv/was-dir/inner").unlink()
    (src / "srv/was-dir").rmdir()
    os.symlink("elsewhere", src / "srv/was-dir")
    (src / "srv/was-link").unlink()
    write(src / "srv/was-link", b"was a link\n")
    # hard-link groups
    (src / "srv/split/b").unlink()
    write(src / "srv/split/b", b"one\n")
    (src / "srv/forming/b").unlink()
    os.link(src / "srv/forming/a", src / "srv/forming/b")
    (src / "srv/deleted-later").unlink()
    (src / "srv/comes-back").rename(src / "comes-back.away")
    # leader order: z (a file) precedes sub/x (in a directory): z decides
    write(src / "srv/leader/z", b"LEAD\n")
    os.link(src / "srv/leader/z", src / "srv/leader/sub/x.new")
    os.rename(src / "srv/leader/sub/x.new", src / "srv/leader/sub/x")
    write(src / "srv/new-dir/new-file", b"new\n")
    (src / "srv/new-empty").mkdir()
    os.utime(src / "srv/fifo", ns=(MTIME, MTIME))
    os.unlink(src / "srv/null")
    os.mknod(src / "srv/null", 0o640 | stat.S_IFCHR, os.makedev(1, 5))


def step_more(src: Path) -> None:
    """Back from two generations ago, symlink retargeted at the same mtime, group splits."""
    (src / "comes-back.away").rename(src / "srv/comes-back")
    link = src / "srv/link"
    st = os.lstat(link)
    link.unlink()
    os.symlink("/etc/other", link)
    os.lchown(link, 7, 8)
    os.utime(link, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    (src / "srv/group/b").unlink()
    write(src / "srv/group/b", b"shared\n")
    keep_mtime(src / "var/ro/file", lambda: os.chmod(src / "var/ro/file", 0o400))
    keep_mtime(src / "srv/other-group-member", lambda: os.chmod(src / "srv/other-group-member", 0o600))


def step_none(src: Path) -> None:
    pass


# --- the differential test --------------------------------------------------------------


@pytest.fixture
def world(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    initial(src)
    return tmp_path, src


def test_linker_and_remote_build_what_rsync_link_dest_builds_through_every_kind_of_change(world, caplog):
    tmp, src = world
    builders = {"rsync": build_rsync, "linker": build_linker_alone, "helped": build_linker_helped,
                "remote": build_remote}
    chains = {way: [] for way in builders}
    time.sleep(remote.MARGIN_NS / 1e9)  # the initial tree is older than the margin: keepable from the start
    caplog.set_level("INFO", logger="jwbackup.transfer.remote")
    for step, change in enumerate([step_none, step_changes, step_more, step_none]):
        change(src)
        settle(src)
        if step == 2:
            time.sleep(remote.MARGIN_NS / 1e9)  # so that step 3 finds nothing changed near gen2's start
        paths = selection(src)
        before = {way: [frozen(g) for g in gens] for way, gens in chains.items()}
        results = {}
        for way, gens in chains.items():
            target = tmp / way / f"gen{step}"
            target.parent.mkdir(exist_ok=True)
            results[way] = result = builders[way](src, target, list(reversed(gens[-2:])), paths)
            assert result.returncode == 0, (way, step, result.errors)
            gens.append(target)
        assert results["helped"].stats == results["linker"].stats, step
        for way, result in results.items():  # what `jwbackup list` shows: entries and bytes it holds
            held = entries(chains[way][-1]).values()
            assert (result.stats.files, result.stats.regular_files, result.stats.total_size) == (
                len(held), sum(map(stat.S_ISREG, (st.st_mode for st in held))),
                sum(st.st_size for st in held if stat.S_ISREG(st.st_mode))), (way, step)
        r = chains["rsync"]
        for way in ("linker", "helped", "remote"):
            assert describe(chains[way][-1]) == describe(r[-1]), f"{way}, step {step}"
            assert structure(chains[way]) == structure(r), f"{way}, step {step}"
        for way, gens in chains.items():
            assert [frozen(g) for g in gens[:-1]] == before[way], f"{way} changed an earlier generation at step {step}"
    kept = [int(m.group(1)) for m in re.finditer(r"(\d+) unchanged entries kept", caplog.text)]
    # an unchanged run over ssh hands rsync the directories only
    assert len(kept) == 3 and kept[-1] == sum(not os.path.isdir(os.fsencode(src) + p) for p in paths) > 20, kept
    last = chains["linker"]
    # what rsync's quick check does, spelled out: same size and mtime is "unchanged"
    assert (last[1] / "etc/same-size").read_bytes() == b"aaaa\n"
    assert os.lstat(last[1] / "etc/same-size").st_ino == os.lstat(last[0] / "etc/same-size").st_ino
    # ... and a mode change on such a file copies the earlier generation's content
    assert (last[1] / "etc/same-size-chmod").read_bytes() == b"bbbb\n"
    assert os.lstat(last[1] / "etc/same-size-chmod").st_mode & 0o777 == 0o600
    assert os.lstat(last[1] / "etc/same-size-chmod").st_ino != os.lstat(last[0] / "etc/same-size-chmod").st_ino
    # nanoseconds alone are no change to rsync: linked, the earlier time kept
    assert os.lstat(last[1] / "etc/mtime").st_ino == os.lstat(last[0] / "etc/mtime").st_ino
    assert os.lstat(last[1] / "etc/mtime").st_mtime_ns == MTIME
    assert os.lstat(last[1] / "etc/mtime-seconds").st_mtime_ns == MTIME + 2_000_000_000
    # a listed "/" brings what is directly in it, directories empty
    assert (last[0] / "top-file").read_bytes() == b"top\n"
    assert (last[0] / "top-dir").is_dir() and not (last[0] / "top-dir/inside").exists()
    # an unchanged second run shares every non-directory with the one before
    newest, previous = entries(last[3]), entries(last[2])
    for rel, st in newest.items():
        if not stat.S_ISDIR(st.st_mode):
            assert st.st_ino == previous[rel].st_ino, rel


def test_linker_never_follows_a_directory_replaced_by_a_symlink(tmp_path):
    src = tmp_path / "src"
    write(src / "data/file", b"mine\n")
    outside = tmp_path / "outside"
    write(outside / "file", b"not to be copied\n")
    paths = selection(src)
    (src / "data/file").unlink()
    (src / "data").rmdir()
    os.symlink(outside, src / "data")
    result = build_linker(src, tmp_path / "gen", [], paths)
    assert result.returncode == 24
    assert any("vanished" in line for line in result.errors)
    # the symlink itself is backed up (it is directly in "/"), nothing below it
    assert os.readlink(tmp_path / "gen/data") == str(outside)
    assert os.listdir(outside) == ["file"]
    assert (outside / "file").read_bytes() == b"not to be copied\n"


def test_a_directory_that_was_a_symlink_for_a_moment_is_a_vanished_warning_not_a_failure(tmp_path):
    """Placed while it was a symlink, a directory again when its files come: the run goes on."""
    src = tmp_path / "src"
    write(src / "d/f", b"in d\n")
    write(src / "e/g", b"in e\n")

    def walk():
        os.rename(src / "d", src / "d.moved")
        os.symlink(tmp_path / "elsewhere", src / "d")
        yield b"/d"
        os.unlink(src / "d")
        os.rename(src / "d.moved", src / "d")
        yield from (b"/d/f", b"/e", b"/e/g")

    result = build_linker_alone(src, tmp_path / "gen", [], walk())
    assert (result.returncode, result.committable) == (24, True)
    assert result.errors == ['file has vanished: "/d/f"']
    assert (tmp_path / "gen/e/g").read_bytes() == b"in e\n"


def test_a_default_acl_on_the_destination_reaches_no_generation_and_unchanged_files_still_link(tmp_path):
    """Files made under it would inherit entries the source's lack, and never match it again."""
    src = tmp_path / "src"
    write(src / "dir/file", b"data\n", mode=0o640)
    write(src / "top", b"top\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    setfacl("-d", "-m", "u:1234:rwx", dest)
    paths = selection(src)
    for gen, link_dests in (("gen1", []), ("gen2", [dest / "gen1"])):
        assert build_linker_alone(src, dest / gen, link_dests, paths).returncode == 0
        for path in ("", "dir", "dir/file", "top"):
            assert read_attrs(str(dest / gen / path)) == read_attrs(str(src / path)) == {}, (gen, path)
        assert stat.S_IMODE(os.lstat(dest / gen / "dir/file").st_mode) == 0o640
    for path in ("dir/file", "top"):
        assert os.lstat(dest / "gen1" / path).st_ino == os.lstat(dest / "gen2" / path).st_ino


def test_a_hard_link_group_larger_than_an_inode_can_take_is_split_not_a_failure(tmp_path):
    """Each generation adds its names to the inode linked from the one before;
    when the filesystem's link limit is reached, the rest get an inode of their own."""
    limit = os.pathconf(tmp_path, "PC_LINK_MAX")
    if limit > 70_000:
        pytest.skip(f"{limit} links per inode here: too many to reach in a test")
    src = tmp_path / "src"
    write(src / "hl/0", b"one inode, many names\n")
    names = limit * 2 // 3  # two generations' worth is more than one inode takes
    for i in range(1, names):
        os.link(src / "hl/0", src / f"hl/{i}")
    paths = selection(src)
    assert build_linker_alone(src, tmp_path / "gen1", [], paths).returncode == 0
    result = build_linker_alone(src, tmp_path / "gen2", [tmp_path / "gen1"], paths)
    assert (result.returncode, result.errors) == (0, [])
    inodes = {os.lstat(tmp_path / f"gen2/hl/{i}").st_ino for i in range(names)}
    assert len(inodes) == 2 and len(os.listdir(tmp_path / "gen2/hl")) == names
    assert (tmp_path / f"gen2/hl/{names - 1}").read_bytes() == b"one inode, many names\n"


@pytest.mark.parametrize("helper", [False, True], ids=["alone", "helped"])
def test_vanished_file_is_a_warning_like_rsync_exit_24(tmp_path, helper):
    src = tmp_path / "src"
    write(src / "here", b"1\n")
    write(src / "a/here", b"2\n")
    assert _helpers_share(_parts(b"/a/gone"))  # with a helper, the helper meets it
    paths = selection(src) + [b"/gone", b"/a/gone"]
    result = build_linker(src, tmp_path / "gen", [], paths, helper=helper)
    assert result.returncode == 24 and result.committable
    assert result.errors == ['file has vanished: "/gone"', 'file has vanished: "/a/gone"']
    assert (tmp_path / "gen/here").read_bytes() == b"1\n"
    assert (tmp_path / "gen/a/here").read_bytes() == b"2\n"


def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mnt`` while the test runs."""
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], check=True)
    yield mnt
    subprocess.run(["umount", "-l", mnt], check=False)


@pytest.fixture
def small(tmp_path):
    """A 1 MiB filesystem to fill up."""
    yield from tmpfs(tmp_path / "small", "1m")


def test_full_destination_fails_with_one_line_and_keeps_earlier_generation(tmp_path, small):
    src = tmp_path / "src"
    write(src / "small", b"1\n")
    assert build_linker(src, small / "g1", [], selection(src)).returncode == 0
    before = frozen(small / "g1")
    write(src / "big", os.urandom(2 << 20))
    result = build_linker(src, small / "g2", [small / "g1"], selection(src))
    assert not result.committable
    assert "No space left on device" in result.errors[0] and result.errors[0].startswith("linker: ")
    assert frozen(small / "g1") == before


@pytest.fixture
def other_filesystem(tmp_path):
    """A filesystem other than the source's, in tmp_path."""
    yield from tmpfs(tmp_path / "other", "64m")


def test_files_copied_to_another_filesystem_are_whole_and_as_rsync_copies_them(tmp_path, other_filesystem):
    """copy_file_range works within one filesystem; to another the linker copies with
    sendfile (or read/write), and every size comes out whole."""
    src = tmp_path / "src"
    sizes = [0, 1, 4095, 4096, 65537, (1 << 20) + 3, 3 << 20]
    for i, size in enumerate(sizes):
        write(src / f"d{i % 3}" / f"f{size}", os.urandom(size), mode=0o640 + i % 2)
    settle(src)
    assert os.stat(src).st_dev != os.stat(other_filesystem).st_dev
    paths = selection(src)
    assert build_linker(src, other_filesystem / "linker", [], paths).returncode == 0
    assert build_rsync(src, other_filesystem / "rsync", [], paths).returncode == 0
    linked = describe(other_filesystem / "linker")
    assert linked == describe(other_filesystem / "rsync")
    assert {len(linked[b"/d%d/f%d" % (i % 3, size)][5]) for i, size in enumerate(sizes)} == set(sizes)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def many_files(src: Path, dirs: int = 40, files: int = 10, size: int = 100) -> None:
    """400 new files in 40 directories, each with its own mode, owner and mtime."""
    for d in range(dirs):
        for f in range(files):
            write(src / f"d{d:02}/f{f}", os.urandom(size), mode=0o600 + f, owner=(d, f), mtime=MTIME + d * 10**9 + f)
    settle(src)


def test_many_new_files_build_what_rsync_builds_and_close_every_descriptor(tmp_path):
    src = tmp_path / "src"
    many_files(src)
    paths = selection(src)
    assert build_rsync(src, tmp_path / "by-rsync", [], paths).returncode == 0
    before = open_descriptors()
    result = build_linker(src, tmp_path / "by-linker", [], paths)
    assert result.returncode == 0 and result.stats.transferred == 400
    assert open_descriptors() == before
    assert describe(tmp_path / "by-linker") == describe(tmp_path / "by-rsync")


@pytest.mark.parametrize("helper", [False, True], ids=["alone", "helped"])
def test_a_destination_filling_up_while_files_are_copied_stops_the_build_with_one_line(tmp_path, small, helper):
    src = tmp_path / "src"
    many_files(src, size=8192)  # 3 MiB into 1 MiB
    before = open_descriptors()
    result = build_linker(src, small / "g1", [], selection(src), helper=helper)
    assert not result.committable
    assert "No space left on device" in result.errors[0] and result.errors[0].startswith("linker: ")
    assert open_descriptors() == before


def hard_links_across(src: Path) -> list[bytes]:
    """many_files, nested directories, and hard-link groups whose members lie in
    directories of both processes; the paths of their members."""
    many_files(src)
    for a in range(6):
        for b in range(6):
            write(src / f"n{a}/m{b}/f", b"%d %d\n" % (a, b), mode=0o600 + b)
        os.chmod(src / f"n{a}", 0o750)
    members = []
    for g in range(8):
        first = src / f"d{g:02}/f0"
        members.append(b"/d%02d/f0" % g)
        for d in range(g + 1, 40, 7):
            os.link(first, src / f"d{d:02}/link{g}")
            members.append(b"/d%02d/link%d" % (d, g))
    settle(src)
    return members


def test_a_helper_process_builds_what_one_process_and_rsync_build(tmp_path, caplog):
    """The helper places the entries of half of the directories: hard-link groups
    with members on both sides, directories made by both, and the counts, come
    out as one process and rsync make them."""
    src = tmp_path / "src"
    members = hard_links_across(src)
    shares = {_helpers_share(_parts(m)) for m in members}
    assert shares == {True, False}
    # directories handed to one process, with what is in them handed to the other
    assert {_helpers_share((b"n%d" % a, b"m%d" % b)) != _helpers_share((b"n%d" % a, b"m%d" % b, b"f"))
            for a in range(6) for b in range(6)} == {True, False}
    paths = selection(src)
    assert build_rsync(src, tmp_path / "rsync", [], paths).returncode == 0
    before = open_descriptors()
    alone = build_linker(src, tmp_path / "alone", [], paths, helper=False)
    caplog.set_level("DEBUG", logger="jwbackup.transfer.linker")
    helped = build_linker(src, tmp_path / "helped", [], paths, helper=True)
    assert "places the entries of half of the directories" in caplog.text
    assert alone.returncode == helped.returncode == 0, (alone.errors, helped.errors)
    assert open_descriptors() == before
    assert helped.stats == alone.stats and alone.stats.files == len(entries(tmp_path / "rsync"))
    expected = describe(tmp_path / "rsync")
    assert describe(tmp_path / "alone") == expected
    assert describe(tmp_path / "helped") == expected
    assert structure([tmp_path / "helped"]) == structure([tmp_path / "rsync"])
    # and linked against the first generation: nothing copied, every file shared
    assert build_rsync(src, tmp_path / "rsync-again", [tmp_path / "rsync"], paths).returncode == 0
    again = build_linker(src, tmp_path / "again", [tmp_path / "helped"], paths, helper=True)
    assert again.returncode == 0 and again.stats.transferred == 0
    assert structure([tmp_path / "helped", tmp_path / "again"]) == structure([tmp_path / "rsync", tmp_path / "rsync-again"])


def test_a_helper_process_that_cannot_start_leaves_the_build_to_the_main_process(tmp_path, caplog, monkeypatch):
    """An interpreter that cannot import jwbackup, say: the build goes on in one process."""
    from jwbackup.transfer import linker
    monkeypatch.setattr(linker, "_HELPER", "import sys; sys.exit(3)")
    src = tmp_path / "src"
    many_files(src)
    paths = selection(src)
    caplog.set_level("INFO", logger="jwbackup.transfer.linker")
    result = build_linker(src, tmp_path / "gen", [], paths, helper=True)
    assert result.returncode == 0 and result.stats.transferred == 400
    assert "the helper process did not start (exit status 3); one process places everything" in caplog.text
    assert build_rsync(src, tmp_path / "rsync", [], paths).returncode == 0
    assert describe(tmp_path / "gen") == describe(tmp_path / "rsync")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("halfway", ["helper killed", "interrupted"])
def test_a_helper_process_never_outlives_its_build(tmp_path, halfway):
    """A helper that dies fails the build with one line; a build interrupted
    (Ctrl-C) ends its helper.  No process or descriptor is left either way."""
    src = tmp_path / "src"
    many_files(src)
    paths = selection(src)
    linker = Linker(str(src), str(tmp_path / "gen"), helper=True)
    helpers = []

    def walk():
        rest = iter(paths)
        for path in rest:
            yield path
            if linker.helper_pid:  # it has started and takes paths
                break
            time.sleep(0.01)
        assert linker.helper_pid > 0  # kill(0) would end the test run
        helpers.append(linker.helper_pid)
        yield from islice(rest, 20)
        if halfway == "interrupted":
            raise KeyboardInterrupt
        os.kill(linker.helper_pid, signal.SIGKILL)
        yield from rest

    before = open_descriptors()
    if halfway == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            linker.build(walk())
    else:
        result = linker.build(walk())
        assert not result.committable
        assert result.errors[0] == "linker: the helper process ended without a report (killed by SIGKILL)"
    assert helpers and not alive(helpers[0])
    assert open_descriptors() == before


def test_choice_uses_the_linker_for_a_capable_local_filesystem_and_remote_after_a_recorded_run(tmp_path):
    from jwbackup.config import Destination

    local = Destination(directory=str(tmp_path))
    remote = Destination(directory=str(tmp_path), host="example.org")
    gen = tmp_path / "2024-01-01-00:00:00"
    gen.mkdir()
    target = str(tmp_path / "2024-01-02-00:00:00.partial")
    assert choose("auto", local, target, [str(gen)])[0] == LINKER
    assert choose("rsync", local, target, [str(gen)])[0] == RSYNC
    assert choose("auto", remote, target, [str(gen)])[0] == RSYNC  # no record of the previous run
    record = {"name": gen.name, "started_ns": 1, "source": "host:/"}
    assert choose("auto", remote, target, [str(gen)], previous=record, source="host:/")[0] == REMOTE
    assert choose("auto", remote, target, [str(gen)], previous=record, source="other:/")[0] == RSYNC
    assert choose("auto", remote, target, [str(gen)], previous={**record, "incomplete": True}, source="host:/")[0] == RSYNC
    assert choose("auto", remote, target, [str(gen)], previous={"name": gen.name}, source="host:/")[0] == RSYNC
    assert choose("auto", remote, target, [str(gen)], dry_run=True, previous=record, source="host:/")[0] == PREVIEW
    assert choose("auto", local, target, [str(gen)], dry_run=True, previous=record, source="host:/")[0] == PREVIEW
    assert choose("rsync", remote, target, [str(gen)], previous=record, source="host:/")[0] == RSYNC
    assert choose("rsync", local, target, [str(gen)], dry_run=True, previous=record, source="host:/")[0] == RSYNC
    assert choose("auto", local, target, [str(gen)], dry_run=True)[0] == RSYNC  # no record of the previous run
    assert choose("auto", local, target, [str(gen)], dry_run=True, previous=record, source="other:/")[0] == RSYNC
    assert choose("auto", local, target, [str(tmp_path)])[0] == RSYNC  # not a generation
    assert probe_filesystem(str(tmp_path)) is None
    assert os.listdir(tmp_path) == [gen.name]  # the probe left nothing behind
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm")) / gen.name
    try:
        elsewhere.mkdir()
        assert choose("auto", local, target, [str(elsewhere)]) == (RSYNC, f"{elsewhere} is on another filesystem")
    finally:
        shutil.rmtree(elsewhere.parent)


# --- end to end, through the jwbackup command ------------------------------------------


@pytest.mark.parametrize("over", ["local", "ssh"])
def test_jwbackup_with_transfer_auto_and_rsync_writes_identical_generations(jwbackup, tmp_path, over, request):
    destination = ""
    if over == "ssh":
        sshd = request.getfixturevalue("sshd")
        destination = (f"  host: 127.0.0.1\n  port: {sshd.port}\n  user: {sshd.user}\n  key: {sshd.key}\n"
                       f"  known_hosts: {sshd.known_hosts}\n")
    systems = {}
    for way in ("rsync", "auto"):
        (tmp_path / way).mkdir()
        system = System(tmp_path / way)
        system.configure(extra=f"transfer: {way}\n", destination=destination)
        systems[way] = system
    # the same source for both: the "auto" system backs up the "rsync" system's root
    source = systems["rsync"].root_dir
    srv = Path(source) / "srv"
    initial(srv)
    (Path(source) / "var/lib/jwbackup/packages").mkdir(parents=True, exist_ok=True)
    settle(Path(source))
    time.sleep(remote.MARGIN_NS / 1e9)  # older than the margin: an ssh run may keep it
    logs = {}

    def run_both():
        for way, system in systems.items():
            log = tmp_path / f"{way}.log"
            result = jwbackup("-c", system.config, "--root", source, log_file=log)
            assert result.returncode == 0, result.stderr.decode()
            logs[way] = log.read_text()

    run_both()
    step_changes(srv)
    settle(Path(source))
    run_both()
    assert "with rsync (transfer: rsync)" in logs["rsync"]
    if over == "local":
        assert "with linker (local destination)" in logs["auto"]
    else:
        assert "with remote (over ssh, unchanged entries kept from" in logs["auto"]
        assert int(re.search(r"(\d+) unchanged entries kept", logs["auto"]).group(1)) > 20
    gens = {way: [system.dest / g for g in system.generations()] for way, system in systems.items()}
    assert len(gens["auto"]) == len(gens["rsync"]) == 2
    for i in range(2):
        assert without_own_state(describe(gens["auto"][i])) == without_own_state(describe(gens["rsync"][i]))
    inside, shared = structure(gens["auto"])
    assert (inside, {k: without_own_state(dict(v)) for k, v in shared.items()}) == (
        lambda s: (s[0], {k: without_own_state(dict(v)) for k, v in s[1].items()}))(structure(gens["rsync"]))


def without_own_state(tree: dict) -> dict:
    """Leave out what jwbackup itself writes into the system at the start of each
    run (its package list), which differs between the two runs being compared."""
    own = b"/var/lib/jwbackup"
    return {k: v for k, v in tree.items() if not (k == own or k.startswith(own + b"/"))}


def test_unreadable_file_commits_with_a_warning_as_rsync_exit_23(jwbackup, tmp_path):
    """Without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH a mode-000 file of another user cannot be read."""
    results = {}
    gens = {}
    source = None
    for way in ("rsync", "auto"):
        (tmp_path / way).mkdir()
        system = System(tmp_path / way)
        system.configure(extra=f"transfer: {way}\n")
        if source is None:
            source = system.root_dir
            write(Path(source) / "srv/locked", b"secret\n", mode=0o000, owner=(1234, 1234))
            write(Path(source) / "srv/open", b"fine\n")
            settle(Path(source))
        result = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
             _jwbackup(),
             "-l", str(tmp_path / f"{way}.log"), "-c", str(system.config), "--root", source],
            capture_output=True,
        )
        results[way] = result
        (gen,) = system.generations()
        gens[way] = system.dest / gen
    for way, result in results.items():
        assert result.returncode == 1, (way, result.stderr.decode())
        assert (gens[way] / "srv/open").read_bytes() == b"fine\n"
        assert not (gens[way] / "srv/locked").exists()
    assert "srv/locked" in (tmp_path / "auto.log").read_text()
    assert describe(gens["auto"] / "srv") == describe(gens["rsync"] / "srv")
    listed = subprocess.run([_jwbackup(), "-l", "-", "-c", str(system.config), "list"], capture_output=True)
    assert listed.stdout.decode().splitlines()[1].endswith("  (with warnings: files not copied)"), listed


def _jwbackup() -> str:
    from conftest import JWBACKUP

    return str(JWBACKUP)


class _VanishingRepository(Repository):
    """A destination where another process removes the previous generation right after it is listed."""

    def tree(self, name: str, fmt: str) -> bytes:
        listing = super().tree(name, fmt)
        shutil.rmtree(self.path(name))
        return listing


@pytest.mark.parametrize("vanishes", ["before the listing", "after the listing"])
def test_remote_builder_sends_everything_when_the_previous_generation_vanishes(world, caplog, vanishes):
    tmp, src = world
    settle(src)
    paths = selection(src)
    gens = tmp / "gens"
    gens.mkdir()
    first = gens / "2026-01-01-00:00:00"
    assert build_rsync(src, first, [], paths).returncode == 0
    expected = tmp / "expected"
    assert build_rsync(src, expected, [], paths).returncode == 0
    if vanishes == "before the listing":
        shutil.rmtree(first)
        repo = Repository(Local(), str(gens))
    else:
        repo = _VanishingRepository(Local(), str(gens))
    target = gens / "2026-01-02-00:00:00.partial"
    argv = rsync.make_command(str(src), str(target), [str(first)])
    result = remote.build(repo, os.fsencode(src), iter(paths), first.name, target.name, time.time_ns(),
                          lambda listed: rsync.transfer(argv, listed), rsync.Tally(src))
    assert result.returncode == 0, result.errors
    assert "rsync gets every path" in caplog.text
    assert describe(target) == describe(expected)
    assert sorted(os.listdir(gens)) == [target.name]  # no half copy left beside it

"""End to end: the installed ``jwbackup`` command backs up a fake Debian root
(``--root``) with real rsync to a local directory or over a real sshd."""

from __future__ import annotations

import json
import os
import pwd
import re
import resource
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from backupenv import CACHEDIR_TAG, INSTALLED, System, tree_state
from conftest import JWBACKUP

HOSTILE_NAMES = [b"with space", b"new\nline", b"-leading-dash", b"latin1-\xe9t\xe9", b"tab\there", b"back\\slash*?["]


@pytest.fixture
def system(tmp_path):
    return System(tmp_path)


def backup(jwbackup, system, *args, ok=True):
    result = jwbackup("-c", system.config, "--root", system.root_dir, *args)
    if ok:
        assert result.returncode == 0, result.stderr.decode()
    return result


def test_second_generation_links_unchanged_files_and_copies_changed_ones(jwbackup, system):
    system.configure()
    backup(jwbackup, system)
    system.write(b"/home/alice/notes.txt", b"remember the milk and the eggs\n")
    system.write(b"/home/alice/new.txt", b"new\n")
    backup(jwbackup, system)
    first, second = system.generations()

    def ino(gen, path):
        return os.lstat(system.in_generation(gen, path)).st_ino

    # every kept file is in the second generation
    for path in [b"/etc/hostname", b"/root/.profile", b"/var/lib/app/state.db", b"/usr/local/bin/script", b"/home/alice/new.txt"]:
        assert os.path.isfile(system.in_generation(second, path)), path
    # unchanged: the same inode; changed: a new one with the new content
    assert ino(first, b"/var/lib/app/state.db") == ino(second, b"/var/lib/app/state.db")
    assert ino(first, b"/etc/hostname") == ino(second, b"/etc/hostname")
    assert ino(first, b"/home/alice/notes.txt") != ino(second, b"/home/alice/notes.txt")
    with open(system.in_generation(second, b"/home/alice/notes.txt"), "rb") as f:
        assert f.read() == b"remember the milk and the eggs\n"
    with open(system.in_generation(first, b"/home/alice/notes.txt"), "rb") as f:
        assert f.read() == b"remember the milk\n"
    # installed files are in neither; the dpkg database is (it is /var/lib state)
    for gen in (first, second):
        for path in INSTALLED:
            assert not os.path.lexists(system.in_generation(gen, path)), path
        assert os.path.isfile(system.in_generation(gen, b"/var/lib/dpkg/status"))
    assert os.readlink(system.dest / "latest") == second


def test_relative_root_names_the_same_system_as_its_absolute_path(system, tmp_path):
    system.configure()
    result = subprocess.run([JWBACKUP, "-l", "-", "-c", system.config, "--root", "system"],
                            cwd=tmp_path, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    (generation,) = system.generations()
    for path in [b"/etc/hostname", b"/home/alice/notes.txt", b"/var/lib/app/state.db", b"/var/lib/dpkg/status"]:
        assert os.path.isfile(system.in_generation(generation, path)), path
    assert not os.path.lexists(system.in_generation(generation, b"/usr/bin/tool"))


def test_a_dry_run_changes_nothing_on_the_system_caches_included(jwbackup, system, tmp_path):
    system.dest = tmp_path / "elsewhere"  # outside the system, whose whole tree is compared
    system.dest.mkdir()
    system.configure()
    for _ in range(2):  # before the first run (no cache yet), then with the caches there to read
        before = tree_state(os.fsencode(system.root_dir))
        backup(jwbackup, system, "--dry-run")
        assert tree_state(os.fsencode(system.root_dir)) == before
        backup(jwbackup, system)
    assert os.path.isfile(system.path(b"/var/lib/jwbackup/cache/CACHEDIR.TAG"))


@pytest.mark.parametrize("where, extra, builder", [
    ("local", "", "rsync on what changed (dry run, unchanged entries judged against"),
    ("local", "transfer: rsync\n", "rsync (transfer: rsync)"),
    ("ssh", "", "rsync on what changed (dry run, unchanged entries judged against"),
])
def test_dry_run_after_a_generation_lists_what_would_be_copied_and_writes_nothing(
        jwbackup, system, tmp_path, request, where, extra, builder):
    destination = ssh_destination(request.getfixturevalue("sshd")) if where == "ssh" else ""
    system.configure(destination=destination, extra=extra)
    backup(jwbackup, system)
    (first,) = system.generations()
    before = tree_state(system.dest)
    system.write(b"/home/alice/notes.txt", b"remember the milk and the eggs\n")
    system.write(b"/home/alice/projects/new.txt", b"new\n")  # in a directory the generation lacks
    result = backup(jwbackup, system, "--dry-run")
    itemized = result.stdout.splitlines()  # rsync's "<f" (sent to the host) or ">f" (copied here)
    assert any(line[1:2] == b"f" and line.endswith(b" home/alice/notes.txt") for line in itemized)
    assert any(line[1:5] == b"f+++" and line.endswith(b" home/alice/projects/new.txt") for line in itemized)
    assert not any(line.endswith(b"etc/hostname") for line in itemized)  # unchanged: would be linked
    assert result.stderr == b""  # no warning: rsync's dry run has nothing to complain about
    assert f"with {builder}" in (tmp_path / "jwbackup.log").read_text()
    assert system.generations() == [first] and tree_state(system.dest) == before


def test_modified_conffile_is_backed_up(jwbackup, system):
    system.configure()
    system.write(b"/etc/tool.conf", b"setting = 2\n")
    backup(jwbackup, system)
    (gen,) = system.generations()
    with open(system.in_generation(gen, b"/etc/tool.conf"), "rb") as f:
        assert f.read() == b"setting = 2\n"


@pytest.mark.parametrize("where, extra", [("local", ""), ("local", "transfer: rsync\n"), ("ssh", "")])
def test_an_installed_file_changed_behind_dpkg_is_backed_up_with_the_directories_above_it(
        jwbackup, system, tmp_path, request, where, extra):
    # With two CPUs the verification runs alongside the walk, which then yields this file last.
    destination = ssh_destination(request.getfixturevalue("sshd")) if where == "ssh" else ""
    system.configure(destination=destination, extra=extra)
    backup(jwbackup, system)
    os.chmod(system.path(b"/usr/share/doc/tool"), 0o750)
    system.write(b"/usr/share/doc/tool/README", b"the tool, and a note of the admin's\n")
    backup(jwbackup, system)
    first, second = system.generations()
    assert not os.path.lexists(system.in_generation(first, b"/usr/share/doc/tool"))
    with open(system.in_generation(second, b"/usr/share/doc/tool/README"), "rb") as f:
        assert f.read() == b"the tool, and a note of the admin's\n"
    assert os.lstat(system.in_generation(second, b"/usr/share/doc/tool")).st_mode & 0o7777 == 0o750
    assert not os.path.lexists(system.in_generation(second, b"/usr/bin/tool"))
    log = (tmp_path / "jwbackup.log").read_text()
    if len(os.sched_getaffinity(0)) >= 2:
        assert log.count(" s alongside the walk: ") == 2 and ", 1 modified" in log


def sparse_image(path: bytes) -> bytes:
    """A 256 MiB VM image holding 1 MiB of data at 64 MiB: its data, the rest holes."""
    data = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.truncate(256 << 20)
        f.seek(64 << 20)
        f.write(data)
    assert os.stat(path).st_blocks * 512 <= 2 << 20
    return data


def image_of(path: bytes) -> tuple[int, bytes, int]:
    """(size, the MiB at 64 MiB, how many zero bytes the rest holds) of a copy."""
    zeros = 0
    with open(path, "rb") as f:
        for offset in range(0, os.fstat(f.fileno()).st_size, 8 << 20):
            chunk = f.read(8 << 20)
            if offset == 64 << 20:
                data, chunk = chunk[: 1 << 20], chunk[1 << 20 :]
            zeros += chunk.count(0)
    return os.stat(path).st_size, data, zeros


@pytest.mark.parametrize("where, extra", [("local", ""), ("local", "transfer: rsync\n"), ("ssh", "")])
def test_sparse_file_keeps_its_holes_in_every_generation_and_when_restored(
        jwbackup, system, tmp_path, request, where, extra):
    destination = ssh_destination(request.getfixturevalue("sshd")) if where == "ssh" else ""
    system.configure(destination=destination, extra=extra)
    image = system.path(b"/var/lib/libvirt/images/vm.img")
    os.makedirs(os.path.dirname(image))
    contents = [sparse_image(image)]
    backup(jwbackup, system)
    contents.append(os.urandom(1 << 20))  # the guest wrote: rsync sends it against the first copy
    with open(image, "r+b") as f:
        f.seek(64 << 20)
        f.write(contents[-1])
    os.utime(image, (time.time() + 10, time.time() + 10))  # a later second, whatever the clock's grain
    backup(jwbackup, system)
    if not extra and where == "local":
        # attributes only: the linker copies from the earlier generation, holes
        # kept; rsync's own copy from a --link-dest fills them (util1.c copy_file)
        os.chmod(image, 0o600)
        contents.append(contents[-1])
        backup(jwbackup, system)
    gens = system.generations()
    assert len(gens) == len(contents)
    for gen, data in zip(gens, contents):
        copy = system.in_generation(gen, b"/var/lib/libvirt/images/vm.img")
        assert image_of(copy) == (256 << 20, data, (256 - 1) << 20), gen
        assert os.stat(copy).st_blocks * 512 <= 2 << 20, gen
    target = tmp_path / "restored"
    restored = jwbackup("-c", system.config, "--root", system.root_dir, "restore", "-t", target,
                        "/var/lib/libvirt/images/vm.img")
    assert restored.returncode == 0, restored.stderr.decode()
    copy = os.fsencode(target) + b"/var/lib/libvirt/images/vm.img"
    assert image_of(copy) == (256 << 20, contents[-1], (256 - 1) << 20)
    assert os.stat(copy).st_blocks * 512 <= 2 << 20


@pytest.mark.parametrize("where, extra", [("local", ""), ("local", "transfer: rsync\n"), ("ssh", "")])
def test_swap_files_named_in_fstab_are_left_out(jwbackup, system, tmp_path, request, where, extra):
    # /swapfile sits right in /, which rsync's listed "." brings along unless excluded
    system.write(b"/etc/fstab", b"# <file system> <mount point> <type> <options> <dump> <pass>\n"
                                b"UUID=0a1b / ext4 errors=remount-ro 0 1\n"
                                b"/swapfile none swap sw 0 0\n"
                                b"/srv/swap\\040space none swap sw,pri=5 0 0\n"
                                b"/srv/data /mnt/data none bind 0 0\n")
    system.write(b"/swapfile", b"pages of memory" * 1000)
    system.write(b"/srv/swap space", b"more pages" * 1000)
    system.write(b"/srv/data/kept", b"an admin's file\n")
    destination = ssh_destination(request.getfixturevalue("sshd")) if where == "ssh" else ""
    system.configure(destination=destination, extra=extra)
    backup(jwbackup, system)
    backup(jwbackup, system)  # over ssh, planned against the first
    for gen in system.generations():
        assert not os.path.lexists(system.in_generation(gen, b"/swapfile"))
        assert not os.path.lexists(system.in_generation(gen, b"/srv/swap space"))
        for path in (b"/etc/fstab", b"/srv/data/kept"):
            assert os.path.isfile(system.in_generation(gen, path)), path
    assert "  swap:      /swapfile, /srv/swap space left out\n" in (tmp_path / "jwbackup.log").read_text()
    listed = jwbackup("-c", system.config, "--root", system.root_dir, "files", "--no-package-state")
    assert listed.returncode == 0, listed.stderr.decode()
    root = os.fsencode(system.root_dir)
    assert root + b"/srv/data/kept\n" in listed.stdout
    assert root + b"/swapfile\n" not in listed.stdout and root + b"/srv/swap space\n" not in listed.stdout


def generation_contents(top: bytes) -> tuple[int, int]:
    """(entries, bytes of regular files) of a generation, its top directory counted."""
    entries, size = 1, 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            entries += 1
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return entries, size


@pytest.mark.parametrize("where, extra", [("local", ""), ("local", "transfer: rsync\n"), ("ssh", "")])
@pytest.mark.parametrize("roots", [("/",), ("/etc", "/var/lib")])
def test_list_counts_the_entries_and_bytes_each_generation_holds(jwbackup, system, request, where, extra, roots):
    # rsync's --stats counts a listed directory again as the parent it implies, and a
    # name right in a listed / again as one that / brings along
    system.write(b"/etc/fstab", b"/swapfile none swap sw 0 0\n")
    system.write(b"/swapfile", b"pages of memory" * 100)
    system.write(b"/notes-in-the-root", b"a file right in /\n")
    system.write(b"/var/lib/app/deep/er/state", b"state\n")
    os.link(system.path(b"/var/lib/app/state.db"), system.path(b"/var/lib/app/deep/state.db"))
    destination = ssh_destination(request.getfixturevalue("sshd")) if where == "ssh" else ""
    system.configure(destination=destination, extra=extra, roots=roots)
    backup(jwbackup, system)
    time.sleep(2.5)  # over ssh, older than the builder's margin: the next run keeps files
    system.write(b"/etc/hostname", b"renamed\n")
    backup(jwbackup, system)
    listed = jwbackup("-c", system.config, "list", "--json")
    assert listed.returncode == 0, listed.stderr.decode()
    recorded = {row["name"]: (row["files"], row["size"]) for row in json.loads(listed.stdout)["generations"]}
    assert recorded == {gen: generation_contents(system.in_generation(gen, b"")) for gen in system.generations()}


def test_metadata_survives(jwbackup, system):
    system.configure()
    data = system.write(b"/srv/data/file", b"payload\n")
    os.chown(data, 1234, 5678)
    os.chmod(data, 0o640)
    os.utime(data, ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
    os.symlink(b"file", system.path(b"/srv/data/link"))
    os.link(data, system.path(b"/srv/data/hardlink"))
    subprocess.run(["setfacl", "-m", "u:4321:r", data], check=True)
    subprocess.run(["setfattr", "-n", "user.jwbackup", "-v", "kept", data], check=True)
    backup(jwbackup, system)
    (gen,) = system.generations()
    copy = system.in_generation(gen, b"/srv/data/file")
    st = os.lstat(copy)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o640)
    assert st.st_mtime_ns == 1_500_000_000_123_456_789
    assert os.readlink(system.in_generation(gen, b"/srv/data/link")) == b"file"
    assert os.lstat(system.in_generation(gen, b"/srv/data/hardlink")).st_ino == st.st_ino
    acl = subprocess.run(["getfacl", "-cp", copy], capture_output=True, check=True).stdout
    assert b"user:4321:r--" in acl
    assert os.getxattr(copy, "user.jwbackup") == b"kept"


def test_hostile_names_are_backed_up(jwbackup, system):
    system.configure()
    for name in HOSTILE_NAMES:
        system.write(b"/home/alice/" + name, name)
    backup(jwbackup, system)
    (gen,) = system.generations()
    for name in HOSTILE_NAMES:
        with open(system.in_generation(gen, b"/home/alice/" + name), "rb") as f:
            assert f.read() == name


def test_retention_keeps_the_newest_and_touches_nothing_else(jwbackup, system, tmp_path):
    system.configure(destination="  generations: 3\n")
    (system.dest / "notes").mkdir()
    (system.dest / "notes" / "keep.txt").write_text("mine")
    os.symlink(tmp_path / "outside", system.dest / "2000-01-01-00:00:00")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "precious").write_text("do not delete")
    names = []
    for _ in range(5):
        backup(jwbackup, system)
        names = system.generations()
    assert len(names) == 3
    assert (system.dest / "notes" / "keep.txt").read_text() == "mine"
    assert os.path.islink(system.dest / "2000-01-01-00:00:00")
    assert (tmp_path / "outside" / "precious").read_text() == "do not delete"
    assert os.readlink(system.dest / "latest") == names[-1]
    listing = jwbackup("-c", system.config, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    shown = [g["name"] for g in json.loads(listing.stdout)["generations"]]
    assert shown == sorted(names, reverse=True)


def test_a_clock_set_back_never_expires_the_generation_just_made(jwbackup, system):
    system.configure(destination="  generations: 1\n")
    backup(jwbackup, system)
    (first,) = system.generations()
    # a generation made while the clock was ahead
    subprocess.run(["cp", "-a", system.dest / first, system.dest / "2099-01-01-00:00:00"], check=True)
    system.write(b"/home/alice/notes.txt", b"written after the clock was set back\n")
    result = backup(jwbackup, system)
    kept = system.generations()
    assert first not in kept and len(kept) == 2
    (new,) = [n for n in kept if n != "2099-01-01-00:00:00"]
    with open(system.in_generation(new, b"/home/alice/notes.txt"), "rb") as f:
        assert f.read() == b"written after the clock was set back\n"
    assert os.readlink(system.dest / "latest") == new
    assert (f"1 generations are named later than this run's {new} (newest: 2099-01-01-00:00:00); "
            "was the clock set back?") in result.stderr.decode()


def test_a_root_the_prune_list_names_too_is_backed_up_and_prune_works_below_it(jwbackup, system):
    system.configure(roots=("/home", "/tmp"), extra="prune: [/home, /tmp, /home/alice/junk]\n")
    system.write(b"/tmp/keep/wanted", b"asked for\n")
    system.write(b"/home/alice/junk/big", b"junk\n")
    backup(jwbackup, system)
    (gen,) = system.generations()
    assert os.path.isfile(system.in_generation(gen, b"/home/alice/notes.txt"))
    assert os.path.isfile(system.in_generation(gen, b"/tmp/keep/wanted"))
    assert not os.path.lexists(system.in_generation(gen, b"/home/alice/junk"))


def test_a_latest_that_cannot_be_replaced_is_a_warning_and_retention_still_runs(jwbackup, system):
    system.configure(destination="  generations: 1\n")
    (system.dest / "latest").mkdir()
    (system.dest / "latest" / "mine").write_text("the admin's\n")
    for run in range(2):
        system.write(b"/home/alice/notes.txt", b"run %d\n" % run * (run + 1))
        result = backup(jwbackup, system, ok=False)
        assert result.returncode == 1, result.stderr.decode()
        (gen,) = system.generations()
        lines = result.stderr.decode().splitlines()
        assert (f"jwbackup: generation {gen} is complete, but pointing latest at it failed: "
                "mv: cannot overwrite directory 'latest' with non-directory") in lines
        with open(system.in_generation(gen, b"/home/alice/notes.txt"), "rb") as f:
            assert f.read() == b"run %d\n" % run * (run + 1)
    assert (system.dest / "latest" / "mine").read_text() == "the admin's\n"
    assert sorted(os.listdir(system.dest)) == [".stats", gen, "latest"]


def test_the_first_generation_holds_no_cache_directory_and_diff_finds_nothing_changed(jwbackup, system):
    system.configure()
    backup(jwbackup, system)
    (gen,) = system.generations()
    assert os.path.isdir(system.path(b"/var/lib/jwbackup/cache"))
    assert os.path.isfile(system.in_generation(gen, b"/var/lib/jwbackup/packages/manual"))
    assert not os.path.lexists(system.in_generation(gen, b"/var/lib/jwbackup/cache"))
    result = jwbackup("-c", system.config, "--root", system.root_dir, "diff", gen)
    assert (result.returncode, result.stdout) == (0, b""), result.stderr.decode()


def test_a_root_below_a_pruned_directory_of_another_root_is_backed_up_and_not_excluded(jwbackup, system, tmp_path):
    system.configure(roots=("/", "/var/cache/keep"))  # /var/cache is in the default prune list
    system.write(b"/var/cache/keep/wanted", b"asked for\n")
    system.write(b"/var/cache/other/junk", b"cache\n")
    backup(jwbackup, system)
    (gen,) = system.generations()
    assert os.path.isfile(system.in_generation(gen, b"/var/cache/keep/wanted"))
    assert not os.path.lexists(system.in_generation(gen, b"/var/cache/other"))
    # tar with jwbackup's rules, given the same roots, holds it too
    rules = tmp_path / "rules"
    result = jwbackup("-c", system.config, "--root", system.root_dir, "excludes", "-f", "tar", "-o", rules)
    assert result.returncode == 0, result.stderr.decode()
    listing = subprocess.run(
        ["tar", "--anchored", "-X", rules, "-cf", "-", system.path(b"/var/cache/keep"), system.path(b"/tmp")],
        capture_output=True, check=True).stdout
    assert b"keep/wanted" in listing and system.path(b"/tmp").lstrip(b"/") not in listing


def test_prune_dry_run_removes_nothing(jwbackup, system):
    system.configure(destination="  generations: 5\n")
    for _ in range(3):
        backup(jwbackup, system)
    system.configure(destination="  generations: 1\n")
    before = system.generations()
    result = jwbackup("-c", system.config, "prune", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert system.generations() == before
    assert result.stdout.decode().count("would remove") == 2
    assert jwbackup("-c", system.config, "prune").returncode == 0
    assert system.generations() == before[-1:]


@pytest.mark.parametrize("transfer", ["auto", "rsync"])
def test_files_deleted_during_the_run_go_to_the_log_not_to_cron_mail(system, tmp_path, transfer):
    """A live system deletes temporary files while the backup runs: exit 0, and
    nothing on stderr, which cron would mail every day."""
    system.configure(extra=f"transfer: {transfer}\n")
    temp = system.path(b"/srv/tmpfiles")
    os.makedirs(temp)
    for i in range(30000):
        with open(temp + b"/f%05d" % i, "wb") as f:
            f.write(b"x")
    log = tmp_path / "run.log"
    run = subprocess.Popen([JWBACKUP, "-l", log, "-c", system.config, "--root", system.root_dir],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not system.partials() and run.poll() is None:
        time.sleep(0.005)
    for i in range(29999, 20000, -1):  # from the end of the walk: gone before they are copied
        os.unlink(temp + b"/f%05d" % i)
    out, err = run.communicate()
    vanished = [line for line in log.read_text().splitlines() if "file has vanished: " in line]
    if not vanished:
        pytest.skip("the run copied every file before it was deleted")
    assert (run.returncode, out, err) == (0, b"", b"")
    assert all('"/srv/tmpfiles/f' in line for line in vanished if "some files" not in line)  # not rsync's view


def test_a_tree_hundreds_of_levels_deep_is_backed_up_under_the_usual_limit_on_open_files(system, tmp_path):
    """systemd and cron start jobs with a soft limit of 1024 open files."""
    system.configure()
    os.makedirs(system.path(b"/srv/deep"))
    fd = os.open(system.path(b"/srv/deep"), os.O_RDONLY)
    for _ in range(520):  # 1 KiB of path: well within PATH_MAX
        os.mkdir(b"a", dir_fd=fd)
        fd, old = os.open(b"a", os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    with open(os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"at the bottom\n")
    os.close(fd)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard limit on open files is {hard} here")

    def usual_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    leaf = b"/srv/deep" + b"/a" * 520 + b"/leaf"
    for _ in range(2):  # the second run links against the first: more directories open at once
        run = subprocess.run([JWBACKUP, "-l", tmp_path / "run.log", "-c", system.config, "--root", system.root_dir],
                             capture_output=True, preexec_fn=usual_limit)
        assert (run.returncode, run.stderr) == (0, b"")
        with open(system.in_generation(system.generations()[-1], leaf), "rb") as f:
            assert f.read() == b"at the bottom\n"
        time.sleep(1.1)  # a new generation name


def test_a_dry_run_names_the_generation_its_run_would_expire(jwbackup, system, tmp_path):
    system.configure(destination="  generations: 2\n")
    backup(jwbackup, system)
    backup(jwbackup, system)
    oldest, newest = system.generations()
    backup(jwbackup, system, "--dry-run")
    assert system.generations() == [oldest, newest]
    assert f"dry run: retention would remove {oldest}" in (tmp_path / "jwbackup.log").read_text()
    backup(jwbackup, system)
    assert oldest not in system.generations() and newest in system.generations()


def test_destination_inside_the_root_is_not_copied_into_itself(jwbackup, system):
    inner = system.path(b"/var/backups/jwbackup")
    os.makedirs(inner, mode=0o700)
    system.configure(directory=os.fsdecode(inner))
    backup(jwbackup, system)
    backup(jwbackup, system)
    gens = sorted(e for e in os.listdir(inner) if e[:1].isdigit())
    assert len(gens) == 2
    for gen in gens:
        assert os.path.isdir(os.path.join(inner, gen, b"var/backups"))
        assert not os.path.exists(os.path.join(inner, gen, b"var/backups/jwbackup"))


def test_missing_destination_is_one_clear_line_and_init_creates_it(jwbackup, system, tmp_path):
    missing = tmp_path / "not-there"
    system.configure(directory=str(missing))
    result = backup(jwbackup, system, ok=False)
    assert result.returncode == 75
    assert result.stderr.decode().strip().splitlines() == [
        f"jwbackup: error: destination directory {missing} does not exist or is not a directory (create it, or run 'jwbackup init')"
    ]
    assert jwbackup("-c", system.config, "init").returncode == 0
    assert os.stat(missing).st_mode & 0o777 == 0o700
    backup(jwbackup, system)


def test_full_disk_fails_cleanly_and_keeps_earlier_generations(jwbackup, system, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], check=True)
    try:
        system.configure(directory=str(mnt))
        backup(jwbackup, system)
        (first,) = [e for e in os.listdir(mnt) if e[:1].isdigit()]
        before = tree_state(mnt / first)
        system.write(b"/home/alice/big", os.urandom(2 << 20))
        result = backup(jwbackup, system, ok=False)
        assert result.returncode == 74
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], lines
        assert tree_state(mnt / first) == before
        assert os.readlink(mnt / "latest") == first
        assert [e for e in os.listdir(mnt) if e[:1].isdigit() and not e.endswith(".partial")] == [first]
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


def test_unreadable_roots_and_directories_commit_the_rest_with_warnings_and_exit_1(jwbackup, system, tmp_path):
    # Without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH a mode-000 directory of
    # another user cannot be listed, as on an NFS /home with root_squash.
    system.configure(roots=("/etc", "/home", "/srv", "/not-mounted", "/www"))
    system.write(b"/srv/open/data", b"fine\n")
    os.symlink("/srv/open", system.path(b"/www"))  # a root is never followed either
    system.write(b"/srv/locked/secret", b"secret\n")
    os.chown(system.path(b"/srv/locked"), 1234, 1234)
    os.chmod(system.path(b"/srv/locked"), 0o000)
    log = tmp_path / "jwbackup.log"
    unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", str(JWBACKUP), "-l", str(log),
                    "-c", str(system.config), "--root", system.root_dir]
    result = subprocess.run(unprivileged, capture_output=True)
    assert result.returncode == 1, result.stderr.decode()
    assert result.stderr.decode().splitlines() == [
        "jwbackup: root /not-mounted cannot be read: No such file or directory",
        "jwbackup: cannot list /srv/locked: Permission denied",
        "jwbackup: root /www is a symlink to /srv/open, not a directory; skipped",
    ]
    (gen,) = system.generations()
    for path in (b"/srv/open/data", b"/home/alice/notes.txt", b"/etc/hostname"):
        assert os.path.isfile(system.in_generation(gen, path)), path
    assert not os.path.lexists(system.in_generation(gen, b"/srv/locked"))
    text = log.read_text()
    assert f"generation {gen} completed with warnings" in text
    assert "  not read:  3 roots or directories, left out: /not-mounted, /srv/locked, /www\n" in text
    listed = jwbackup("-c", system.config, "list")
    assert listed.stdout.decode().splitlines()[1].endswith("  (with warnings: 3 roots or directories not read)")
    (row,) = json.loads(jwbackup("-c", system.config, "list", "--json").stdout)["generations"]
    assert (row["unreadable"], row["incomplete"]) == (3, False)
    # the file list for restic or tar says the same: the list lacks something
    listed = subprocess.run(unprivileged + ["files", "--no-package-state"], capture_output=True)
    assert listed.returncode == 1, listed.stderr.decode()
    assert b"/srv/open/data\n" in listed.stdout and b"/srv/locked" not in listed.stdout
    # and so does a comparison with the system now
    compared = subprocess.run(unprivileged + ["diff", gen], capture_output=True)
    assert (compared.returncode, compared.stdout) == (1, b""), compared.stderr.decode()


@pytest.mark.parametrize("where, extra", [("local", ""), ("local", "transfer: rsync\n"), ("ssh", "")])
def test_no_readable_root_fails_in_one_line_and_expires_nothing(jwbackup, system, request, where, extra):
    destination = ssh_destination(request.getfixturevalue("sshd")) if where == "ssh" else ""
    destination += "  generations: 1\n"
    system.configure(destination=destination, extra=extra)
    backup(jwbackup, system)
    backup(jwbackup, system)  # over ssh, the second run plans against the first
    (first,) = system.generations()
    before = tree_state(system.dest / first)
    system.configure(destination=destination, extra=extra, roots=("/not-mounted", "/srv"))
    result = backup(jwbackup, system, ok=False)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == (
        "jwbackup: error: nothing to back up: no root can be walked "
        "(/not-mounted: No such file or directory; /srv: No such file or directory)"
    )
    assert system.generations() == [first]
    assert tree_state(system.dest / first) == before
    assert os.readlink(system.dest / "latest") == first


@pytest.mark.parametrize("marker, content", [(b"/.no-backup", b""), (b"/CACHEDIR.TAG", CACHEDIR_TAG)])
def test_a_root_holding_a_skip_marker_is_a_warning_and_alone_commits_nothing(jwbackup, system, marker, content):
    """A stray /.no-backup used to commit empty generations, exit 0, and expire the real ones."""
    system.configure(destination="  generations: 2\n")
    backup(jwbackup, system)
    backup(jwbackup, system)
    before = {g: tree_state(system.dest / g) for g in system.generations()}
    system.write(marker, content)
    result = backup(jwbackup, system, ok=False)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == (
        f"jwbackup: error: nothing to back up: no root can be walked (/: holds {marker.decode()[1:]})")
    assert {g: tree_state(system.dest / g) for g in system.generations()} == before

    system.configure(destination="  generations: 2\n", roots=("/", "/home"))  # another root is still walked
    result = backup(jwbackup, system, ok=False)
    assert result.returncode == 1
    assert f"root / holds {marker.decode()[1:]}; skipped" in result.stderr.decode()
    newest = system.generations()[-1]
    assert newest not in before and os.path.isfile(system.in_generation(newest, b"/home/alice/notes.txt"))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the verification runs alongside on two CPUs only")
def test_no_process_to_spare_verifies_first_then_fails_in_one_line_touching_nothing(jwbackup):
    # Run as nobody, held to one process (RLIMIT_NPROC): a real fork fails.
    # The verification that would run alongside comes first instead and still
    # finds the modified file; the run then stops where it must start a
    # process, in one line, and the generation already there is untouched.
    with tempfile.TemporaryDirectory() as public:  # pytest's tmp_path is private to root
        os.chmod(public, 0o755)
        system = System(Path(public))
        system.configure()
        system.config.chmod(0o644)
        backup(jwbackup, system)
        (first,) = system.generations()
        before = tree_state(system.dest)
        with open(system.path(b"/usr/share/doc/tool/README"), "ab") as f:
            f.write(b"a note of the admin's\n")
        private = Path(public) / "lock"  # the lock file's directory, made by the run above
        nobody = pwd.getpwnam("nobody")
        for mine in (system.dest, private, private / "jwbackup.lock"):
            os.chown(mine, nobody.pw_uid, nobody.pw_gid)  # as a run as nobody needs them
        log = private / "jwbackup.log"
        result = subprocess.run(
            ["prlimit", "--nproc=1:1", "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             JWBACKUP, "-c", system.config, "--root", system.root_dir, "-l", log],
            capture_output=True, timeout=120,
        )
        text = log.read_text()
        os.chown(system.dest, 0, 0)  # root's again, as ``before`` saw it
        assert result.returncode != 0
        assert "verification alongside the walk: Resource temporarily unavailable; verifying first" in text
        assert re.search(r"verified 3 installed files in [\d.]+ s: .*, 1 modified", text), text
        error = result.stderr.decode().strip().splitlines()[-1]
        assert error.startswith("jwbackup: error: ") and "Resource temporarily unavailable" in error, error
        assert tree_state(system.dest) == before and system.generations() == [first]


def test_second_concurrent_run_exits_with_the_lock_message(jwbackup, system):
    from lock_holder import held_lock

    system.configure()
    with held_lock(system.tmp / "lock" / "jwbackup.lock"):
        result = backup(jwbackup, system, ok=False)
    assert result.returncode == 75
    assert "another jwbackup run" in result.stderr.decode() and "holds the lock" in result.stderr.decode()
    assert system.generations() == []
    backup(jwbackup, system)


# --- over ssh, to a real sshd on 127.0.0.1 -------------------------------------


def ssh_destination(sshd, **overrides) -> str:
    fields = {"host": "127.0.0.1", "port": sshd.port, "user": sshd.user, "key": sshd.key, "known_hosts": sshd.known_hosts}
    fields.update(overrides)
    return "".join(f"  {k}: {v}\n" for k, v in fields.items() if v is not None)


def test_ssh_destination_two_generations_share_unchanged_files(jwbackup, system, sshd):
    system.configure(destination=ssh_destination(sshd))
    backup(jwbackup, system)
    system.write(b"/home/alice/notes.txt", b"changed\n")
    backup(jwbackup, system)
    first, second = system.generations()
    same = [b"/etc/hostname", b"/var/lib/app/state.db", b"/root/.profile"]
    for path in same:
        assert os.lstat(system.in_generation(first, path)).st_ino == os.lstat(system.in_generation(second, path)).st_ino
    assert os.lstat(system.in_generation(first, b"/home/alice/notes.txt")).st_ino != os.lstat(
        system.in_generation(second, b"/home/alice/notes.txt")).st_ino
    for path in INSTALLED:
        assert not os.path.lexists(system.in_generation(second, path))
    assert os.readlink(system.dest / "latest") == second
    listed = jwbackup("-c", system.config, "list")
    assert listed.returncode == 0 and first in listed.stdout.decode() and second in listed.stdout.decode()


def test_ssh_destination_named_from_the_login_directory_as_jw_backup_1_0_configs_do(jwbackup, system, sshd):
    home = os.path.expanduser(f"~{sshd.user}")  # the same machine: a relative path from home into the test's tree
    system.configure(directory=os.path.relpath(system.dest, home), destination=ssh_destination(sshd))
    assert not config_directory(system).startswith("/")
    backup(jwbackup, system)
    system.write(b"/home/alice/notes.txt", b"changed\n")
    backup(jwbackup, system)
    first, second = system.generations()
    assert os.lstat(system.in_generation(first, b"/etc/hostname")).st_ino == os.lstat(
        system.in_generation(second, b"/etc/hostname")).st_ino  # --link-dest found the first
    with open(system.in_generation(second, b"/home/alice/notes.txt"), "rb") as f:
        assert f.read() == b"changed\n"
    listed = jwbackup("-c", system.config, "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["destination"] == str(system.dest)


def config_directory(system) -> str:
    return next(line.split(": ", 1)[1] for line in system.config.read_text().splitlines()
                if line.startswith("  directory: "))


def test_ssh_a_newly_selected_name_joins_the_kept_name_of_its_hard_link_group(jwbackup, system, sshd):
    """rsync -H links only the names it is given together: the kept one must go with the new one."""
    system.configure(destination=ssh_destination(sshd))
    system.write(b"/srv/g/a", b"one inode, two names\n")
    system.write(b"/srv/g/x/.no-backup", b"")
    os.link(system.path(b"/srv/g/a"), system.path(b"/srv/g/x/b"))
    time.sleep(2.5)  # older than the ssh builder's margin: a is kept next time
    backup(jwbackup, system)
    time.sleep(1.1)
    os.unlink(system.path(b"/srv/g/x/.no-backup"))  # x is backed up from now on
    backup(jwbackup, system)
    new = system.generations()[-1]
    assert os.lstat(system.in_generation(new, b"/srv/g/a")).st_ino == os.lstat(
        system.in_generation(new, b"/srv/g/x/b")).st_ino


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"port": "PORT+1"}, "connection refused"),
        ({"key": "OTHER_KEY"}, "permission denied"),
        ({"known_hosts": "EMPTY"}, "host key verification failed"),
    ],
)
def test_ssh_failures_are_one_clear_line(jwbackup, system, sshd, tmp_path, overrides, message):
    from sshd import free_port, keygen

    system.configure(destination=ssh_destination(sshd))
    backup(jwbackup, system)
    (first,) = system.generations()
    before = tree_state(system.dest)
    values = {
        "PORT+1": free_port(),
        "OTHER_KEY": str(keygen(tmp_path / "stranger_key")),
        "EMPTY": str(tmp_path / "empty_known_hosts"),
    }
    system.configure(destination=ssh_destination(sshd, **{k: values[v] for k, v in overrides.items()}))
    result = backup(jwbackup, system, ok=False)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 75
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("jwbackup: error: "), lines
    assert tree_state(system.dest) == before


def test_unwritable_remote_directory_is_one_clear_line(jwbackup, system, sshd, tmp_path):
    """A login user without write permission on the destination (root bypasses modes,
    so the directory is made immutable instead)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    system.configure(directory=str(locked), destination=ssh_destination(sshd))
    subprocess.run(["chattr", "+i", locked], check=True)
    try:
        result = backup(jwbackup, system, ok=False)
    finally:
        subprocess.run(["chattr", "-i", locked], check=True)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, lines
    assert "not writable" in lines[0] or "Operation not permitted" in lines[0], lines
    assert os.listdir(locked) == []


# --- interrupted runs -------------------------------------------------------------


def _rsync_pids(marker: bytes) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"rsync" and any(marker in a for a in argv):
            pids.append(int(pid))
    return pids


def test_killed_rsync_leaves_partial_and_next_run_reuses_it(jwbackup, system, tmp_path):
    system.configure(extra="transfer: rsync\n")
    backup(jwbackup, system)
    (first,) = system.generations()
    before = tree_state(system.dest / first)
    # rsync sends a directory's files in name order: the small ones first, then
    # the big one, during whose copy rsync is killed.
    for i in range(20):
        system.write(b"/srv/new/a%02d" % i, b"small %d\n" % i)
    with open(system.path(b"/srv/new/zz-big"), "wb") as f:
        f.truncate(0)
        for _ in range(64):
            f.write(b"\1" * (8 << 20))
    marker = os.fsencode(system.dest)
    proc = subprocess.Popen(
        [JWBACKUP, "-l", tmp_path / "log", "-c", system.config, "--root", system.root_dir], stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        partials = system.partials()
        new = system.dest / partials[0] / "srv" / "new" if partials else None
        if new and new.is_dir():
            if any(n.startswith(".zz-big.") for n in os.listdir(new)):
                for pid in _rsync_pids(marker):
                    os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=60)
    assert killed, "rsync finished before it could be killed"
    assert proc.returncode == 74, err
    assert len(err.decode().strip().splitlines()) == 1, err
    (partial,) = system.partials()
    assert system.generations() == [first]
    assert os.readlink(system.dest / "latest") == first
    assert tree_state(system.dest / first) == before
    copied = {i: os.lstat(system.dest / partial / "srv" / "new" / ("a%02d" % i)).st_ino for i in range(20)}

    backup(jwbackup, system)
    gens = system.generations()
    assert len(gens) == 2 and gens[0] == first
    second = gens[1]
    assert system.partials() == []
    assert tree_state(system.dest / first) == before
    for i, ino in copied.items():
        assert os.lstat(system.dest / second / "srv" / "new" / ("a%02d" % i)).st_ino == ino
    assert os.path.getsize(system.dest / second / "srv" / "new" / "zz-big") == 512 << 20
    assert not [n for n in os.listdir(system.dest / second / "srv" / "new") if n.startswith(".")]

"""``jwbackup restore`` and ``jwbackup diff``: the installed command, real rsync, a real sshd."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backupenv import CACHEDIR_TAG, System, tree_state


def ssh_destination(sshd) -> str:
    return (f"  host: 127.0.0.1\n  port: {sshd.port}\n  user: {sshd.user}\n"
            f"  key: {sshd.key}\n  known_hosts: {sshd.known_hosts}\n")


def snapshot(top: bytes) -> dict[bytes, tuple]:
    """What a restore must bring back: kind, mode, owner, mtime, content or link target."""
    return tree_state(top, inodes=False)


@pytest.fixture
def system(tmp_path):
    system = System(tmp_path)
    project = b"/home/alice/project"
    system.write(project + b"/notes.txt", b"remember the milk\n")
    system.write(project + b"/bin/run", b"#!/bin/sh\necho run\n")
    system.write(project + b"/secret", b"42\n")
    system.write(project + b"/name with\nnewline", b"odd\n")
    os.symlink(b"bin/run", system.path(project + b"/run"))
    os.symlink(b"/etc/hostname", system.path(project + b"/hostname"))
    os.chmod(system.path(project + b"/bin/run"), 0o755)
    os.chmod(system.path(project + b"/secret"), 0o600)
    os.chmod(system.path(project + b"/bin"), 0o750)
    for path in (b"/home/alice", project, project + b"/bin", project + b"/bin/run", project + b"/secret"):
        os.chown(system.path(path), 1234, 5678)
    os.lchown(system.path(project + b"/run"), 1234, 5678)
    for i, path in enumerate([project + b"/notes.txt", project + b"/bin/run", project + b"/bin", project, b"/home/alice"]):
        os.utime(system.path(path), ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_123_456_789 + i * 1000))
    for link in (project + b"/run", project + b"/hostname"):
        os.utime(system.path(link), ns=(1_500_000_000_000_000_000, 1_500_000_000_987_654_321), follow_symlinks=False)
    os.chmod(system.path(b"/home/alice"), 0o710)
    return system


def run(jwbackup, system, *args):
    return jwbackup("-c", system.config, "--root", system.root_dir, *args)


def backup(jwbackup, system):
    result = run(jwbackup, system)
    assert result.returncode == 0, result.stderr.decode()
    return system.generations()[-1]


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_deleted_directory_comes_back_with_contents_modes_owners_times_and_symlinks(jwbackup, system, sshd, where):
    system.configure(destination=ssh_destination(sshd) if where == "ssh" else "")
    alice, project = system.path(b"/home/alice"), system.path(b"/home/alice/project")
    before, alice_before = snapshot(project), os.lstat(alice)
    backup(jwbackup, system)
    shutil.rmtree(alice)  # the project and the directory above it
    result = run(jwbackup, system, "restore", "/home/alice/project")
    assert result.returncode == 0, result.stderr.decode()
    assert snapshot(project) == before
    alice_after = os.lstat(alice)  # recreated as it was, though only the project was asked for
    assert [getattr(alice_after, a) for a in ("st_mode", "st_uid", "st_gid", "st_mtime_ns")] == [
        getattr(alice_before, a) for a in ("st_mode", "st_uid", "st_gid", "st_mtime_ns")]
    assert os.listdir(alice) == [b"project"]


def test_dry_run_lists_what_would_be_restored_and_changes_nothing(jwbackup, system):
    system.configure()
    backup(jwbackup, system)
    shutil.rmtree(system.path(b"/home/alice/project/bin"))
    system.write(b"/home/alice/project/notes.txt", b"changed\n")
    home = system.path(b"/home")
    before = snapshot(home)
    result = run(jwbackup, system, "restore", "--dry-run", "/home/alice/project")
    assert result.returncode == 0, result.stderr.decode()
    assert snapshot(home) == before
    assert b"home/alice/project/bin/run" in result.stdout
    assert b"home/alice/project/notes.txt" in result.stdout


def test_restore_deletes_nothing_without_delete(jwbackup, system):
    system.configure()
    generation = backup(jwbackup, system)
    extra = system.write(b"/home/alice/project/new-since-the-backup", b"keep me\n")
    system.write(b"/home/alice/project/notes.txt", b"overwritten by the restore\n")
    result = run(jwbackup, system, "restore", "-g", generation, "/home/alice/project")
    assert result.returncode == 0, result.stderr.decode()
    assert os.path.exists(extra)
    with open(system.path(b"/home/alice/project/notes.txt"), "rb") as f:
        assert f.read() == b"remember the milk\n"
    result = run(jwbackup, system, "restore", "--delete", "/home/alice/project")
    assert result.returncode == 0, result.stderr.decode()
    assert not os.path.exists(extra)
    assert os.path.exists(system.path(b"/etc/hostname"))  # outside the restored tree: untouched


def test_restore_under_another_directory_keeps_the_original_alone(jwbackup, system, tmp_path):
    system.configure()
    backup(jwbackup, system)
    system.write(b"/home/alice/project/notes.txt", b"today's version\n")
    target = tmp_path / "restored"
    result = run(jwbackup, system, "restore", "--target", target, "/home/alice/project/notes.txt", "/etc/hostname")
    assert result.returncode == 0, result.stderr.decode()
    assert (target / "home/alice/project/notes.txt").read_bytes() == b"remember the milk\n"
    assert (target / "etc/hostname").read_bytes() == b"box\n"
    with open(system.path(b"/home/alice/project/notes.txt"), "rb") as f:
        assert f.read() == b"today's version\n"
    assert os.stat(target / "home/alice").st_uid == 1234  # missing parents come back as they were


def test_unknown_generation_and_missing_path_are_refused_in_one_line(jwbackup, system):
    system.configure()
    generation = backup(jwbackup, system)
    result = run(jwbackup, system, "restore", "-g", "2001-01-01-00:00:00", "/home")
    assert result.returncode == 64
    assert result.stderr.decode().strip().splitlines() == [
        f"jwbackup: error: unknown generation '2001-01-01-00:00:00'; generations: {generation}"
    ]
    result = run(jwbackup, system, "restore", "/home/bob")
    assert result.returncode == 64
    assert f"not in generation {generation}: /home/bob" in result.stderr.decode()


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_after_the_clock_went_back_restore_and_diff_take_the_last_run_not_the_newest_name(
        jwbackup, system, sshd, tmp_path, where):
    system.configure(destination=ssh_destination(sshd) if where == "ssh" else "")
    first = backup(jwbackup, system)
    ahead = "2099-01-01-00:00:00"  # made while the clock was ahead
    subprocess.run(["cp", "-a", system.dest / first, system.dest / ahead], check=True)
    system.write(b"/home/alice/project/notes.txt", b"remember the eggs\n")
    assert run(jwbackup, system).returncode == 0
    last = os.readlink(system.dest / "latest")
    assert last not in (first, ahead)
    for args in ([], ["-g", "latest"]):
        target = tmp_path / f"restored{len(args)}"
        result = run(jwbackup, system, "restore", *args, "-t", target, "/home/alice/project/notes.txt")
        assert result.returncode == 0, result.stderr.decode()
        assert (target / "home/alice/project/notes.txt").read_bytes() == b"remember the eggs\n"
    result = run(jwbackup, system, "diff", first, "latest")
    assert result.stdout.splitlines() == [b"M /home/alice/project/notes.txt"]

    os.unlink(system.dest / "latest")  # without it, the newest name is all there is to go by
    target = tmp_path / "by-name"
    result = run(jwbackup, system, "restore", "-t", target, "/home/alice/project/notes.txt")
    assert result.returncode == 0, result.stderr.decode()
    assert (target / "home/alice/project/notes.txt").read_bytes() == b"remember the milk\n"


def test_diff_between_generations_lists_added_removed_and_changed_only(jwbackup, system):
    system.configure()
    first = backup(jwbackup, system)
    system.write(b"/home/alice/project/notes.txt", b"remember the eggs\n")
    os.unlink(system.path(b"/home/alice/project/secret"))
    system.write(b"/home/alice/new file", b"new\n")
    os.chmod(system.path(b"/root/.profile"), 0o600)
    second = backup(jwbackup, system)
    result = run(jwbackup, system, "diff", first, second)
    assert result.returncode == 0, result.stderr.decode()
    lines = set(result.stdout.splitlines())
    assert b"M /home/alice/project/notes.txt" in lines
    assert b"- /home/alice/project/secret" in lines
    assert b"+ /home/alice/new file" in lines
    assert b"M /root/.profile" in lines
    assert not [line for line in lines if b"hostname" in line or b"state.db" in line]
    nul = run(jwbackup, system, "diff", "-0", first, second).stdout.split(b"\0")
    assert b"M /home/alice/project/name with\nnewline" not in nul  # unchanged: shared inode
    assert b"- /home/alice/project/secret" in nul


def test_diff_without_null_separation_exits_1_when_it_leaves_a_newline_name_out(jwbackup, system):
    system.configure()
    first = backup(jwbackup, system)
    system.write(b"/home/alice/new\nline", b"new\n")
    second = backup(jwbackup, system)
    result = run(jwbackup, system, "diff", first, second)
    assert result.returncode == 1
    assert b"line" not in result.stdout
    assert "1 paths hold a newline and were left out; use -0" in result.stderr.decode()
    result = run(jwbackup, system, "diff", "-0", first, second)
    assert result.returncode == 0
    assert b"+ /home/alice/new\nline" in result.stdout.split(b"\0")


def test_diff_sees_a_change_of_xattrs_or_acls_alone(jwbackup, system):
    def changes(*args):
        result = run(jwbackup, system, "diff", *args)
        assert result.returncode == 0, result.stderr.decode()
        return [line for line in result.stdout.splitlines() if b"/var/lib/jwbackup/" not in line]  # jwbackup's own

    system.configure()
    notes, profile = system.path(b"/home/alice/project/notes.txt"), system.path(b"/root/.profile")
    os.setxattr(notes, "user.tag", b"draft")
    first = backup(jwbackup, system)
    assert changes(first) == []
    os.setxattr(notes, "user.tag", b"final")
    subprocess.run(["setfacl", "-m", "u:nobody:r", profile], check=True)
    second = backup(jwbackup, system)
    assert changes(first, second) == [b"M /home/alice/project/notes.txt", b"M /root/.profile"]
    assert changes(first) == [b"M /home/alice/project/notes.txt", b"M /root/.profile"]
    assert changes(second) == []


def test_diff_against_the_system_now(jwbackup, system):
    system.configure()
    generation = backup(jwbackup, system)
    system.write(b"/home/alice/project/notes.txt", b"longer than it was before\n")
    os.unlink(system.path(b"/etc/hostname"))
    system.write(b"/srv/new", b"x\n")
    result = run(jwbackup, system, "diff", generation)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.splitlines()
    assert b"M /home/alice/project/notes.txt" in lines
    assert b"- /etc/hostname" in lines
    assert b"+ /srv/new" in lines
    assert not [line for line in lines if b"state.db" in line or b"/usr/bin/tool" in line]


def test_delete_removes_only_what_a_backup_now_would_hold_and_the_generation_does_not(jwbackup, system):
    """Installed files, pruned, .no-backup and cache-tagged directories and the
    backups themselves are left out of a generation by design: --delete keeps them."""
    kept = [
        system.path(b"/usr/bin/tool"),  # installed, unmodified
        system.path(b"/etc/tool.conf"),  # an unmodified conffile
        system.write(b"/home/alice/scratch/.no-backup", b""),
        system.write(b"/home/alice/scratch/big", b"left out\n"),
        system.write(b"/home/alice/.cache/CACHEDIR.TAG", CACHEDIR_TAG),
        system.write(b"/home/alice/.cache/thumb", b"left out\n"),
        system.write(b"/var/cache/app/data", b"pruned\n"),
    ]
    system.dest = Path(os.fsdecode(system.path(b"/var/backups/jwbackup")))  # under a restored directory
    system.dest.mkdir(mode=0o700, parents=True)
    system.configure()
    generation = backup(jwbackup, system)
    created = [
        system.write(b"/home/alice/project/new-since-the-backup", b"delete me\n"),
        system.write(b"/home/alice/new dir/deeper/file", b"delete me\n"),
        system.write(b"/etc/new.conf", b"delete me\n"),
        system.write(b"/var/lib/app/new", b"delete me\n"),
    ]
    paths = ["/home/alice", "/etc", "/usr", "/var"]
    result = run(jwbackup, system, "restore", "--dry-run", "--delete", *paths)
    assert result.returncode == 0, result.stderr.decode()
    deleting = sorted(line.split(None, 1)[1] for line in result.stdout.splitlines() if line.startswith(b"*deleting"))
    assert deleting == [b"etc/new.conf", b"home/alice/new dir/", b"home/alice/new dir/deeper/",
                        b"home/alice/new dir/deeper/file", b"home/alice/project/new-since-the-backup",
                        b"var/lib/app/new"]
    assert all(os.path.exists(p) for p in created)
    result = run(jwbackup, system, "restore", "--delete", *paths)
    assert result.returncode == 0, result.stderr.decode()
    assert [p for p in created if os.path.lexists(p)] == []
    assert not os.path.lexists(system.path(b"/home/alice/new dir"))
    assert [p for p in kept if not os.path.exists(p)] == []
    assert system.generations() == [generation]
    assert os.path.exists(system.in_generation(generation, b"/home/alice/project/notes.txt"))


def test_a_dry_run_of_delete_prints_odd_names_as_rsync_does(jwbackup, system, tmp_path):
    system.configure()
    backup(jwbackup, system)
    names = [b"new\nline", b"caf\xe9", b"caf\xc3\xa9", b"tab\there", b"lit\\#123", b"\x01ctl", b"plain"]
    for name in names:
        system.write(b"/home/alice/created/" + name, b"delete me\n")
    result = run(jwbackup, system, "restore", "-n", "--delete", "/home/alice")
    assert result.returncode == 0, result.stderr.decode()
    ours = sorted(line for line in result.stdout.split(b"\n") if line.startswith(b"*deleting"))

    # rsync's own --delete, run over the same names, prints the same lines.
    (tmp_path / "empty/home/alice").mkdir(parents=True)
    shutil.copytree(os.fsdecode(system.path(b"/home/alice/created")), tmp_path / "copy/home/alice/created")
    theirs = subprocess.run(["rsync", "-rni", "--delete", f"{tmp_path}/empty/", f"{tmp_path}/copy/"],
                            env={**os.environ, "LC_ALL": "C"}, check=True, capture_output=True).stdout
    assert ours == sorted(line for line in theirs.split(b"\n") if line.startswith(b"*deleting"))
    assert len(ours) == len(names) + 1 and b"*deleting   home/alice/created/new\\#012line" in ours


def test_a_dry_run_of_delete_previews_a_file_that_became_a_directory_as_the_real_run_goes(jwbackup, system):
    system.configure()
    backup(jwbackup, system)
    notes = system.path(b"/home/alice/project/notes.txt")
    os.unlink(notes)
    system.write(b"/home/alice/project/notes.txt/draft", b"delete me\n")  # a directory of new files now
    result = run(jwbackup, system, "restore", "-n", "--delete", "/home/alice/project")
    assert (result.returncode, result.stderr.decode()) == (0, "")
    lines = result.stdout.splitlines()
    assert b"*deleting   home/alice/project/notes.txt/draft" in lines
    assert b">f+++++++++ home/alice/project/notes.txt" in lines and not [line for line in lines if b"cannot" in line]
    assert os.path.isdir(notes)  # a dry run
    result = run(jwbackup, system, "restore", "--delete", "/home/alice/project")
    assert (result.returncode, result.stderr.decode()) == (0, "")
    with open(notes, "rb") as f:
        assert f.read() == b"remember the milk\n"


def test_delete_never_goes_outside_the_configured_roots(jwbackup, system):
    system.configure(roots=("/home", "/etc"))
    generation = backup(jwbackup, system)
    outside = [system.path(p) for p in (b"/var/lib/dpkg/status", b"/var/lib/app/state.db", b"/usr/local/bin/script",
                                        b"/usr/bin/tool", b"/bin")]
    outside.append(system.write(b"/opt/app/new-since", b"not a root\n"))
    created = system.write(b"/home/alice/new-since", b"delete me\n")
    result = run(jwbackup, system, "restore", "--delete", "/")
    assert result.returncode == 0, result.stderr.decode()
    assert not os.path.lexists(created)
    assert [p for p in outside if not os.path.lexists(p)] == []
    assert system.generations() == [generation]


def test_a_path_through_a_symlink_out_of_the_generation_is_refused_not_read_from_the_host(jwbackup, system, tmp_path):
    hostside = tmp_path / "hostside"
    hostside.mkdir()
    (hostside / "secret.txt").write_bytes(b"the live host's file\n")
    os.symlink(hostside, system.path(b"/home/alice/data"))
    system.configure()
    generation = backup(jwbackup, system)
    target = tmp_path / "restored"
    result = run(jwbackup, system, "restore", "-t", target, "/home/alice/data/secret.txt")
    assert result.returncode == 64
    assert result.stderr.decode().strip().splitlines() == [
        f"jwbackup: error: not in generation {generation}: /home/alice/data/secret.txt "
        f"(through /home/alice/data -> {hostside})"
    ]
    assert not os.path.lexists(target / "home/alice/data")


def test_a_path_through_a_symlink_within_the_generation_is_restored_where_it_leads(jwbackup, system, tmp_path):
    system.write(b"/usr/bin/mine", b"#!/bin/sh\necho mine\n")  # /bin -> usr/bin: usrmerge
    os.symlink(b"../project/bin", system.path(b"/home/alice/tools"))
    os.rename(system.path(b"/home/alice/project"), system.path(b"/home/project"))
    system.configure()
    generation = backup(jwbackup, system)
    assert os.path.islink(system.in_generation(generation, b"/bin"))
    target = tmp_path / "restored"
    result = run(jwbackup, system, "restore", "-t", target, "/bin/mine", "/home/alice/tools/run")
    assert result.returncode == 0, result.stderr.decode()
    assert (target / "usr/bin/mine").read_bytes() == b"#!/bin/sh\necho mine\n"
    assert (target / "home/project/bin/run").read_bytes() == b"#!/bin/sh\necho run\n"
    assert not os.path.lexists(target / "bin") and not os.path.lexists(target / "home/alice")
    assert f"/bin/mine is /usr/bin/mine in generation {generation}" in (tmp_path / "jwbackup.log").read_text()


def test_dotdot_in_a_symlink_leads_where_the_kernel_takes_it(jwbackup, system, tmp_path):
    """``current/..`` is the parent of where ``current`` leads, not the directory holding ``current``."""
    system.write(b"/srv/releases/shared/site.conf", b"the one the kernel reaches\n")
    system.write(b"/srv/releases/r2/app", b"r2\n")
    system.write(b"/srv/app/shared/site.conf", b"the one lexically there\n")
    os.symlink(b"../releases/r2", system.path(b"/srv/app/current"))
    os.symlink(b"../../srv/app/current/../shared", system.path(b"/home/alice/config"))
    with open(system.path(b"/home/alice/config/site.conf"), "rb") as f:
        assert f.read() == b"the one the kernel reaches\n"
    system.configure(roots=("/home", "/srv"))
    backup(jwbackup, system)
    target = tmp_path / "restored"
    result = run(jwbackup, system, "restore", "-t", target, "/home/alice/config/site.conf")
    assert result.returncode == 0, result.stderr.decode()
    assert (target / "srv/releases/shared/site.conf").read_bytes() == b"the one the kernel reaches\n"
    assert not (target / "srv/app").exists()
    # Through a file, ".." leads nowhere (ENOTDIR), though taken lexically it names the same file.
    os.symlink(b"../../srv/releases/r2/app/../../shared", system.path(b"/home/alice/broken"))
    assert not os.path.exists(system.path(b"/home/alice/broken/site.conf"))
    backup(jwbackup, system)
    result = run(jwbackup, system, "restore", "-t", target, "/home/alice/broken/site.conf")
    assert result.returncode == 64
    assert b"not in generation" in result.stderr and b"/home/alice/broken/site.conf (through" in result.stderr


@pytest.fixture
def read_only(tmp_path):
    """``read_only(directory)``: a read-only bind mount of ``directory``, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    mounted = []

    def mount(directory) -> Path:
        point = tmp_path / f"read-only-{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "--bind", directory, point], check=True)
        mounted.append(point)
        subprocess.run(["mount", "-o", "remount,bind,ro", point], check=True)
        return point

    try:
        yield mount
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", point], check=True)


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_a_read_only_destination_can_be_listed_restored_from_and_compared(jwbackup, system, sshd, read_only,
                                                                           tmp_path, where):
    ssh = ssh_destination(sshd) if where == "ssh" else ""
    system.configure(destination=ssh)
    generation = backup(jwbackup, system)
    system.write(b"/home/alice/project/notes.txt", b"changed since\n")
    system.configure(directory=read_only(system.dest), destination=ssh)
    result = run(jwbackup, system, "list")
    assert result.returncode == 0, result.stderr.decode()
    assert generation.encode() in result.stdout
    target = tmp_path / "restored"
    result = run(jwbackup, system, "restore", "-t", target, "/home/alice/project/notes.txt")
    assert result.returncode == 0, result.stderr.decode()
    assert (target / "home/alice/project/notes.txt").read_bytes() == b"remember the milk\n"
    result = run(jwbackup, system, "diff", generation)
    assert result.returncode == 0, result.stderr.decode()
    assert b"M /home/alice/project/notes.txt" in result.stdout.splitlines()
    result = run(jwbackup, system, "restore", "--packages")
    assert result.returncode == 0, result.stderr.decode()
    assert b"apt-get install" in result.stdout
    result = run(jwbackup, system)  # a backup writes: refused
    assert result.returncode == 75
    assert "is not writable" in result.stderr.decode()


def test_a_file_changed_without_changing_size_or_mtime_is_restored(jwbackup, system):
    system.configure()
    backup(jwbackup, system)
    notes = system.path(b"/home/alice/project/notes.txt")
    recorded = os.lstat(notes)
    system.write(b"/home/alice/project/notes.txt", b"remember the milK\n")  # same size
    os.utime(notes, ns=(recorded.st_atime_ns, recorded.st_mtime_ns))
    result = run(jwbackup, system, "restore", "/home/alice/project")
    assert result.returncode == 0, result.stderr.decode()
    with open(notes, "rb") as f:
        assert f.read() == b"remember the milk\n"


def test_a_restore_that_cannot_write_everything_says_it_is_incomplete_and_what_failed(jwbackup, system, tmp_path):
    system.configure()
    generation = backup(jwbackup, system)
    notes = system.path(b"/home/alice/project/notes.txt")
    os.unlink(notes)
    system.write(b"/home/alice/project/notes.txt/since", b"a directory now, not empty\n")
    os.unlink(system.path(b"/home/alice/project/secret"))
    result = run(jwbackup, system, "restore", "/home/alice/project")
    assert result.returncode == 74
    lines = result.stderr.decode().strip().splitlines()
    assert lines[-1] == (f"jwbackup: error: restore from {generation} to {system.root_dir} is incomplete: "
                         "could not make way for new regular file: home/alice/project/notes.txt")
    assert "restored" not in (tmp_path / "jwbackup.log").read_text()
    assert os.path.exists(system.path(b"/home/alice/project/secret"))  # the rest came back

"""The package state in every generation, ``jwbackup list`` and ``restore --packages``."""

from __future__ import annotations

import grp
import os
import shutil
import subprocess

import pytest

from backupenv import System
from fakeroot import DebianRoot, md5hex
from gentooroot import GentooRoot
from jwbackup import pkgstate
from jwbackup.restore import package_plan

STATE = b"/var/lib/jwbackup/packages"


def read(path) -> str:
    with open(path, "rb") as f:
        return f.read().decode()


def test_dpkg_state_names_each_package_with_version_and_the_manual_ones(tmp_path):
    root = DebianRoot(tmp_path / "system")
    root.package("editor", version="2:9.0-1", files={b"/usr/bin/editor": b"e"})
    root.package("libthing", version="1.2-3", multi_arch="same", files={b"/usr/lib/x86_64/libthing": b"t"}, auto=True)
    root.package("libthing", version="1.2-3", arch="i386", multi_arch="same",
                 files={b"/usr/lib/i386/libthing": b"t"})
    root.package("helper", version="0.1", auto=True, files={b"/usr/bin/helper": b"h"})
    root.package("gone", status="deinstall ok config-files", files={b"/etc/gone.conf": b"c"}, conffiles=[b"/etc/gone.conf"])
    root.write()
    directory = pkgstate.write(os.fsdecode(root.root))
    assert directory == os.fsdecode(root.path(STATE))
    assert read(root.path(STATE + b"/packages")).splitlines() == [
        "editor 2:9.0-1 amd64", "libthing 1.2-3 amd64", "libthing 1.2-3 i386", "helper 0.1 amd64",
    ]
    assert read(root.path(STATE + b"/manual")).splitlines() == ["editor", "libthing:i386"]


def test_dpkg_state_keeps_the_overrides_and_the_local_diversions(tmp_path):
    root = DebianRoot(tmp_path / "system")
    root.package("svc", files={b"/usr/lib/svc/helper": b"h", b"/usr/bin/tool": b"t"})
    root.write()
    admin = root.path(b"/var/lib/dpkg")
    with open(admin + b"/statoverride", "wb") as f:
        f.write(b"root adm 4750 /usr/lib/svc/helper\nroot root 755 /usr/lib/with space\n")
    with open(admin + b"/diversions", "wb") as f:
        f.write(b"/usr/bin/tool\n/usr/bin/tool.distrib\n:\n/bin/sh\n/bin/sh.distrib\ndash\n")
    pkgstate.write(os.fsdecode(root.root))
    assert read(root.path(STATE + b"/statoverride")) == "root adm 4750 /usr/lib/svc/helper\nroot root 755 /usr/lib/with space\n"
    assert read(root.path(STATE + b"/diversions")) == "/usr/bin/tool\n/usr/bin/tool.distrib\n:\n"
    state = pkgstate.read_directory(os.fsdecode(root.root))
    assert state.overrides == [("root", "adm", "4750", "/usr/lib/svc/helper"), ("root", "root", "755", "/usr/lib/with space")]
    assert state.diversions == [("/usr/bin/tool", "/usr/bin/tool.distrib")]


def test_dpkg_state_names_the_conffiles_that_were_deleted(tmp_path):
    """A fresh install puts back a conffile the admin deleted (a cron job, a
    site config): the state says which, by the name the file had on disk."""
    root = DebianRoot(tmp_path / "system")
    root.package("svc", files={b"/etc/svc.conf": b"c", b"/etc/cron.d/svc": b"job", b"/etc/svc/a b": b"s",
                               b"/etc/svc/kept": b"k", b"/etc/svc/old": b"o", b"/etc/svc/moved": b"m",
                               b"/etc/svc/hook": b"h"},
                 conffiles={b"/etc/svc.conf": None, b"/etc/cron.d/svc": None, b"/etc/svc/a b": None,
                            b"/etc/svc/kept": None, b"/etc/svc/old": md5hex(b"o") + " obsolete",
                            b"/etc/svc/moved": None, b"/etc/svc/hook": "newconffile remove-on-upgrade"})
    root.package("gone", status="deinstall ok config-files", files={b"/etc/gone.conf": b"g"},
                 conffiles=[b"/etc/gone.conf"])
    root.divert(b"/etc/svc/moved", b"/etc/svc/moved.local")
    root.write()
    for path in (b"/etc/cron.d/svc", b"/etc/svc/a b", b"/etc/svc/old", b"/etc/svc/hook", b"/etc/svc/moved.local",
                 b"/etc/gone.conf"):
        os.unlink(root.path(path))
    os.unlink(root.path(b"/etc/svc/kept"))
    os.symlink(b"/nowhere", root.path(b"/etc/svc/kept"))  # replaced by a dangling link: still there
    pkgstate.write(os.fsdecode(root.root))
    assert read(root.path(STATE + b"/removed-conffiles")).splitlines() == [
        "/etc/cron.d/svc", "/etc/svc/a b", "/etc/svc/moved.local",
    ]
    state = pkgstate.read_directory(os.fsdecode(root.root))
    assert state.removed_conffiles == ["/etc/cron.d/svc", "/etc/svc/a b", "/etc/svc/moved.local"]
    plan = package_plan(state, "generation G")
    assert plan[plan.index("apt-get update") + 2:] == [
        "# Configuration files that had been deleted; installing the packages put them back:",
        "rm -f -- /etc/cron.d/svc '/etc/svc/a b' /etc/svc/moved.local",
    ]


def test_portage_state_copies_world_files_and_lists_installed_versions(tmp_path):
    root = GentooRoot(tmp_path / "gentoo")
    root.package("app-editors/vim-9.0.1-r2", files={b"/usr/bin/vim": b"v"})
    root.package("dev-libs/libfoo-1.0", files={b"/usr/lib/libfoo.so": b"f"})
    root.world(["app-editors/vim  # the editor", "# sys-apps/removed"])
    root.world_sets(["@desktop\tmine"])
    root.set("desktop", ["dev-libs/libfoo"])
    root.write()
    pkgstate.write(str(root.path))
    state = root.path / "var/lib/jwbackup/packages"
    assert (state / "installed").read_text().splitlines() == ["app-editors/vim-9.0.1-r2", "dev-libs/libfoo-1.0"]
    assert (state / "world").read_text() == "app-editors/vim  # the editor\n# sys-apps/removed\n"
    assert (state / "world_sets").read_text() == "@desktop\tmine\n"
    plan = package_plan(pkgstate.parse({n: (state / n).read_bytes() for n in pkgstate.PORTAGE_FILES}), "generation G")
    assert plan[-1] == "emerge --ask --noreplace app-editors/vim @desktop"


@pytest.fixture
def system(tmp_path):
    system = System(tmp_path)
    system.root.package("curl", version="7.88.1-10", files={b"/usr/bin/curl": b"curl"})
    system.root.package("libcurl4", version="7.88.1-10", files={b"/usr/lib/libcurl.so.4": b"lib"}, auto=True)
    system.root.package("zsh", version="5.9-4", files={b"/usr/bin/zsh": b"zsh"})
    system.root.write()
    system.configure()
    return system


def run(jwbackup, system, *args):
    result = jwbackup("-c", system.config, "--root", system.root_dir, *args)
    assert result.returncode == 0, result.stderr.decode()
    return result


def test_every_generation_holds_the_package_state_and_list_counts_the_packages(jwbackup, system):
    run(jwbackup, system, "--dry-run")
    assert not os.path.exists(system.path(STATE)), "a dry run writes nothing"
    run(jwbackup, system)
    first = system.generations()[-1]
    assert read(system.in_generation(first, STATE + b"/manual")).split() == ["curl", "tool", "zsh"]
    assert "libcurl4 7.88.1-10 amd64" in read(system.in_generation(first, STATE + b"/packages"))
    shutil.rmtree(system.in_generation(first, STATE))  # as if made by an older jwbackup
    run(jwbackup, system)
    second = system.generations()[-1]
    table = run(jwbackup, system, "list").stdout.decode().splitlines()
    assert table[0].split() == ["GENERATION", "ENTRIES", "SIZE", "PACKAGES"]
    rows = {line.split()[0]: line.split()[-1] for line in table[1:]}
    assert rows == {second: "4", first: "?"}


def test_a_package_state_that_did_not_change_is_shared_between_generations_and_diff_passes_it_by(jwbackup, system):
    run(jwbackup, system)
    first = system.generations()[-1]
    run(jwbackup, system)
    second = system.generations()[-1]
    for name in pkgstate.DPKG_FILES:
        path = STATE + b"/" + name.encode()
        assert os.stat(system.in_generation(first, path)).st_ino == os.stat(system.in_generation(second, path)).st_ino
    assert b"/var/lib/jwbackup" not in run(jwbackup, system, "diff", first, second).stdout

    system.root.package("mc", version="3:4.8.29-2", files={b"/usr/bin/mc": b"mc"})
    system.root.write()
    run(jwbackup, system)
    changed = run(jwbackup, system, "diff", second, system.generations()[-1]).stdout.splitlines()
    assert [line for line in changed if b"/var/lib/jwbackup/" in line] == [
        b"M /var/lib/jwbackup/packages/manual", b"M /var/lib/jwbackup/packages/packages",
    ]


def test_restore_packages_prints_install_commands_naming_every_manual_package(jwbackup, system):
    run(jwbackup, system)
    plan = run(jwbackup, system, "restore", "--packages").stdout.decode().splitlines()
    assert "apt-get update" in plan
    install = next(line for line in plan if line.startswith("apt-get install ") and "--mark-auto" not in line)
    assert install.split()[2:] == ["curl", "tool", "zsh"]
    assert "apt-get install --mark-auto libcurl4" in plan
    exact = run(jwbackup, system, "restore", "--packages", "--exact-versions").stdout.decode()
    assert "apt-get install curl=7.88.1-10 tool=1.0-1 zsh=5.9-4" in exact


def test_plan_puts_back_local_diversions_and_overrides_with_commands_dpkg_takes(jwbackup, system, tmp_path):
    admin = system.path(b"/var/lib/dpkg")
    with open(admin + b"/statoverride", "wb") as f:  # as dpkg-statoverride writes them
        f.write(b"root adm 4750 /usr/bin/curl\n#12345 #54321 755 /usr/bin/tr ail \nroot root 700 /usr/bin/caf\xe9\n")
    with open(admin + b"/diversions", "wb") as f:  # a local one, and one a package made
        f.write(b"/usr/bin/zsh\n/usr/bin/zsh.real\n:\n/bin/sh\n/bin/sh.distrib\ndash\n")
    run(jwbackup, system)
    plan = run(jwbackup, system, "restore", "--packages").stdout.decode("utf-8", "surrogateescape").splitlines()
    divert = "dpkg-divert --local --rename --divert /usr/bin/zsh.real --add /usr/bin/zsh"
    override = "dpkg-statoverride --force-statoverride-add --update --add root adm 4750 /usr/bin/curl"
    commands = [line for line in plan if not line.startswith(("#", " "))]
    assert [c.split()[0] for c in commands] == ["dpkg-divert", "apt-get", "apt-get", "apt-get"] + 3 * ["dpkg-statoverride"]
    assert commands[0] == divert and commands[-3] == override
    raw = run(jwbackup, system, "restore", "--packages").stdout.splitlines()
    assert raw[-2:] == [
        b"dpkg-statoverride --force-statoverride-add --update --add '#12345' '#54321' 755 '/usr/bin/tr ail '",
        b"dpkg-statoverride --force-statoverride-add --update --add root root 700 '/usr/bin/caf\xe9'",
    ]

    # The commands work: on the system as a reinstall leaves it (no diversion,
    # no override), dpkg's own tools take them (with --root for the fake root).
    fresh = tmp_path / "fresh"
    shutil.copytree(system.root_dir, fresh, symlinks=True)
    for name in ("statoverride", "diversions"):
        (fresh / "var/lib/dpkg" / name).write_bytes(b"")
    for line in (divert, override):
        program, *args = line.split()
        subprocess.run([program, "--root", str(fresh), *args], check=True, capture_output=True)
    assert (fresh / "usr/bin/zsh.real").read_bytes() == b"zsh" and not (fresh / "usr/bin/zsh").exists()
    st = os.stat(fresh / "usr/bin/curl")
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == ("0o4750", 0, grp.getgrnam("adm").gr_gid)


def test_generators_write_the_package_state_first_unless_told_not_to(jwbackup, system, tmp_path):
    """borg, restic and tar archive what ``files`` and ``excludes`` leave in: the state goes with it."""
    rules = tmp_path / "excludes.borg"
    run(jwbackup, system, "excludes", "--format", "borg", "-o", rules, "--no-package-state")
    assert not os.path.exists(system.path(STATE))
    run(jwbackup, system, "files", "--no-package-state")
    assert not os.path.exists(system.path(STATE))

    run(jwbackup, system, "excludes", "--format", "borg", "-o", rules)
    assert read(system.path(STATE + b"/manual")).split() == ["curl", "tool", "zsh"]
    assert "zsh 5.9-4 amd64" in read(system.path(STATE + b"/packages"))
    assert b"/usr/bin/zsh\n" in rules.read_bytes() and b"/var/lib/jwbackup/" not in rules.read_bytes()

    shutil.rmtree(system.path(STATE))
    listed = run(jwbackup, system, "files", "-0").stdout.split(b"\0")
    assert system.path(STATE + b"/manual") in listed and system.path(STATE + b"/packages") in listed
    assert read(system.path(STATE + b"/manual")).split() == ["curl", "tool", "zsh"]


def test_restore_packages_from_a_state_another_tool_restored(jwbackup, system, tmp_path):
    run(jwbackup, system, "excludes", "-o", tmp_path / "rules")
    restored = tmp_path / "restored"  # as tar or borg extract would leave it
    shutil.copytree(os.fsdecode(system.path(STATE)), restored / "var/lib/jwbackup/packages")
    for directory in (restored, restored / "var/lib/jwbackup/packages"):
        plan = run(jwbackup, system, "restore", "--packages", "--from", directory).stdout.decode().splitlines()
        assert plan[0].startswith(f"# Reinstall plan from {directory} (dpkg): 4 packages, 3 installed explicitly")
        assert "apt-get install curl tool zsh" in plan
        assert "apt-get install --mark-auto libcurl4" in plan

    (tmp_path / "empty").mkdir()
    empty = jwbackup("-c", system.config, "restore", "--packages", "--from", tmp_path / "empty")
    assert empty.returncode != 0 and empty.stdout == b""
    assert empty.stderr.decode().splitlines() == [
        f"jwbackup: error: {tmp_path / 'empty'} holds no package state: name the restored "
        "/var/lib/jwbackup/packages, or the directory the system was restored under"
    ]
    missing = jwbackup("-c", system.config, "restore", "--packages", "--from", tmp_path / "missing")
    assert missing.returncode != 0
    assert missing.stderr.decode().splitlines() == [f"jwbackup: error: {tmp_path / 'missing'}: no such directory"]
    both = jwbackup("-c", system.config, "restore", "--packages", "--from", restored, "-g", "2026-01-01-00:00:00")
    assert both.returncode == 64 and b"not both" in both.stderr


def test_long_plans_wrap_into_a_shell_command_over_several_lines():
    state = pkgstate.State("dpkg", packages=[(f"package-{i:03}", "1.0", "amd64") for i in range(40)],
                           manual=[f"package-{i:03}" for i in range(40)])
    plan = package_plan(state, "generation G")
    start = plan.index(next(line for line in plan if line.startswith("apt-get install")))
    command = plan[start:]
    assert all(len(line) <= 78 for line in command)
    assert all(line.endswith(" \\") for line in command[:-1])
    assert " ".join(line.rstrip("\\").strip() for line in command).split()[2:] == state.manual

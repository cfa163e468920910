"""jwbackup feeding restic and GNU tar, proven with the real tools.

Both ways are checked: the file list (``jwbackup files -0``) and the exclude
rules (``jwbackup excludes --format restic|tar``).  Each archive, restored,
holds exactly the non-directories of a jwbackup rsync generation of the same
fake root (see test_borg.py for the names that make this hard).
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from backupenv import System
from conftest import JWBACKUP
from test_borg import OWNED, PRUNED, SKIPPED, backed_up_system, non_directories

from jwbackup.excludes import write_rules

@pytest.fixture
def system(tmp_path):
    return backed_up_system(tmp_path)


needs_restic = pytest.mark.skipif(not shutil.which("restic"), reason="restic is not installed (Debian package restic)")


def jwbackup_to(argv: list, consumer: list, tmp: Path, env=None) -> None:
    """``jwbackup ARGV | CONSUMER``, both must succeed."""
    producer = subprocess.Popen([JWBACKUP, "-l", str(tmp / "jwbackup.log"), *argv], stdout=subprocess.PIPE)
    result = subprocess.run(consumer, stdin=producer.stdout, capture_output=True, env=env, timeout=120)
    producer.stdout.close()
    assert producer.wait() == 0
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def excludes(tmp: Path, cfg: Path, root: bytes, fmt: str) -> tuple[Path, bytes]:
    path = tmp / f"excludes.{fmt}"
    result = subprocess.run([JWBACKUP, "-l", "-", "-c", cfg, "--root", root, "excludes", "--format", fmt, "-o", path],
                            capture_output=True)
    assert result.returncode == 0, result.stderr
    return path, result.stderr


@pytest.fixture
def restic(tmp_path):
    env = {**os.environ, "RESTIC_REPOSITORY": str(tmp_path / "restic-repo"), "RESTIC_PASSWORD": "test password",
           "RESTIC_CACHE_DIR": str(tmp_path / "restic-cache")}
    subprocess.run(["restic", "init"], env=env, check=True, capture_output=True)

    def restored() -> bytes:
        target = tmp_path / "restored"
        subprocess.run(["restic", "restore", "latest", "--target", target], env=env, check=True, capture_output=True)
        return os.fsencode(target)

    return env, restored


@needs_restic
def test_restic_files_from_raw_holds_exactly_the_generation(system, tmp_path, restic):
    root, cfg, expected = system
    env, restored = restic
    jwbackup_to(["-c", cfg, "--root", root, "files", "-0", "--no-dirs"],
                ["restic", "backup", "--files-from-raw", "-"], tmp_path, env)
    assert non_directories(restored() + root) == expected


@needs_restic
def test_restic_files_from_raw_leaves_out_a_swap_file_alone_in_its_directory(tmp_path, restic):
    system = System(tmp_path)  # /swap/swapfile is how btrfs wants one: in a directory of its own
    system.write(b"/etc/fstab", b"/swap/swapfile none swap sw 0 0\n")
    system.write(b"/swap/swapfile", b"pages of memory" * 100)
    system.configure()
    root = os.fsencode(system.root_dir)
    listed = subprocess.run([JWBACKUP, "-l", "-", "-c", system.config, "--root", root, "files", "-0", "--no-dirs"],
                            capture_output=True, check=True).stdout.split(b"\0")
    assert root + b"/etc/fstab" in listed and not [p for p in listed if p.startswith(root + b"/swap")]
    env, restored = restic
    jwbackup_to(["-c", system.config, "--root", root, "files", "-0", "--no-dirs"],
                ["restic", "backup", "--files-from-raw", "-"], tmp_path, env)
    target = restored() + root
    assert os.path.isfile(target + b"/etc/fstab") and not os.path.lexists(target + b"/swap/swapfile")


def test_rsync_files_from_copies_exactly_the_listed_files_and_no_swap_file(tmp_path):
    system = System(tmp_path)
    system.write(b"/etc/fstab", b"/swapfile none swap sw 0 0\n")
    system.write(b"/swapfile", b"pages of memory" * 100)  # right in /, where Debian's installer puts it
    system.configure()
    root = os.fsencode(system.root_dir)
    listed = subprocess.run([JWBACKUP, "-l", "-", "-c", system.config, "--root", root, "files", "-0"],
                            capture_output=True, check=True).stdout
    copy = tmp_path / "copy"
    subprocess.run(["rsync", "-aHAX", "--files-from=-", "--from0", "/", copy], input=listed, check=True)
    copied = non_directories(os.fsencode(copy) + root)
    assert copied == {p[len(root):] for p in listed.split(b"\0") if p and not stat.S_ISDIR(os.lstat(p).st_mode)}
    assert b"/etc/fstab" in copied and b"/swapfile" not in copied


@needs_restic
def test_restic_exclude_file_round_trip_leaves_out_exactly_the_installed_files(system, tmp_path, restic):
    root, cfg, expected = system
    env, restored = restic
    rules, stderr = excludes(tmp_path, cfg, root, "restic")
    assert b"cannot express" not in stderr
    subprocess.run(["restic", "backup", "--exclude-caches", "--exclude-if-present", ".no-backup", "--exclude-file", rules,
                    root], env=env, check=True, capture_output=True)
    # restic keeps the tag files themselves (CACHEDIR.TAG, .no-backup), nothing else of those directories
    tags = {p for p in SKIPPED if p.endswith((b"/CACHEDIR.TAG", b"/.no-backup"))} | {b"/var/lib/jwbackup/cache/CACHEDIR.TAG"}
    assert non_directories(restored() + root) - tags == expected


@needs_restic
def test_restic_exclude_file_leaves_out_the_prune_list_as_jwbackup_does(tmp_path, restic):
    root, cfg, expected = backed_up_system(tmp_path, default_prune=True)
    env, restored = restic
    rules, stderr = excludes(tmp_path, cfg, root, "restic")
    subprocess.run(["restic", "backup", "--exclude-caches", "--exclude-if-present", ".no-backup", "--exclude-file", rules,
                    root], env=env, check=True, capture_output=True)
    archived = non_directories(restored() + root)
    assert not archived & set(PRUNED)
    tags = {p for p in SKIPPED if p.endswith((b"/CACHEDIR.TAG", b"/.no-backup"))} | {b"/var/lib/jwbackup/cache/CACHEDIR.TAG"}
    assert archived - tags == expected


def extract(archive: Path, tmp: Path) -> bytes:
    target = tmp / "extracted"
    target.mkdir()
    subprocess.run(["tar", "-xf", archive, "-C", target], check=True, capture_output=True)
    return os.fsencode(target)


def test_tar_null_file_list_holds_exactly_the_generation(system, tmp_path):
    root, cfg, expected = system
    archive = tmp_path / "backup.tar"
    jwbackup_to(["-c", cfg, "--root", root, "files", "-0"],
                ["tar", "--null", "--no-recursion", "-T", "-", "-cf", archive], tmp_path)
    assert non_directories(extract(archive, tmp_path) + root) == expected


def test_tar_anchored_exclude_file_round_trip_leaves_out_exactly_the_installed_files(system, tmp_path):
    root, cfg, expected = system
    rules, stderr = excludes(tmp_path, cfg, root, "tar")
    assert b"cannot express" not in stderr
    archive = tmp_path / "backup.tar"
    subprocess.run(["tar", "--exclude-caches-all", "--exclude-tag-all=.no-backup", "--anchored", "-X", rules,
                    "-cf", archive, root], check=True, capture_output=True)
    assert non_directories(extract(archive, tmp_path) + root) == expected


def test_tar_exclude_file_leaves_out_the_prune_list_as_jwbackup_does(tmp_path):
    root, cfg, expected = backed_up_system(tmp_path, default_prune=True)
    rules, stderr = excludes(tmp_path, cfg, root, "tar")
    archive = tmp_path / "backup.tar"
    subprocess.run(["tar", "--exclude-caches-all", "--exclude-tag-all=.no-backup", "--anchored", "-X", rules,
                    "-cf", archive, root], check=True, capture_output=True)
    archived = non_directories(extract(archive, tmp_path) + root)
    assert not archived & set(PRUNED)
    assert archived == expected


def test_tar_rules_match_only_the_named_path_not_the_same_path_deeper_down(tmp_path):
    """Unanchored, ``usr/bin/demo`` would also drop ``/home/u/usr/bin/demo``; the rules are anchored."""
    for path in (b"/usr/bin/demo", b"/home/u/usr/bin/demo"):
        os.makedirs(os.path.dirname(os.fsencode(tmp_path) + path), exist_ok=True)
        Path(os.fsdecode(os.fsencode(tmp_path) + path)).write_text("x")
    out = io.BytesIO()
    write_rules([b"/usr/bin/demo"], "tar", out, root=os.fsencode(tmp_path))
    (tmp_path / "rules").write_bytes(out.getvalue())
    archive = tmp_path / "a.tar"
    subprocess.run(["tar", "--anchored", "-X", tmp_path / "rules", "-cf", archive, tmp_path / "usr", tmp_path / "home"],
                   check=True, capture_output=True)
    names = subprocess.run(["tar", "-tf", archive], check=True, capture_output=True).stdout.split(b"\n")
    assert any(n.endswith(b"home/u/usr/bin/demo") for n in names)
    assert not any(n.endswith(b"/usr/bin/demo") and b"home" not in n for n in names)


@pytest.mark.parametrize("fmt", ["borg", "restic", "tar"])
def test_line_based_formats_refuse_nul_separated_output(fmt):
    with pytest.raises(Exception, match="line by line"):
        write_rules([b"/etc/x"], fmt, io.BytesIO(), null=True)


@pytest.mark.parametrize("fmt", ["restic", "tar"])
def test_a_name_with_a_newline_is_not_excluded_and_is_counted(fmt):
    out = io.BytesIO()
    written = write_rules([b"/usr/share/a\nb", b"/usr/share/ok"], fmt, out)
    assert (written.rules, written.unexpressible) == (1, 1)
    assert b"\n/usr/share/a" not in b"\n" + out.getvalue() and b"a\nb" not in out.getvalue()


def test_every_owned_name_of_the_fixture_is_expressible_for_every_line_based_tool():
    for fmt in ("borg", "restic", "tar"):
        written = write_rules(list(OWNED), fmt, io.BytesIO())
        assert written.unexpressible == 0, fmt

"""Modified package files: full verification behind the stat cache.

Fake Debian and Gentoo roots through ``jwbackup files``, and this machine's own
dpkg database (the files changed in the tests are put back exactly).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest

from fakeroot import DebianRoot
from gentooroot import GentooRoot
from jwbackup import verify
from jwbackup.managers.dpkg import load_manifest
from jwbackup.managers.portage import Portage

CACHE = b"/var/lib/jwbackup/cache/verify"
STATS = re.compile(rb"verified (\d+) installed files in [\d.]+ s: (\d+) from the cache, (\d+) hashed \(([^)]*)\), (\d+) modified")


RECORD = struct.Struct("<40s16s")  # (device, inode, size, mtime_ns, ctime_ns), raw md5
FOOTER = struct.Struct("<QI")  # record count, crc32 of the records


def read_cache(path: bytes) -> tuple[bytes, list[bytes]]:
    """The head line and the records of a verification cache, checked against its footer."""
    with open(path, "rb") as f:
        head, _, rest = f.read().partition(b"\n")
    body, (count, crc) = rest[:-FOOTER.size], FOOTER.unpack(rest[-FOOTER.size:])
    assert len(body) == count * RECORD.size and zlib.crc32(body) == crc
    return head, [body[i:i + RECORD.size] for i in range(0, len(body), RECORD.size)]


def write_cache(path: bytes, head: bytes, records: list[bytes]) -> None:
    body = b"".join(records)
    with open(path, "wb") as f:
        f.write(head + b"\n" + body + FOOTER.pack(len(records), zlib.crc32(body)))


def settle():
    """Let the files just written age past the racy window, so that their digests are cached."""
    time.sleep(verify.RACY_NS / 1e9 + 0.1)


def files(jwbackup, root: bytes, tmp_path, roots=("/",), extra="") -> tuple[list[bytes], bytes]:
    """(selected system paths, stderr) of ``jwbackup files`` over the fake root."""
    cfg = tmp_path / "jwbackup.yaml"
    cfg.write_text("root: [%s]\nprune: []\n%s" % (", ".join(roots), extra))
    result = jwbackup("-c", cfg, "--root", root, "-L", "INFO", "-l", "-", "files", "-0")
    assert result.returncode == 0, result.stderr
    return [p[len(root):] or b"/" for p in result.stdout.split(b"\0")[:-1]], result.stderr


def stats(stderr: bytes) -> dict[str, int]:
    match = STATS.search(stderr)
    assert match, stderr
    checked, hits, hashed, _, modified = match.groups()
    return {"checked": int(checked), "hits": int(hits), "hashed": int(hashed), "modified": int(modified)}


@pytest.fixture
def debian(tmp_path):
    root = DebianRoot(tmp_path / "system", usrmerge=True)
    root.package("tool", files={
        b"/usr/bin/tool": b"#!/bin/sh\necho tool\n",
        b"/usr/share/doc/tool/README": b"the tool\n",
        b"/usr/share/tool/big.dat": os.urandom(3 << 20),  # read in several chunks
        b"/etc/tool.conf": b"setting = 1\n",
    }, conffiles=[b"/etc/tool.conf"])
    root.package("nosums", files={b"/usr/share/nosums/data": b"no md5sums file\n"}, md5sums=False)
    root.write()
    return root


def test_modified_package_file_is_kept_and_unmodified_ones_are_left_out(jwbackup, debian, tmp_path):
    with open(debian.path(b"/usr/share/doc/tool/README"), "ab") as f:
        f.write(b"a local note\n")
    with open(debian.path(b"/usr/share/tool/big.dat"), "r+b") as f:
        f.seek(2 << 20)
        f.write(b"X")  # same size, one byte changed in the third chunk
    selected, stderr = files(jwbackup, debian.root, tmp_path)
    assert b"/usr/share/doc/tool/README" in selected
    assert b"/usr/share/tool/big.dat" in selected
    assert b"/usr/bin/tool" not in selected
    assert b"/etc/tool.conf" not in selected
    assert b"/usr/share/nosums/data" in selected  # no digest recorded: nothing to verify it against
    assert stats(stderr)["modified"] == 2


def test_verify_conffiles_checks_only_conffiles_and_none_keeps_every_conffile(jwbackup, debian, tmp_path):
    with open(debian.path(b"/usr/bin/tool"), "ab") as f:
        f.write(b"# patched\n")
    selected, _ = files(jwbackup, debian.root, tmp_path, extra="verify: conffiles\n")
    assert b"/usr/bin/tool" not in selected and b"/etc/tool.conf" not in selected
    with open(debian.path(b"/etc/tool.conf"), "ab") as f:
        f.write(b"mine = 2\n")
    selected, _ = files(jwbackup, debian.root, tmp_path, extra="verify: conffiles\n")
    assert b"/etc/tool.conf" in selected and b"/usr/bin/tool" not in selected
    selected, stderr = files(jwbackup, debian.root, tmp_path, extra="verify: none\n")
    assert b"/etc/tool.conf" in selected and b"/usr/bin/tool" not in selected
    assert stats(stderr)["hashed"] == 0


def test_second_run_hashes_nothing_and_a_touched_or_changed_file_is_rehashed(jwbackup, debian, tmp_path):
    settle()
    first_sel, first = files(jwbackup, debian.root, tmp_path)
    assert stats(first)["hashed"] == stats(first)["checked"] == 4
    cache = debian.path(CACHE)
    assert os.path.isfile(cache)
    assert os.path.isfile(os.path.join(os.path.dirname(cache), b"CACHEDIR.TAG"))
    assert not [p for p in first_sel if p.startswith(b"/var/lib/jwbackup/cache")]

    second_sel, second = files(jwbackup, debian.root, tmp_path)
    assert stats(second) == {"checked": 4, "hits": 4, "hashed": 0, "modified": 0}
    assert second_sel == first_sel

    # Same content, new mtime: read again, still unmodified.
    os.utime(debian.path(b"/usr/bin/tool"))
    settle()
    third_sel, third = files(jwbackup, debian.root, tmp_path)
    assert stats(third)["hashed"] == 1 and third_sel == first_sel

    # Changed content with the old mtime put back (as cp -p or tar would): the ctime gives it away.
    readme = debian.path(b"/usr/share/doc/tool/README")
    st = os.stat(readme)
    with open(readme, "r+b") as f:
        f.write(b"THE")
    os.utime(readme, ns=(st.st_atime_ns, st.st_mtime_ns))
    fourth_sel, fourth = files(jwbackup, debian.root, tmp_path)
    assert stats(fourth)["hashed"] == 1 and stats(fourth)["modified"] == 1
    assert b"/usr/share/doc/tool/README" in fourth_sel


def test_package_upgrade_changes_the_recorded_digest_and_the_verdict_follows(debian, tmp_path):
    settle()
    manifest = load_manifest(debian.root)
    assert verify.check(manifest, debian.root).modified == frozenset()
    # The package now ships other content; the file on disk is the old one.
    info = debian.admin(b"info", b"tool.md5sums")
    with open(info, "rb") as f:
        sums = f.read()
    old = hashlib.md5(b"#!/bin/sh\necho tool\n").hexdigest().encode()
    with open(info, "wb") as f:
        f.write(sums.replace(old, hashlib.md5(b"new release").hexdigest().encode()))
    verifier = verify.check(load_manifest(debian.root), debian.root)
    assert verifier.modified == {b"/usr/bin/tool"}
    assert verifier.stats.hashed == 0  # the cached digest of the file, compared with the new record


def test_package_directories_gone_flattened_or_linked_elsewhere_are_judged_through_their_paths(tmp_path):
    root = DebianRoot(tmp_path / "system")
    root.package("spread", files={b"/usr/share/gone/a": b"a", b"/usr/share/flat/b": b"b",
                                  b"/usr/share/moved/c": b"c", b"/usr/share/moved/d": b"d"})
    root.write()
    manifest = load_manifest(root.root)  # read before the changes, so that its paths are the old ones
    shutil.rmtree(root.path(b"/usr/share/gone"))
    shutil.rmtree(root.path(b"/usr/share/flat"))
    with open(root.path(b"/usr/share/flat"), "wb") as f:
        f.write(b"a file where the directory was")
    os.makedirs(root.path(b"/srv"))
    os.rename(root.path(b"/usr/share/moved"), root.path(b"/srv/moved"))  # moved, and linked back
    os.symlink("../../srv/moved", root.path(b"/usr/share/moved"))
    with open(root.path(b"/srv/moved/c"), "ab") as f:
        f.write(b" changed")
    verifier = verify.check(manifest, root.root, cache_file=None)
    assert verifier.modified == {b"/usr/share/moved/c"}  # as lstat of its path finds it
    assert verifier.stats.checked == 2


DAMAGES = {
    "truncated": lambda data: data[: len(data) // 2],
    "a digest changed, the checksum not": lambda data: data[:-FOOTER.size - 16] + b"0" * 16 + data[-FOOTER.size:],
    "a future format": lambda data: b"jwbackup-verify-cache 99 md5\n" + data.split(b"\n", 1)[1],
    "garbage": lambda data: b"\0\1garbage" * 100,
}


def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(jwbackup, debian, tmp_path):
    with open(debian.path(b"/usr/share/doc/tool/README"), "ab") as f:
        f.write(b"local\n")
    settle()
    files(jwbackup, debian.root, tmp_path)
    cache = debian.path(CACHE)
    with open(cache, "rb") as f:
        good = f.read()
    for what, damage in DAMAGES.items():
        with open(cache, "wb") as f:
            f.write(damage(good))
        selected, stderr = files(jwbackup, debian.root, tmp_path)
        assert b"verification cache" in stderr and b"ignored" in stderr, what
        assert stats(stderr)["hashed"] == 4, what
        assert b"/usr/share/doc/tool/README" in selected and b"/usr/bin/tool" not in selected, what
        # Rewritten whole: the next run trusts it again.
        _, stderr = files(jwbackup, debian.root, tmp_path)
        assert b"ignored" not in stderr and stats(stderr)["hashed"] == 0, what


def test_cache_of_an_older_format_is_rebuilt_without_a_warning(jwbackup, debian, tmp_path):
    settle()
    files(jwbackup, debian.root, tmp_path)
    cache = debian.path(CACHE)
    with open(cache, "rb") as f:
        current = f.read()
    with open(cache, "wb") as f:  # what the first format looked like: hex digests
        f.write(b"jwbackup-verify-cache 1 md5\n0 0\n")
    cfg = tmp_path / "jwbackup.yaml"
    log = tmp_path / "run.log"
    result = jwbackup("-c", cfg, "--root", debian.root, "-L", "INFO", "files", "-0", log_file=log)
    assert result.returncode == 0 and result.stderr == b""  # stderr: warnings only
    assert "INFO jwbackup.verify: verification cache" in log.read_text()
    assert "from an older jwbackup" in log.read_text() and stats(log.read_bytes())["hashed"] == 4
    selected = result.stdout.split(b"\0")
    assert debian.path(b"/usr/bin/tool") not in selected and debian.path(b"/var") in selected
    with open(cache, "rb") as f:
        assert f.read().split(b"\n")[0] == current.split(b"\n")[0]


def test_cache_records_the_stat_of_the_file_and_its_digest(debian, tmp_path):
    settle()
    verify.check(load_manifest(debian.root), debian.root)
    head, records = read_cache(debian.path(CACHE))
    assert head == b"jwbackup-verify-cache 2 md5"
    records = dict(map(RECORD.unpack, records))
    assert len(records) == 4
    st = os.stat(debian.path(b"/usr/bin/tool"))
    key = struct.pack("<QQQqq", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert records[key] == hashlib.md5(b"#!/bin/sh\necho tool\n").digest()


def test_unwritable_cache_only_costs_a_warning(jwbackup, debian, tmp_path):
    settle()
    os.makedirs(debian.path(b"/var/lib/jwbackup"))
    with open(debian.path(b"/var/lib/jwbackup/cache"), "wb") as f:
        f.write(b"a file where the cache directory belongs")
    selected, stderr = files(jwbackup, debian.root, tmp_path)
    assert b"cannot save the verification cache" in stderr
    assert b"/usr/bin/tool" not in selected


def test_files_outside_the_roots_are_not_hashed(jwbackup, debian, tmp_path):
    _, stderr = files(jwbackup, debian.root, tmp_path, roots=["/etc"])
    assert stats(stderr)["hashed"] == 1  # the conffile only


def test_excludes_leave_out_modified_files(jwbackup, debian, tmp_path):
    with open(debian.path(b"/usr/bin/tool"), "ab") as f:
        f.write(b"# patched\n")
    cfg = tmp_path / "jwbackup.yaml"
    cfg.write_text("root: /\n")
    result = jwbackup("-c", cfg, "--root", debian.root, "excludes", "-0")
    assert result.returncode == 0, result.stderr
    rules = set(result.stdout.split(b"\0")[:-1])
    assert debian.path(b"/usr/bin/tool") not in rules
    assert debian.path(b"/usr/share/doc/tool/README") in rules


# -- portage ---------------------------------------------------------------------


@pytest.fixture
def gentoo(tmp_path):
    root = GentooRoot(tmp_path / "gentoo")
    root.package("app-misc/foo-1.0", files={
        b"/usr/bin/foo": b"#!/bin/sh\necho foo\n",
        b"/usr/share/foo/data": b"data\n",
        b"/etc/foo.conf": b"x = 1\n",
    })
    root.profile_env(CONFIG_PROTECT="/etc")
    root.write()
    return root


def test_portage_modified_file_is_kept_even_with_its_recorded_mtime_put_back(jwbackup, gentoo, tmp_path):
    data = gentoo.join(b"/usr/share/foo/data")
    with open(data, "r+b") as f:
        f.write(b"DATA")
    os.utime(data, (gentoo.mtime, gentoo.mtime))  # the mtime CONTENTS records
    with open(gentoo.join(b"/etc/foo.conf"), "ab") as f:
        f.write(b"y = 2\n")
    selected, stderr = files(jwbackup, os.fsencode(gentoo.path), tmp_path)
    assert b"/usr/share/foo/data" in selected
    assert b"/etc/foo.conf" in selected
    assert b"/usr/bin/foo" not in selected
    assert stats(stderr)["modified"] == 2


def test_portage_symlink_the_admin_pointed_elsewhere_is_kept(jwbackup, tmp_path):
    root = GentooRoot(tmp_path / "gentoo")
    root.package("dev-libs/foo-1.0", symlinks={
        b"/usr/lib/libfoo.so": b"libfoo.so.1", b"/usr/lib/libbar.so": b"libbar.so.1",
        b"/etc/foo/active": b"one.conf", b"/etc/foo/spare": b"two.conf",
    })
    root.profile_env(CONFIG_PROTECT="/etc")
    root.write()
    for path, target in [(b"/usr/lib/libfoo.so", b"/opt/foo/libfoo.so"), (b"/etc/foo/active", b"two.conf")]:
        os.unlink(root.join(path))
        os.symlink(target, root.join(path))
    selected, stderr = files(jwbackup, os.fsencode(root.path), tmp_path)
    assert {b"/usr/lib/libfoo.so", b"/etc/foo/active"} <= set(selected)
    assert not {b"/usr/lib/libbar.so", b"/etc/foo/spare"} & set(selected)
    assert stats(stderr)["modified"] == 2 and stats(stderr)["checked"] == 4
    rules = jwbackup("-c", tmp_path / "jwbackup.yaml", "--root", root.path, "excludes", "-0").stdout.split(b"\0")
    assert root.join(b"/usr/lib/libbar.so") in rules and root.join(b"/usr/lib/libfoo.so") not in rules
    # verify: none judges nothing by its target; conffiles still count as modified
    selected, _ = files(jwbackup, os.fsencode(root.path), tmp_path, extra="verify: none\n")
    assert {b"/etc/foo/active", b"/etc/foo/spare"} <= set(selected) and b"/usr/lib/libfoo.so" not in selected


def test_portage_manifest_through_the_api_feeds_the_verification(gentoo):
    manifest = Portage().manifest(str(gentoo.path))
    assert manifest.get(b"/etc/foo.conf").conffile
    with open(gentoo.join(b"/usr/bin/foo"), "ab") as f:
        f.write(b"# local\n")
    assert verify.check(manifest, str(gentoo.path), cache_file=None).modified == {b"/usr/bin/foo"}
    assert verify.check(manifest, str(gentoo.path), "conffiles", cache_file=None).modified == frozenset()


# -- this machine ----------------------------------------------------------------

@pytest.fixture(scope="module")
def real_system():
    """The live dpkg system (the cache the tests create there is removed by
    conftest's real_state_dir_restored)."""
    if not os.path.exists("/var/lib/dpkg/status"):
        pytest.skip("needs a dpkg system")


def real_files(jwbackup, tmp_path, roots) -> set[bytes]:
    cfg = tmp_path / "jwbackup.yaml"
    cfg.write_text("root: [%s]\n" % ", ".join(roots))
    result = jwbackup("-c", cfg, "files", "-0", timeout=600)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split(b"\0")[:-1])


def md5sums(package: str) -> dict[bytes, str]:
    sums = {}
    for name in glob.glob(f"/var/lib/dpkg/info/{package}.md5sums") + glob.glob(f"/var/lib/dpkg/info/{package}:*.md5sums"):
        with open(name, "rb") as f:
            for line in f.read().splitlines():
                md5, _, path = line.partition(b"  ")
                sums[b"/" + path] = md5.decode()
    return sums


def file_md5(path: bytes) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "md5").hexdigest()
    except OSError:
        return None


def test_real_modified_doc_file_is_selected_and_its_neighbours_are_not(jwbackup, tmp_path, real_system):
    candidates = [
        (path, md5) for path, md5 in md5sums("base-files").items()
        if path.startswith(b"/usr/share/doc/") and os.path.isfile(path) and not os.path.islink(path)
        and os.path.realpath(path) == path and file_md5(path) == md5
    ]
    if len(candidates) < 2:
        pytest.skip("base-files ships no pristine doc files here")
    (target, _), (neighbour, _) = candidates[:2]
    roots = sorted({os.fsdecode(os.path.dirname(target)), os.fsdecode(os.path.dirname(neighbour))})
    st = os.stat(target)
    with open(target, "rb") as f:
        original = f.read()
    try:
        with open(target, "ab") as f:
            f.write(b"\n# changed by the jwbackup test suite\n")
        selected = real_files(jwbackup, tmp_path, roots)
        assert target in selected
        assert neighbour not in selected
    finally:
        with open(target, "wb") as f:
            f.write(original)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_md5(target) == candidates[0][1]
    assert target not in real_files(jwbackup, tmp_path, roots)


def test_real_package_files_changed_behind_dpkg_are_selected_under_usr(jwbackup, tmp_path, real_system):
    changed, pristine = [], []
    for package in ("nodejs", "cmake-data", "ca-certificates", "python3-pip"):
        for path, md5 in md5sums(package).items():
            real = os.path.realpath(os.path.dirname(path)) + b"/" + os.path.basename(path)
            if not real.startswith(b"/usr/") or os.path.islink(real) or not os.path.isfile(real):
                continue
            (pristine if file_md5(real) == md5 else changed).append(real)
    if not changed:
        pytest.skip("no package file under /usr differs from its md5sum on this machine")
    selected = real_files(jwbackup, tmp_path, ["/usr"])
    assert [p for p in changed if p not in selected] == []
    assert [p for p in pristine[:200] if p in selected] == []


def test_cache_records_out_of_order_are_still_used_and_saved_back_in_order(debian, tmp_path):
    settle()
    verify.check(load_manifest(debian.root), debian.root)
    head, records = read_cache(debian.path(CACHE))
    write_cache(debian.path(CACHE), head, records[::-1])
    verifier = verify.check(load_manifest(debian.root), debian.root)
    assert (verifier.stats.cache_hits, verifier.stats.hashed) == (4, 0)
    assert read_cache(debian.path(CACHE)) == (head, records)


def test_the_order_of_the_next_cache_is_kept_as_runs_and_comes_back_whole():
    size = verify._RECORD.size
    order = verify._Order()
    scanned = [100, 100 + size, 100 + 2 * size, -1, -2, 100 + 3 * size, 100 + 5 * size, -3, 40, -5, -6]
    for value in scanned:
        order.add(value)
    assert list(order) == scanned and len(order) == len(scanned)
    assert list(order.counts) == [3, 2, 1, 1, 1, 1, 2]
    unchanged = verify._Order()
    for n in range(10_000):
        unchanged.add(7 + n * size)
    assert list(unchanged.counts) == [10_000] and list(unchanged)[-1] == 7 + 9_999 * size


def test_many_files_are_hashed_in_worker_processes_with_the_same_verdicts(tmp_path, caplog):
    root = DebianRoot(tmp_path / "system")
    count = verify.PROCESS_MIN + 50
    root.package("many", files={b"/usr/share/many/f%05d" % i: b"file %d\n" % i for i in range(count)})
    root.write()
    for i in (7, 1234, count - 1):
        with open(root.path(b"/usr/share/many/f%05d" % i), "ab") as f:
            f.write(b"changed\n")
    os.unlink(root.path(b"/usr/share/many/f00042"))
    manifest = load_manifest(root.root)
    caplog.set_level("DEBUG", logger="jwbackup.verify")
    here = verify.check(manifest, root.root, cache_file=None, workers=1)
    assert "worker processes" not in caplog.text
    pooled = verify.check(manifest, root.root, cache_file=None, workers=2)
    assert f"hashing {count - 1} files in 2 worker processes" in caplog.text
    expected = {b"/usr/share/many/f%05d" % i for i in (7, 1234, count - 1)}
    assert pooled.modified == here.modified == expected
    assert pooled.stats.hashed == here.stats.hashed == count - 1
    assert pooled.stats.bytes_hashed == here.stats.bytes_hashed


def _children() -> set[int]:
    me, found = str(os.getpid()), set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        found.add(int(pid))
            except OSError:
                pass
    return found


def _kill_first_new_child(stop: threading.Event, killed: list[int], before: set[int]) -> None:
    """Kill (SIGKILL) the first process this one forks from now on, as the OOM killer would a worker."""
    while not stop.is_set():
        new = _children() - before
        if new:
            pid = min(new)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.005)


def test_a_killed_worker_process_leaves_the_rest_to_be_hashed_here_with_the_same_verdicts(tmp_path, caplog):
    root = DebianRoot(tmp_path / "system")
    count = verify.PROCESS_MIN + 1000
    filler = os.urandom(64 << 10)  # 64 KiB a file: the pool is still busy when a worker dies
    root.package("many", files={b"/usr/share/many/f%05d" % i: b"%d" % i + filler for i in range(count)})
    root.write()
    for i in (3, 1500, count - 1):
        with open(root.path(b"/usr/share/many/f%05d" % i), "ab") as f:
            f.write(b"changed\n")
    manifest = load_manifest(root.root)
    here = verify.check(manifest, root.root, cache_file=None, workers=1)
    caplog.set_level("DEBUG", logger="jwbackup.verify")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_new_child, args=(stop, killed, _children()))
    killer.start()
    try:
        pooled = verify.check(manifest, root.root, cache_file=None, workers=2)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker process was started"
    assert "hashing in worker processes failed" in caplog.text and "hashing the rest here" in caplog.text
    assert pooled.modified == here.modified == {b"/usr/share/many/f%05d" % i for i in (3, 1500, count - 1)}
    assert pooled.stats.hashed == here.stats.hashed == count
    assert pooled.stats.bytes_hashed == here.stats.bytes_hashed


def _many_files(tmp_path, changed=(7, 1234)) -> tuple[DebianRoot, int, set[bytes]]:
    root = DebianRoot(tmp_path / "system")
    count = verify.PROCESS_MIN + 50
    root.package("many", files={b"/usr/share/many/f%05d" % i: b"file %d\n" % i for i in range(count)})
    root.write()
    for i in changed:
        with open(root.path(b"/usr/share/many/f%05d" % i), "ab") as f:
            f.write(b"changed\n")
    settle()  # old enough to be cached
    return root, count, {b"/usr/share/many/f%05d" % i for i in changed}


def test_worker_processes_write_the_cache_records_that_the_next_run_reads(tmp_path, caplog):
    root, count, expected = _many_files(tmp_path)
    manifest = load_manifest(root.root)
    caplog.set_level("DEBUG", logger="jwbackup.verify")
    first = verify.check(manifest, root.root, workers=2)
    assert f"hashing {count} files in 2 worker processes" in caplog.text
    assert first.modified == expected and first.stats.hashed == count
    second = verify.check(manifest, root.root, workers=2)
    assert second.modified == expected
    assert (second.stats.cache_hits, second.stats.hashed) == (count, 0)
    with open(root.path(b"/usr/share/many/f00100"), "r+b") as f:
        f.write(b"F")  # same size, edited in place
    settle()
    third = verify.check(manifest, root.root, workers=2)
    assert third.modified == expected | {b"/usr/share/many/f00100"}
    assert (third.stats.cache_hits, third.stats.hashed) == (count - 1, 1)


def test_a_full_disk_under_the_cache_costs_the_cache_not_the_verdicts(tmp_path, caplog):
    root, count, expected = _many_files(tmp_path)
    cache_dir = root.path(os.path.dirname(verify.CACHE_FILE))
    os.makedirs(cache_dir)
    # 64 KiB: the slots of 2,050 files take 112 KiB
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", cache_dir], check=True)
    try:
        manifest = load_manifest(root.root)
        first = verify.check(manifest, root.root, workers=2)
        assert "cannot keep new verification cache records (No space left on device)" in caplog.text
        assert first.modified == expected and first.stats.hashed == count
        assert not os.path.exists(root.path(verify.CACHE_FILE))
        assert os.listdir(cache_dir) == [b"CACHEDIR.TAG"]  # the unlinked slots file is gone with its descriptor
    finally:
        subprocess.run(["umount", "-l", cache_dir], check=False)
    second = verify.check(manifest, root.root, workers=2)
    assert second.modified == expected and second.stats.hashed == count


# -- alongside the walk ------------------------------------------------------------


@pytest.fixture
def spread(tmp_path):
    """Installed files modified in every place the walk can meet them, or not."""
    root = DebianRoot(tmp_path / "system", usrmerge=True)
    root.package("spread", files={
        b"/usr/share/deep/er/data": b"data\n",  # nothing else kept up there
        b"/usr/bin/spread": b"#!/bin/sh\n",  # beside a file of the admin's
        b"/bin/legacy": b"listed under /bin, lives in /usr/bin\n",
        b"/opt/spread/pruned/a": b"a\n",
        b"/opt/spread/marked/b": b"b\n",
        b"/opt/spread/kind": b"a file, then a symlink\n",
        b"/opt/spread/same": b"left alone\n",
        b"/etc/spread.conf": b"setting = 1\n",
    }, conffiles=[b"/etc/spread.conf"])
    root.write()
    for path in (b"/usr/share/deep/er/data", b"/usr/bin/spread", b"/usr/bin/legacy", b"/opt/spread/pruned/a",
                 b"/opt/spread/marked/b", b"/etc/spread.conf"):
        with open(root.path(path), "ab") as f:
            f.write(b"# changed\n")
    os.unlink(root.path(b"/opt/spread/kind"))
    os.symlink(b"same", root.path(b"/opt/spread/kind"))
    for path, content in ((b"/usr/bin/mine", b"mine\n"), (b"/opt/spread/marked/.no-backup", b"")):
        with open(root.path(path), "wb") as f:
            f.write(content)
    return root


@pytest.mark.parametrize("roots, directories", [
    ((b"/",), True), ((b"/",), False), ((b"/usr/share", b"/usr/share/deep", b"/opt", b"/etc"), True),
])
def test_a_verification_alongside_the_walk_selects_what_one_before_it_does(spread, roots, directories, caplog):
    from jwbackup.select import Selector

    def select(verifier) -> tuple[list[bytes], tuple]:
        selector = Selector(manifest, spread.root, [b"/opt/spread/pruned"], verifier)
        try:
            paths = list(selector.select(roots, directories))
        finally:
            selector.close()
        s = selector.stats
        return paths, (s.owned, s.modified, s.selected, s.entries, s.directories)

    caplog.set_level(logging.INFO)
    manifest = load_manifest(spread.root)
    before, before_stats = select(verify.check(manifest, spread.root))
    caplog.clear()
    along, along_stats = select(verify.Running(manifest, spread.root, "all", roots))
    assert sorted(along) == sorted(before) and len(set(along)) == len(along)
    assert along_stats == before_stats
    if directories:  # each path after the directory holding it, as a consumer recreates them
        for i, path in enumerate(along):
            parent = os.path.dirname(path)
            assert parent in along[:i] or path in roots or parent == b"/", path
    walked = [p for p in (b"/usr/share/deep/er/data", b"/usr/bin/spread", b"/usr/bin/legacy", b"/etc/spread.conf",
                          b"/opt/spread/kind") if p.startswith(tuple(r + b"/" for r in roots)) or roots == (b"/",)]
    assert walked and set(walked) <= set(along)
    for left in (b"/opt/spread/pruned/a", b"/opt/spread/marked/b", b"/opt/spread/same", b"/usr/bin/tool"):
        assert left not in along
    assert re.search(r"verified \d+ installed files in [\d.]+ s alongside the walk: .* [1-9]\d* modified", caplog.text)


def test_a_verification_that_dies_fails_in_one_line_and_closing_one_leaves_no_process(tmp_path):
    # More modified paths than a pipe holds: the child waits in its write until read, or killed.
    root = DebianRoot(tmp_path / "system")
    names = [b"/srv/many/%s-%04d" % (b"n" * 60, i) for i in range(1500)]
    root.package("many", files={name: b"as shipped\n" for name in names})
    root.write()
    for name in names:
        with open(root.path(name), "ab") as f:
            f.write(b"changed\n")
    manifest = load_manifest(root.root)

    running = verify.Running(manifest, root.root, "all", (b"/",))
    os.kill(running.pid, signal.SIGKILL)
    with pytest.raises(verify.VerificationError) as failed:
        running.result()
    assert str(failed.value) == "verification: the process verifying ended without a report (killed by SIGKILL)"

    running = verify.Running(manifest, root.root, "all", (b"/",))
    pid = running.pid
    running.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped, not left a zombie
    assert verify.Running(manifest, root.root, "all", (b"/",)).result().modified == frozenset(names)


def _running(pid: int) -> bool:
    """Is ``pid`` alive?  One that ended and was not reaped (by init, once orphaned) is not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def test_a_verification_still_hashing_dies_with_the_process_that_started_it(tmp_path):
    # An installed file of 64 GiB (sparse) that no longer has its recorded
    # md5: hashing it takes minutes, so an orphaned child would outlive the
    # deadline below by far.
    root = DebianRoot(tmp_path / "system")
    root.package("big", files={b"/srv/big/huge": b"as shipped\n"})
    root.write()
    os.truncate(root.path(b"/srv/big/huge"), 64 << 30)
    code = (
        "import sys, time; from jwbackup import verify; from jwbackup.managers.dpkg import load_manifest\n"
        "running = verify.Running(load_manifest(sys.argv[1]), sys.argv[1], 'all', (b'/',))\n"
        "print(running.pid, flush=True); time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code, root.root], stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    try:
        assert _running(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child), "the verifying child outlived the process that started it"
    finally:
        parent.stdout.close()
        if _running(child):
            os.kill(child, signal.SIGKILL)

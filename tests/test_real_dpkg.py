"""The selection against this machine's real dpkg database and files.

These tests read the live system; the ones that change it (a file under
/usr/local, one under /etc, a conffile) put everything back, even on failure.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import shutil
import subprocess

import pytest

from jwbackup.managers.dpkg import removed_conffiles

pytestmark = pytest.mark.skipif(not os.path.exists("/var/lib/dpkg/status"), reason="needs a dpkg system")

INFO = "/var/lib/dpkg/info"


def write_config(tmp_path, roots, verify="conffiles"):
    """Only conffiles are verified here: these tests are about ownership; the
    package files changed behind dpkg's back are tests/test_verify.py's."""
    cfg = tmp_path / "jwbackup.yaml"
    cfg.write_text("root: [%s]\nverify: %s\n" % (", ".join(roots), verify))
    return cfg


def files(jwbackup, cfg) -> set[bytes]:
    result = jwbackup("-c", cfg, "files", "-0")
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split(b"\0")[:-1])


@functools.lru_cache(maxsize=None)
def _real_dir(parent: bytes) -> bytes:
    return os.path.realpath(parent)


def canonical(path: bytes) -> bytes:
    parent, name = os.path.split(path)
    return os.path.join(_real_dir(parent), name)


def diversions() -> list[tuple[bytes, bytes, bytes]]:
    with open("/var/lib/dpkg/diversions", "rb") as f:
        lines = f.read().split(b"\n")
    return [tuple(lines[i : i + 3]) for i in range(0, len(lines) - 2, 3)]


def listed_paths() -> dict[bytes, set[str]]:
    """Every path in every installed package's .list, with the packages listing it."""
    owners: dict[bytes, set[str]] = {}
    for list_file in glob.glob(os.path.join(INFO, "*.list")):
        package = os.path.basename(list_file)[: -len(".list")].split(":")[0]
        with open(list_file, "rb") as f:
            for line in f.read().split(b"\n"):
                if line.startswith(b"/"):
                    owners.setdefault(line, set()).add(package)
    return owners


@contextlib.contextmanager
def restored(path: str):
    """Put ``path`` back exactly (content, mode, times) or remove it if it was not there."""
    backup = None
    if os.path.lexists(path):
        backup = path + ".jwbackup-test-orig"
        shutil.copy2(path, backup)
    try:
        yield
    finally:
        if backup:
            shutil.copy2(backup, path)
            os.unlink(backup)
        elif os.path.lexists(path):
            os.unlink(path)


def test_no_installed_regular_file_under_usr_is_selected(jwbackup, tmp_path):
    selected = files(jwbackup, write_config(tmp_path, ["/usr"]))
    diverted_from = {canonical(d[0]) for d in diversions()}
    leaked = []
    for path in listed_paths():
        real = canonical(path)
        if not real.startswith(b"/usr/") or real in diverted_from:
            continue
        if os.path.isfile(real) and not os.path.islink(real) and real in selected:
            leaked.append(real)
    assert leaked == []
    # Sanity: the walk did meet /usr, and what it kept is not package content.
    assert b"/usr/local" in selected


def test_usrmerge_aliases_are_matched(jwbackup, tmp_path):
    """dpkg lists /bin/... and /sbin/... paths; on merged /usr they live under /usr."""
    aliased = [p for p in listed_paths() if p.startswith((b"/bin/", b"/sbin/", b"/lib/", b"/lib64/"))]
    if not aliased or not os.path.islink("/bin"):
        pytest.skip("not a merged-/usr system")
    selected = files(jwbackup, write_config(tmp_path, ["/usr"]))
    present = [canonical(p) for p in aliased if os.path.isfile(canonical(p)) and not os.path.islink(canonical(p))]
    assert present, "expected some aliased regular files on disk"
    assert not set(present) & selected


def test_new_files_in_usr_local_and_etc_are_selected(jwbackup, tmp_path):
    os.makedirs("/usr/local/bin", exist_ok=True)
    local_tool = "/usr/local/bin/jwbackup-test-tool"
    etc_file = "/etc/jwbackup-test.conf"
    with restored(local_tool), restored(etc_file):
        for path in (local_tool, etc_file):
            with open(path, "w") as f:
                f.write("made by the jwbackup test suite\n")
        selected = files(jwbackup, write_config(tmp_path, ["/usr/local", "/etc"]))
    assert local_tool.encode() in selected
    assert etc_file.encode() in selected
    # An unmodified conffile and an installed non-conffile under /etc stay out.
    assert b"/etc/host.conf" not in selected or _conffile_modified(b"/etc/host.conf")


def _conffile_modified(path: bytes) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}\n"], capture_output=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == path:
            with open(path, "rb") as f:
                return hashlib.md5(f.read()).hexdigest().encode() != fields[1]
    return False


def test_modified_conffile_is_selected(jwbackup, tmp_path):
    conffile = "/etc/host.conf"  # base-files, on every Debian system
    cfg = write_config(tmp_path, ["/etc"])
    assert not _conffile_modified(conffile.encode()), "test needs the pristine conffile"
    assert conffile.encode() not in files(jwbackup, cfg)
    with restored(conffile):
        with open(conffile, "a") as f:
            f.write("# changed by the jwbackup test suite\n")
        assert conffile.encode() in files(jwbackup, cfg)
    assert conffile.encode() not in files(jwbackup, cfg)


def test_diverted_files_are_classified_as_dpkg_would(jwbackup, tmp_path):
    divs = [d for d in diversions() if d[2] != b":"]
    if not divs:
        pytest.skip("no package diversions on this machine")
    owners = listed_paths()
    roots = sorted({os.path.dirname(canonical(d[0])).decode() for d in divs} | {os.path.dirname(canonical(d[1])).decode() for d in divs})
    selected = files(jwbackup, write_config(tmp_path, roots))
    checked = 0
    for source, target, by in divs:
        listing = owners.get(source, set())
        src, dst = canonical(source), canonical(target)
        # The diverting package's own file stays at the original name: owned.
        if by.decode() in listing and os.path.lexists(src) and not os.path.isdir(src):
            assert src not in selected, src
            checked += 1
        # Another package's file moved to the diverted name: owned there.
        if listing - {by.decode()} and os.path.lexists(dst) and not os.path.isdir(dst):
            assert dst not in selected, dst
            checked += 1
    assert checked


def dpkg_missing_conffiles() -> set[bytes]:
    """The conffiles ``dpkg --verify`` reports missing, asked of the packages that have conffiles."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}${binary:Package}\n${Conffiles}\n"],
                         check=True, capture_output=True).stdout
    packages, package = [], None
    for line in out.split(b"\n"):
        if line.startswith(b" ") and package:
            packages.append(package)
            package = None
        elif line[:3] == b"ii ":
            package = line[3:].strip()
    result = subprocess.run(["dpkg", "--verify", *packages], capture_output=True)
    return {line.split(b" c ", 1)[1] for line in result.stdout.split(b"\n") if line.startswith(b"missing") and b" c /" in line}


def test_removed_conffiles_are_the_ones_dpkg_reports_missing():
    conffile = "/etc/host.conf"  # base-files, on every Debian system
    assert os.path.exists(conffile), "test needs the conffile in place"
    with restored(conffile):
        os.unlink(conffile)
        missing = dpkg_missing_conffiles()
        assert conffile.encode() in missing
        assert set(removed_conffiles("/")) == missing
    assert conffile.encode() not in removed_conffiles("/")

"""The package state, written into the system before each backup, and before
``jwbackup files`` and ``excludes`` so that borg, restic or tar archive it too.

``/var/lib/jwbackup/packages/`` (under the root) holds plain text files that a
person reads and a tool feeds back; the backup copies them into every
generation at the same path, so each generation says what was installed:

dpkg
    ``packages``: ``<package> <version> <architecture>`` per line;
    ``manual``: the packages installed explicitly (apt-mark manual), one per
    line, ``name:arch`` only where a name is installed for several
    architectures;
    ``statoverride``: a copy of dpkg's owner and mode overrides, and
    ``diversions``: the local diversions (``dpkg-divert --local``), in dpkg's
    own format: what reinstalling the packages does not bring back;
    ``removed-conffiles``: the conffiles of installed packages that were not
    on the system, one per line: what reinstalling brings back unasked.
portage
    ``installed``: ``category/package-version`` per line;
    ``world`` and ``world_sets``: copies of ``/var/lib/portage/world{,_sets}``.

:func:`parse` turns the files back into :class:`State`; :func:`read_directory`
reads them where another tool restored them.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field

from jwbackup import managers
from jwbackup.errors import JwbackupError
from jwbackup.excludes import write_atomically
from jwbackup.managers import Package
from jwbackup.managers.dpkg import StatusPackage, installed_packages, read_diversions, read_status, removed_conffiles

logger = logging.getLogger(__name__)

STATE_DIR = "/var/lib/jwbackup/packages"  # a system path, under the root
DPKG_FILES = ("packages", "manual", "statoverride", "diversions", "removed-conffiles")
DPKG_ADMIN = "var/lib/dpkg"  # under the root
PORTAGE_FILES = ("installed", "world", "world_sets")
FILES = DPKG_FILES + PORTAGE_FILES
COUNT_FILES = ("packages", "installed")  # one line per installed package
PORTAGE_STATE = "var/lib/portage"


@dataclass
class State:
    """The package state of one generation."""

    manager: str  # "dpkg" or "portage"
    packages: list[tuple[str, str, str | None]] = field(default_factory=list)  # (name, version, arch)
    manual: list[str] = field(default_factory=list)  # dpkg: package names as apt takes them
    installed: list[str] = field(default_factory=list)  # portage: cpv
    world: list[str] = field(default_factory=list)  # portage: world atoms, then world_sets sets
    overrides: list[tuple[str, str, str, str]] = field(default_factory=list)  # dpkg: (user, group, mode, path)
    diversions: list[tuple[str, str]] = field(default_factory=list)  # dpkg, local ones: (path, diverted to)
    removed_conffiles: list[str] = field(default_factory=list)  # dpkg: conffiles not on the system


def dpkg_files(root: str, packages: list[Package], status: list[StatusPackage]) -> dict[str, bytes]:
    """The contents of the package state files for a dpkg system (``status``: its status file, read)."""
    arches = Counter(p.name for p in packages)
    lines = [f"{p.name} {p.version} {p.architecture or '-'}\n" for p in packages]
    manual = sorted(
        p.name if arches[p.name] == 1 or not p.architecture else f"{p.name}:{p.architecture}"
        for p in packages if p.manual
    )
    diversions = read_diversions(os.fsencode(os.path.join(root, DPKG_ADMIN, "diversions")))
    return {
        "packages": "".join(lines).encode(),
        "manual": "".join(m + "\n" for m in manual).encode(),
        "statoverride": _read(os.path.join(root, DPKG_ADMIN, "statoverride")),
        "diversions": b"".join(frm + b"\n" + to + b"\n:\n" for frm, (to, by) in diversions.items() if by == ":"),
        "removed-conffiles": b"".join(path + b"\n" for path in removed_conffiles(root, status)),
    }


def _read(path: str) -> bytes:
    """The content of ``path``; empty when there is no such file."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def _holds(path: str, data: bytes) -> bool:
    """Is ``path`` a file that holds exactly ``data``?"""
    try:
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:
        return False


def portage_files(root: str, packages: list[Package]) -> dict[str, bytes]:
    """The contents of ``installed``, ``world`` and ``world_sets`` for a Gentoo system."""
    files = {"installed": "".join(f"{p.name}-{p.version}\n" for p in packages).encode()}
    for name in ("world", "world_sets"):
        files[name] = _read(os.path.join(root, PORTAGE_STATE, name))
    return files


def write(root: str, manager_name: str | None = None) -> str:
    """Write the package state of the system at ``root``; returns the directory written.

    Each file that changed is replaced atomically.  Raises OSError when the directory
    cannot be written, and what the manager raises when its database cannot
    be read.
    """
    manager = managers.detect(root, manager_name)
    if manager.name == "portage":
        packages = manager.packages(root)
        files = portage_files(root, packages)
    else:  # the status file read once, for the packages and the deleted conffiles
        status = read_status(os.fsencode(os.path.join(root, DPKG_ADMIN, "status")))
        packages = installed_packages(root, status)
        files = dpkg_files(root, packages, status)
    directory = os.path.join(root, STATE_DIR.lstrip("/"))
    os.makedirs(directory, mode=0o755, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(directory, name)
        if not _holds(path, data):  # else left alone: a generation links it, diff passes it by
            write_atomically(path, lambda f, data=data: f.write(data))
    for name in set(FILES) - set(files):  # left from another package manager
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    logger.info("package state: %d %s packages, %d installed explicitly, in %s",
                len(packages), manager.name, sum(p.manual for p in packages), directory)
    return directory


def parse(files: dict[str, bytes]) -> State | None:
    """The :class:`State` in the files of a package state directory (name -> content); None if empty."""
    def lines(name: str) -> list[str]:
        text = files.get(name, b"").decode("utf-8", "replace")
        return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    if "packages" in files:
        state = State("dpkg", manual=lines("manual"))
        for line in lines("packages"):
            words = line.split()
            if len(words) >= 2:
                arch = words[2] if len(words) > 2 and words[2] != "-" else None
                state.packages.append((words[0], words[1], arch))
        # dpkg's own formats, read as dpkg reads them: a path is everything to
        # the end of its line, any bytes ("#1000" is an id without a name).
        for line in _raw_lines(files.get("statoverride", b"")):
            words = line.split(" ", 3)
            if len(words) == 4:
                state.overrides.append(tuple(words))
        diversions = _raw_lines(files.get("diversions", b""))
        state.diversions = [(diversions[i], diversions[i + 1]) for i in range(0, len(diversions) - 2, 3)]
        state.removed_conffiles = _raw_lines(files.get("removed-conffiles", b""))
        return state
    def atoms(name: str) -> list[str]:  # as portage reads world files: the first word, up to a comment
        return [words[0] for line in lines(name) if (words := line.split("#", 1)[0].split())]

    if "installed" in files:
        return State("portage", installed=lines("installed"), world=atoms("world") + atoms("world_sets"))
    return None


def _raw_lines(data: bytes) -> list[str]:
    """The lines of ``data``, bytes kept as they are (surrogateescape)."""
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def read_directory(path: str) -> State | None:
    """The :class:`State` in directory ``path``: a package state directory,
    or a root holding one (as another tool restored it); None if none is there."""
    inner = os.path.join(path, STATE_DIR.lstrip("/"))
    if os.path.isdir(inner):
        path = inner
    files = {}
    for name in FILES:
        try:
            with open(os.path.join(path, name), "rb") as f:
                files[name] = f.read()
        except FileNotFoundError:
            pass
    return parse(files)


def save(root: str, manager_name: str | None = None) -> bool:
    """:func:`write`, with a failure logged as a warning: the backup goes on without it."""
    try:
        write(root, manager_name)
        return True
    except (OSError, JwbackupError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        logger.warning("cannot write the package state into %s: %s", os.path.join(root, STATE_DIR.lstrip("/")), reason)
        return False


def count_packages(repo, names) -> dict[str, int]:
    """How many packages each generation in ``names`` recorded; one command for all of them.

    Generations without a package state are left out of the answer.
    """
    paths = {
        posixpath.join(repo.path(name), STATE_DIR.lstrip("/"), file): name
        for name in names for file in COUNT_FILES
    }
    if not paths:
        return {}
    out = repo.transport.run(["wc", "-l", "--", *paths], check=False).stdout
    counts = {}
    for line in out.decode("utf-8", "surrogateescape").splitlines():
        number, _, path = line.strip().partition(" ")
        if path in paths and number.isdigit():
            counts[paths[path]] = int(number)
    return counts

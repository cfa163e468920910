"""portage: the installed-package database (vdb) of a Gentoo system.

The vdb is read through portage's own Python API (``vartree``/``vardbapi``,
``dblink.getcontents()``), so CONTENTS lines are parsed exactly as portage
parses them: names with spaces, ``sym a -> b`` entries, the old symlink format.
portage is imported lazily, so machines without it never pay for it.

The configuration is built explicitly, never through ``portage.db`` (see
:func:`_settings`): ROOT is the root being backed up, EPREFIX is the
constructor argument (``""`` on ordinary Gentoo, the Prefix path on Gentoo
Prefix), and ebuild repositories are left out because reading the vdb needs
none.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import sys

from jwbackup.errors import ManifestError
from jwbackup.managers import DIR, FILE, FREEZE_BATCH, OTHER, SYMLINK, Digest, Entry, Manifest, Package
from jwbackup.paths import Canonicalizer

logger = logging.getLogger(__name__)

VDB_PATH = "var/db/pkg"
PROFILE_LINK = "etc/portage/make.profile"
WORLD_FILE = "var/lib/portage/world"
WORLD_SETS_FILE = "var/lib/portage/world_sets"
USER_SETS_DIR = "etc/portage/sets"

# CONTENTS entry types, as getcontents() reports them, to manifest kinds.
KINDS = {"obj": FILE, "sym": SYMLINK, "dir": DIR, "fif": OTHER, "dev": OTHER}

# Sets portage computes from the profile or the vdb itself; a package that is
# only reachable through one of them was not asked for explicitly.
BUILTIN_SETS = frozenset(
    ["system", "profile", "selected", "selected-packages", "selected-sets", "world", "installed"]
)

# An empty repository configuration: portage then reads neither the
# installation's repos.conf nor the target's, which point at host paths that
# rarely exist for a chroot (and, for portage from PyPI, never).
NO_REPOSITORIES = "[DEFAULT]\n"


class Portage:
    """Package manager plugin for Gentoo's portage."""

    name = "portage"

    def __init__(self, eprefix: str = ""):
        self.eprefix = eprefix.rstrip("/")

    def _under(self, root: str, relative: str) -> str:
        return os.path.join(root, self.eprefix.lstrip("/"), relative)

    def detect(self, root: str) -> bool:
        """True when ``<root>/var/db/pkg`` holds at least one category/package directory."""
        try:
            with os.scandir(self._under(root, VDB_PATH)) as categories:
                for category in categories:
                    if category.is_dir(follow_symlinks=False) and _has_subdir(category.path):
                        return True
        except OSError:
            return False
        return False

    def manifest(self, root: str) -> Manifest:
        portage, vardb, dblink = self._open(root)
        settings = vardb.settings
        manifest = Manifest()
        with _captured() as messages:
            cpvs = vardb.cpv_all()
        for message in messages:
            _warn(manifest, f"{root}: {message}")
        protect = portage.util.ConfigProtect(
            settings["EROOT"],
            settings.get("CONFIG_PROTECT", "").split(),
            settings.get("CONFIG_PROTECT_MASK", "").split(),
            case_insensitive="case-insensitive-fs" in settings.features,
        )
        logger.debug(
            "CONFIG_PROTECT=%r CONFIG_PROTECT_MASK=%r",
            settings.get("CONFIG_PROTECT", ""),
            settings.get("CONFIG_PROTECT_MASK", ""),
        )
        canonical = Canonicalizer(root)
        root_len = len(settings["ROOT"]) - 1  # keys are ROOT + path; ROOT ends with "/"
        for cpv in sorted(cpvs, key=lambda cpv: _counter(vardb, cpv)):
            category, pf = portage.versions.catsplit(cpv)
            link = dblink(category, pf, settings=settings, vartree=vardb.vartree, treetype="vartree")
            contents_file = os.path.join(link.dbdir, "CONTENTS")
            try:
                with _captured() as messages:
                    contents = link.getcontents()
            except Exception as exc:  # one unreadable package must not stop the backup
                _warn(manifest, f"{contents_file}: cannot be read ({exc}); the files of {cpv} are backed up")
                continue
            if messages:
                text = "; ".join(messages)
                if contents_file not in text:
                    text = f"{contents_file}: {text}"
                _warn(manifest, f"{cpv}: {text}; files on those lines count as not installed by portage")
            _add_contents(manifest, str(cpv), contents, root_len, protect, canonical, contents_file)
            manifest.freeze(at_least=FREEZE_BATCH)
        manifest.freeze()
        logger.debug("portage manifest: %d packages, %d paths", len(cpvs), len(manifest))
        return manifest

    def packages(self, root: str) -> list[Package]:
        """Installed packages; ``manual`` for those the world file or world sets select."""
        portage, vardb, _ = self._open(root)
        selected: set[str] = set()
        for atom, source in self._selected_atoms(root):
            try:
                with _captured() as messages:
                    matches = vardb.match(atom)
            except (portage.exception.PortageException, ValueError) as exc:
                logger.warning("%s: ignoring %r: %s", source, atom, exc)
                continue
            for message in messages:
                logger.warning("%s: %s", source, message)
            if not matches:
                logger.debug("%s: %s is not installed", source, atom)
            selected.update(matches)
        with _captured() as messages:
            cpvs = vardb.cpv_all()
        for message in messages:
            logger.warning("%s: %s", root, message)
        cpvs.sort(key=portage.versions.cpv_sort_key())
        return [Package(name=cpv.cp, version=cpv.version, manual=cpv in selected) for cpv in cpvs]

    def _selected_atoms(self, root: str) -> list[tuple[str, str]]:
        """(atom, file it came from) for the world file and every set it selects."""
        atoms: list[tuple[str, str]] = []
        pending = []
        for path in (self._under(root, WORLD_FILE), self._under(root, WORLD_SETS_FILE)):
            for line in _read_lines(path):
                (pending if line.startswith("@") else atoms).append((line, path))
        seen: set[str] = set()
        while pending:
            name, source = pending.pop()
            name = name[1:]
            if name in seen:
                continue
            seen.add(name)
            set_file = self._under(root, os.path.join(USER_SETS_DIR, name))
            if os.path.isfile(set_file):
                for line in _read_lines(set_file):
                    (pending if line.startswith("@") else atoms).append((line, set_file))
            elif name in BUILTIN_SETS:
                logger.info("%s: @%s is computed by portage; its packages count as not manual", source, name)
            else:
                logger.warning("%s: set @%s not found in %s; its packages count as not manual",
                               source, name, self._under(root, USER_SETS_DIR))
        return atoms

    def _open(self, root: str):
        """(portage module, vardbapi, dblink class) for the system under ``root``."""
        vdb = self._under(root, VDB_PATH)
        if not os.path.isdir(vdb):
            raise ManifestError(f"no portage package database at {vdb}")
        portage = _import_portage()
        try:
            with _captured() as messages:
                settings = _settings(portage, root, self.eprefix)
                tree = portage.dbapi.vartree.vartree(settings=settings)
        except Exception as exc:  # portage raises many kinds on a broken configuration
            culprit = _unparsable_make_conf(portage, _config_root(root, self.eprefix))
            if culprit is not None and culprit[0] not in str(exc):  # shlex's errors name no file
                raise ManifestError(f"{culprit[0]}: portage cannot parse it: {culprit[1]}") from exc
            raise ManifestError(f"portage cannot read the configuration under {root}: {exc}") from exc
        for message in messages:
            logger.debug("portage: %s", message)
        return portage, tree.dbapi, portage.dbapi.vartree.dblink


def _settings(portage, root: str, eprefix: str):
    """A portage config whose vdb is ``<root><eprefix>/var/db/pkg``.

    ``portage.db[root]`` would use ``portage.const.EPREFIX``, which for portage
    installed from PyPI is the virtualenv's prefix, and would load every
    repository.  Instead: PORTAGE_CONFIGROOT and ROOT are the target system
    (its make.conf, profile and /etc/profile.env give CONFIG_PROTECT, as in
    emerge), EPREFIX is explicit, and the calling process's environment is
    left out so that the manifest does not depend on who runs the backup.  On
    a Gentoo system with root "/" this is the configuration emerge uses, minus
    ebuild repositories.
    """
    return portage.config(
        config_root=_config_root(root, eprefix),
        config_profile_path=_profile(root, eprefix),
        target_root=root,
        eprefix=eprefix,
        env={"PORTAGE_REPOSITORIES": NO_REPOSITORIES},
    )


def _profile(root: str, eprefix: str) -> str | None:
    """The profile directory of the system under ``root``, its symlinks
    resolved within ``root``; None (portage's own search) for ``/``.

    portage resolves ``make.profile`` on the host: an absolute link, as
    older installs made it, would name this machine's profile, or none.
    """
    if os.path.realpath(root) == "/":
        return None
    canonical = Canonicalizer(root)
    for link in (PROFILE_LINK, "etc/make.profile"):  # portage's order
        profile = canonical.directory(os.fsencode(posixpath.join("/", eprefix.lstrip("/"), link)))
        path = os.path.join(root, os.fsdecode(profile).lstrip("/"))
        if os.path.isdir(path):
            return path
    return ""  # no profile: portage's own search would look on the host


def _config_root(root: str, eprefix: str) -> str:
    return os.path.join(root, eprefix.lstrip("/")) if eprefix else root


def _unparsable_make_conf(portage, config_root: str) -> tuple[str, Exception] | None:
    """(file, error) for the first make.conf file (or file in a make.conf
    directory) that portage cannot parse; None when every one parses."""
    for name in ("etc/make.conf", "etc/portage/make.conf"):
        path = os.path.join(config_root, name)
        files = [path]
        if os.path.isdir(path):  # read as portage reads it: no hidden or backup files
            files = sorted(os.path.join(top, f) for top, _, names in os.walk(path)
                           for f in names if not f.startswith(".") and not f.endswith("~"))
        for file in files:
            try:
                portage.util.getconfig(file, allow_sourcing=True, expand={})
            except Exception as exc:
                return file, exc
    return None


def _add_contents(manifest, cpv, contents, root_len, protect, canonical, contents_file) -> None:
    """Add one package's getcontents() result to ``manifest``."""
    undecodable = bad_digests = 0
    for key, data in contents.items():
        if "\ufffd" in key:
            # portage decoded a non-UTF-8 name with errors="replace": the name
            # is not the one on disk, and could match some other file.
            undecodable += 1
            continue
        kind = KINDS.get(data[0], OTHER)
        path = os.fsencode(key[root_len:])
        if kind == DIR:
            # A directory the package installed; if that path is now a symlink
            # (merged /usr), the directory it meant is the target.
            path = canonical.directory(posixpath.normpath(path))
        else:
            path = canonical(path)
        old = manifest.get(path)
        if old is not None and kind == DIR and old.kind != DIR:
            continue  # a parent-directory entry never hides a file or symlink
        try:
            manifest[path] = Entry(
                kind=kind,
                package=cpv,
                digest=Digest("md5", data[2].lower()) if kind == FILE else None,
                conffile=kind in (FILE, SYMLINK) and bool(protect.isprotected(key)),
                mtime=_int(data[1]) if kind in (FILE, SYMLINK) else None,
                target=_target(data) if kind == SYMLINK else None,
            )
        except ValueError:  # an md5 that is not 32 hex digits: the file is backed up
            bad_digests += 1
            manifest.pop(path, None)
    if bad_digests:
        _warn(manifest, f"{contents_file}: {bad_digests} md5s are not 32 hex digits; those files are backed up")
    if undecodable:
        _warn(
            manifest,
            f"{contents_file}: {undecodable} names are not valid UTF-8; those files are backed up",
        )


def _target(data: tuple) -> bytes | None:
    """The target a ``sym`` entry records, as ``readlink`` gives it; None when
    unknown (a name portage could not decode is not the one on disk)."""
    target = data[2] if len(data) > 2 else ""
    return os.fsencode(target) if target and "\ufffd" not in target else None


def _import_portage():
    try:
        import portage
        import portage.dbapi.vartree
        import portage.exception
        import portage.util
        import portage.versions
    except ImportError as exc:
        raise ManifestError(
            f"the portage Python module is not installed for {sys.executable} ({exc}); "
            "install sys-apps/portage, or 'pip install portage'"
        ) from exc
    return portage


@contextlib.contextmanager
def _captured():
    """Collect what portage prints on stderr (``!!! ...``) as a list of lines."""
    buffer = io.StringIO()
    messages: list[str] = []
    try:
        with contextlib.redirect_stderr(buffer):
            yield messages
    finally:
        for line in buffer.getvalue().splitlines():
            line = line.strip()
            if line.startswith("!!!"):
                line = line[3:].strip()
            if line:
                messages.append(line)


def _warn(manifest: Manifest, message: str) -> None:
    manifest.warnings.append(message)  # logged by whoever loads it, kept or not: once


def _counter(vardb, cpv) -> int:
    """The merge order of ``cpv`` (portage's COUNTER); 0 when unknown."""
    try:
        with open(vardb.getpath(cpv, filename="COUNTER"), encoding="ascii") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _int(text) -> int | None:
    """A recorded mtime; None when it is not one (it is only ever shown, never trusted)."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        return None
    return value if -(1 << 63) <= value < 1 << 63 else None


def _has_subdir(path: str) -> bool:
    try:
        with os.scandir(path) as entries:
            return any(entry.is_dir(follow_symlinks=False) for entry in entries)
    except OSError:
        return False


def _read_lines(path: str) -> list[str]:
    """Non-empty, non-comment lines of a world or set file; [] when it is missing."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except FileNotFoundError:
        return []
    except OSError as exc:
        logger.warning("%s: cannot be read: %s", path, exc)
        return []
    return [line for line in lines if line]

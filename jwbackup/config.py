"""Reading ``/etc/jwbackup.yaml`` into frozen dataclasses.

Every problem becomes a :class:`ConfigError` of one line,
``FILE:LINE: KEY.PATH: problem``, with the line taken from the YAML node of the
offending key or value.  The file is composed into YAML nodes (never into Python
objects through tags) and each value is checked against the shape it must have.

The seed format of jw.backup 1.0 (``roots``, ``prune``, ``destination``) is a
subset of this one and loads unchanged.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import socket
import stat
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Mapping

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from jwbackup.errors import ConfigError
from jwbackup.managers import ENTRY_POINT_GROUP

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/jwbackup.yaml"
DEFAULT_ROOTS = ("/",)
DEFAULT_PRUNE = (
    "/tmp", "/proc", "/sys", "/dev", "/mnt", "/var/tmp", "/var/run", "/var/cache", "/run", "/lost+found",
)
DEFAULT_LOCK_FILE = "/run/lock/jwbackup/jwbackup.lock"  # a private directory: see lock.py
MAX_SIZE = 1024 * 1024  # larger files are refused before YAML sees them
MAX_DEPTH = 10  # nesting of lists and mappings; the format itself needs 3
PASSWORD_MASK = "********"
MAX_TIMEOUT = 86400  # destination.timeout: a day without data is a dead link

TOP_KEYS = ("root", "roots", "prune", "destination", "manager", "lock_file", "hooks", "verify", "transfer")
DESTINATION_KEYS = (
    "host", "user", "port", "key", "password", "known_hosts", "accept_new_host_key",
    "directory", "generations", "keep", "timeout",
)
KEEP_KEYS = ("daily", "weekly", "monthly", "yearly")
HOOK_KEYS = ("before", "after", "on_error")
VERIFY_MODES = ("all", "conffiles", "none")  # see verify.py
TRANSFER_MODES = ("auto", "rsync")


@dataclass(frozen=True)
class Keep:
    """borg-prune style retention; 0 turns a rule off."""

    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0


@dataclass(frozen=True)
class Destination:
    directory: str  # {VARIABLE}s already expanded; absolute, or with a host relative to the login directory
    host: str | None = None  # None -> local directory
    user: str | None = None
    port: int = 22
    key: str | None = None  # ssh identity file
    password: str | None = None  # goes to ssh through `sshpass -e` (env SSHPASS), never argv
    known_hosts: str | None = None  # ssh UserKnownHostsFile; None = ssh's default
    accept_new_host_key: bool = False  # StrictHostKeyChecking=accept-new instead of yes
    generations: int = 30
    keep: Keep | None = None
    timeout: int = 300  # seconds without data from the destination before rsync and ssh give up

    @property
    def remote(self) -> bool:
        return self.host is not None


@dataclass(frozen=True)
class Hooks:
    """Shell commands run around a backup (see hooks.py); each runs as ``/bin/sh -c``."""

    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    on_error: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    path: str | None  # the file it was read from
    roots: tuple[str, ...]  # absolute directories to back up
    prune: tuple[str, ...]  # absolute directories to skip
    destination: Destination | None  # None when the file has no destination section
    manager: str | None = None  # force a package manager plugin by name
    lock_file: str = DEFAULT_LOCK_FILE
    hooks: Hooks = Hooks()
    verify: str = "all"  # which installed files are compared with their digests: all, conffiles, none
    transfer: str = "auto"  # how generations are built: auto (local linker where possible) or rsync


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration file at *path* (default ``/etc/jwbackup.yaml``).

    *env* supplies ``{VARIABLE}`` values for ``destination.directory``
    (default ``os.environ``).  Raises ConfigError naming file, line and key.
    """
    path = DEFAULT_PATH if path is None else path
    data, st = _read(path)
    _check_owner(path, st)
    mode = st.st_mode if stat.S_ISREG(st.st_mode) else None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 text (byte 0x{data[e.start]:02x})") from None
    config = _Checker(path, os.environ if env is None else env, mode).config(_compose(text, path))
    logger.debug("read configuration from %s", path)
    return config


def loads(text: str, path: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    """Validate configuration *text*; *path* only names it in messages.

    There is no file, so a ``password`` is not checked against file permissions.
    """
    return _Checker(path, os.environ if env is None else env, None).config(_compose(text, path))


def dump(config: Config) -> str:
    """The effective configuration as YAML, password masked; ``load`` reads it back."""
    data: dict = {"root": list(config.roots), "prune": list(config.prune)}
    d = config.destination
    if d is not None:
        # where, then how to log in, then how long to keep; unset options left out
        dest = {
            "host": d.host,
            "user": d.user,
            "port": d.port,
            "directory": d.directory.replace("{", "{{").replace("}", "}}"),
            "key": d.key,
            "password": None if d.password is None else PASSWORD_MASK,
            "known_hosts": d.known_hosts,
            "accept_new_host_key": d.accept_new_host_key,
            "generations": d.generations,
            "timeout": d.timeout,
        }
        if d.keep is not None:
            dest["keep"] = {name: getattr(d.keep, name) for name in KEEP_KEYS}
        data["destination"] = {k: v for k, v in dest.items() if v is not None}
    if config.manager is not None:
        data["manager"] = config.manager
    data["lock_file"] = config.lock_file
    if config.hooks != Hooks():
        data["hooks"] = {name: list(getattr(config.hooks, name)) for name in HOOK_KEYS if getattr(config.hooks, name)}
    if config.verify != "all":
        data["verify"] = config.verify
    if config.transfer != "auto":
        data["transfer"] = config.transfer
    return yaml.dump(
        data, Dumper=_IndentedDumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=4096
    )


class _IndentedDumper(yaml.SafeDumper):
    """Indents list items under their key, as people write them by hand."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


# --- reading and composing -------------------------------------------------------------

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# the characters YAML 1.1 allows in a stream (YAML's own reader uses the same set)
_NON_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _read(path: str) -> tuple[bytes, os.stat_result]:
    """The file's bytes (at most MAX_SIZE) and its status."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    if len(data) > MAX_SIZE:
        raise ConfigError(f"{path}: configuration file is larger than 1 MiB; refusing to read it")
    return data, st


def _check_owner(path: str, st: os.stat_result) -> None:
    """Refuse a file that another user can change: its hooks run as the user
    running jwbackup (root), and its destination receives the system's files."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{path}: owned by uid {st.st_uid}, who could make jwbackup run any command; "
                          f"run: chown root {path}")
    if mode & 0o002 or (mode & 0o020 and st.st_gid != 0):
        raise ConfigError(f"{path}: writable by other users (mode {mode:04o}), who could make jwbackup run "
                          f"any command; run: chmod go-w {path}")


def _compose(text: str, path: str) -> Node:
    """The document's node graph, after a pass over the parse events that refuses aliases.

    Alias bombs ("billion laughs") are stopped by refusing every alias (``*name``)
    in that first pass, before any node is built; the format has no use for them.
    The same pass bounds the nesting depth, so deep ``[[[[...`` cannot exhaust the stack.
    """
    bad = _NON_PRINTABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        raise ConfigError(f"{path}:{line}: contains a control character ({ord(bad.group()):#04x}) YAML does not allow")
    try:
        depth = documents = 0
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, yaml.AliasEvent):
                raise _located(path, event.start_mark, f"YAML aliases are not allowed (*{event.anchor}); write the value out")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _located(path, event.start_mark, f"nested more than {MAX_DEPTH} levels deep")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise _located(path, event.start_mark, "more than one YAML document (---); put everything in one")
        loader = _LOADER(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        if e.context_mark is not None and (mark.line >= text.count("\n") or "end of stream" in (e.problem or "")):
            mark = e.context_mark  # a quote or bracket never closed: where it opens, not the file's end
        problem = e.problem or e.context or "cannot parse"
        if e.context and e.problem:
            problem += f" ({e.context})"
        raise _located(path, mark, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(_one_line(f"{path}: YAML error: {e}")) from None
    if node is None:
        raise ConfigError(f"{path}: configuration file is empty")
    return node


def _located(path: str, mark, problem: str) -> ConfigError:
    where = f"{path}:{mark.line + 1}" if mark is not None else path
    return ConfigError(_one_line(f"{where}: {problem}"))


def _one_line(message: str) -> str:
    return " ".join(message.split("\n"))


# --- checking nodes --------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_KINDS = {
    "str": "a string", "int": "a whole number", "float": "a fractional number", "bool": "a boolean",
    "null": "null", "timestamp": "a date", "binary": "binary data", "map": "a mapping", "seq": "a list",
}
_VARIABLE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# YAML 1.1 also reads 010 as octal 8, 1:30 as 90 and 1_000 as 1000: not what anyone means by a count.
_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)")


def _describe(node: Node) -> str:
    """What a node is, for "must be X, not Y" messages."""
    kind = _KINDS.get(node.tag[len(_TAG):]) if node.tag.startswith(_TAG) else None
    if isinstance(node, MappingNode):
        return kind if node.tag == _TAG + "map" else f"a mapping tagged {node.tag}"
    if isinstance(node, SequenceNode):
        return kind if node.tag == _TAG + "seq" else f"a list tagged {node.tag}"
    if node.tag == _TAG + "null":
        return "an empty value" if node.value in ("", "~") else "null"
    if kind is None:
        kind = f"a value tagged {node.tag}"
    return f"{kind} ({_show(node.value)})"


def _show(text: str) -> str:
    if len(text) > 40:
        text = text[:37] + "..."
    return text if text.isprintable() and text.strip() == text and text else repr(text)


def _is(node: Node, kind: str) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG + kind


class _Checker:
    """Turns the node graph of one file into a Config, or raises on the first mistake."""

    def __init__(self, path: str, env: Mapping[str, str], mode: int | None):
        self.path = path
        self.env = env
        self.mode = mode
        self.constructor = yaml.constructor.SafeConstructor()

    def error(self, node: Node, keypath: str, problem: str) -> ConfigError:
        return _located(self.path, node.start_mark, f"{keypath}: {problem}")

    def config(self, node: Node) -> Config:
        if not (isinstance(node, MappingNode) and node.tag == _TAG + "map"):
            raise _located(
                self.path, node.start_mark,
                f"the configuration must be a mapping of keys ({', '.join(TOP_KEYS)}), not {_describe(node)}",
            )
        items = self.mapping(node, "", TOP_KEYS)
        if "root" in items and "roots" in items:
            later = max(("root", "roots"), key=lambda k: items[k][0].start_mark.index)
            raise self.error(items[later][0], later, "'root' and 'roots' are the same setting; keep only one")
        roots = DEFAULT_ROOTS
        for name in ("root", "roots"):
            if name in items:
                roots = self.paths(items[name][1], name)
                if not roots:
                    raise self.error(items[name][1], name, "must name at least one directory")
        prune = self.paths(items["prune"][1], "prune") if "prune" in items else DEFAULT_PRUNE
        destination = self.destination(*items["destination"]) if "destination" in items else None
        manager = self.manager(items["manager"][1]) if "manager" in items else None
        lock_file = self.lock_file(items["lock_file"][1]) if "lock_file" in items else DEFAULT_LOCK_FILE
        hooks = self.hooks(items["hooks"][1]) if "hooks" in items else Hooks()
        verify = self.choice(items["verify"][1], "verify", VERIFY_MODES) if "verify" in items else "all"
        transfer = self.choice(items["transfer"][1], "transfer", TRANSFER_MODES) if "transfer" in items else "auto"
        return Config(self.path, roots, prune, destination, manager, lock_file, hooks, verify, transfer)

    def hooks(self, node: Node) -> Hooks:
        items = self.mapping(node, "hooks", HOOK_KEYS)
        return Hooks(**{name: self.commands(value, f"hooks.{name}") for name, (_, value) in items.items()})

    def commands(self, node: Node, keypath: str) -> tuple[str, ...]:
        """A list of shell commands, or one command on its own."""
        if _is(node, "str"):
            return (self.string(node, keypath),)
        if not (isinstance(node, SequenceNode) and node.tag == _TAG + "seq"):
            hint = "; write [] for none" if _is(node, "null") else ""
            raise self.error(node, keypath, f"must be a list of shell commands or one command, not {_describe(node)}{hint}")
        return tuple(self.string(item, f"{keypath}[{i}]") for i, item in enumerate(node.value))

    def destination(self, key: Node, node: Node) -> Destination:
        items = self.mapping(node, "destination", DESTINATION_KEYS)
        if "directory" not in items:
            raise self.error(key, "destination.directory", "missing; name the directory the backups go to")
        values: dict = {}
        for name in ("host", "user"):
            if name in items:
                values[name] = self.string(items[name][1], f"destination.{name}", optional=True)
        for name in ("key", "known_hosts"):
            if name in items:
                value = self.string(items[name][1], f"destination.{name}", optional=True)
                if value is not None:  # ~/.ssh/... as ssh takes it
                    values[name] = self.absolute(items[name][1], f"destination.{name}", os.path.expanduser(value))
        if "password" in items:
            key_node, value_node = items["password"]
            if not (_is(value_node, "str") or _is(value_node, "null")):  # its text is not shown: it is a secret
                raise self.error(value_node, "destination.password", "must be a string; put it in quotes")
            values["password"] = self.string(value_node, "destination.password", optional=True)
            if values["password"] is not None and self.mode is not None and self.mode & 0o044:
                raise self.error(
                    key_node, "destination.password",
                    f"{self.path} holds a password but is readable by group or others "
                    f"(mode {stat.S_IMODE(self.mode):04o}); run: chmod 600 {self.path}",
                )
        if "port" in items:
            port = self.integer(items["port"][1], "destination.port", "a port number from 1 to 65535")
            if not 1 <= port <= 65535:
                raise self.error(items["port"][1], "destination.port", f"must be a port number from 1 to 65535, not {port}")
            values["port"] = port
        if "timeout" in items:
            seconds = f"a number of seconds from 1 to {MAX_TIMEOUT}"
            timeout = self.integer(items["timeout"][1], "destination.timeout", seconds)
            if not 1 <= timeout <= MAX_TIMEOUT:
                raise self.error(items["timeout"][1], "destination.timeout", f"must be {seconds}, not {timeout}")
            values["timeout"] = timeout
        if "accept_new_host_key" in items:
            values["accept_new_host_key"] = self.boolean(items["accept_new_host_key"][1], "destination.accept_new_host_key")
        if "generations" in items:
            values["generations"] = self.integer(
                items["generations"][1], "destination.generations", "a positive whole number", minimum=1
            )
        if "keep" in items:
            values["keep"] = self.keep(items["keep"][1])
        directory_node = items["directory"][1]
        directory = self.expand(directory_node, "destination.directory",
                                self.string(directory_node, "destination.directory"))
        if values.get("host") and not directory.startswith("/"):  # from the login directory, as ssh takes it
            values["directory"] = os.path.normpath(directory)
        else:
            values["directory"] = self.absolute(directory_node, "destination.directory", directory)
        return Destination(**values)

    def keep(self, node: Node) -> Keep:
        items = self.mapping(node, "destination.keep", KEEP_KEYS)
        return Keep(**{
            name: self.integer(value, f"destination.keep.{name}", "a whole number, 0 or more", minimum=0)
            for name, (_, value) in items.items()
        })

    def mapping(self, node: Node, keypath: str, known: tuple[str, ...]) -> dict[str, tuple[Node, Node]]:
        """The mapping's entries by key name; unknown and duplicate keys are errors."""
        if not (isinstance(node, MappingNode) and node.tag == _TAG + "map"):
            raise self.error(node, keypath, f"must be a mapping of keys ({', '.join(known)}), not {_describe(node)}")
        items: dict[str, tuple[Node, Node]] = {}
        for key, value in node.value:
            if not _is(key, "str"):
                problem = (
                    "merge keys (<<) are not allowed; write the keys out" if key.tag == _TAG + "merge"
                    else f"keys must be names, not {_describe(key)}"
                )
                raise self.error(key, keypath, problem) if keypath else _located(self.path, key.start_mark, problem)
            name = key.value
            full = f"{keypath}.{name}" if keypath else name
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                raise self.error(key, full, f"unknown key; {hint}")
            if name in items:
                raise self.error(key, full, f"duplicate key (first on line {items[name][0].start_mark.line + 1})")
            items[name] = (key, value)
        return items

    def string(self, node: Node, keypath: str, optional: bool = False) -> str | None:
        if optional and _is(node, "null"):
            return None
        if not _is(node, "str"):
            hint = ""
            if isinstance(node, ScalarNode) and node.tag in (_TAG + "bool", _TAG + "int", _TAG + "float", _TAG + "null"):
                hint = "; put it in quotes if you mean the text"
            raise self.error(node, keypath, f"must be a string, not {_describe(node)}{hint}")
        if node.value == "":
            raise self.error(node, keypath, "must not be empty" + ("; leave the key out" if optional else ""))
        if "\0" in node.value:
            raise self.error(node, keypath, "must not contain a NUL character")
        return node.value

    def manager(self, node: Node) -> str | None:
        """A package manager plugin's name, as registered; checked here so that
        ``config check`` catches a typo that every run would fail on."""
        if self.string(node, "manager", optional=True) is None:
            return None
        return self.choice(node, "manager", tuple(sorted(entry_points(group=ENTRY_POINT_GROUP).names)))

    def choice(self, node: Node, keypath: str, choices: tuple[str, ...]) -> str:
        if not (_is(node, "str") and node.value in choices):
            given = repr(node.value) if _is(node, "str") else _describe(node)
            raise self.error(node, keypath, f"must be one of {', '.join(choices)}, not {given}")
        return node.value

    def path_value(self, node: Node, keypath: str, optional: bool = False) -> str | None:
        value = self.string(node, keypath, optional)
        return None if value is None else self.absolute(node, keypath, value)

    def absolute(self, node: Node, keypath: str, value: str) -> str:
        if not value.startswith("/"):
            raise self.error(node, keypath, f"must be an absolute path (starting with /), not {_show(value)}")
        return "/" + os.path.normpath(value).lstrip("/")

    def lock_file(self, node: Node) -> str:
        """A file's path, in a directory of root's own (checked again when it is locked)."""
        value = self.string(node, "lock_file")
        path = self.absolute(node, "lock_file", value)
        if value.endswith("/") or os.path.isdir(path):
            raise self.error(node, "lock_file", f"must name a file, not the directory {_show(value)}")
        directory = os.path.dirname(path)
        if os.path.isdir(directory) and os.stat(directory).st_mode & 0o022:
            raise self.error(node, "lock_file", f"{directory} is writable by other users: put the lock "
                             f"in a directory of its own, such as {os.path.dirname(DEFAULT_LOCK_FILE)}")
        return path

    def paths(self, node: Node, keypath: str) -> tuple[str, ...]:
        """A list of absolute paths, or one path on its own; duplicates dropped."""
        if isinstance(node, ScalarNode) and _is(node, "str"):
            return (self.path_value(node, keypath),)
        if not (isinstance(node, SequenceNode) and node.tag == _TAG + "seq"):
            hint = "; write [] for none" if _is(node, "null") else ""
            raise self.error(node, keypath, f"must be a list of absolute paths or one path, not {_describe(node)}{hint}")
        result: dict[str, None] = {}
        for i, item in enumerate(node.value):
            result[self.path_value(item, f"{keypath}[{i}]")] = None
        return tuple(result)

    def integer(self, node: Node, keypath: str, expected: str, minimum: int | None = None) -> int:
        # YAML's `yes` is a boolean, and a boolean is not a number here
        if not _is(node, "int"):
            raise self.error(node, keypath, f"must be {expected}, not {_describe(node)}")
        try:
            value = self.constructor.construct_object(node)
        except ValueError:
            raise self.error(node, keypath, f"must be {expected}, not a number that large") from None
        if not _DECIMAL.fullmatch(node.value):
            raise self.error(node, keypath, f"must be {expected} in plain decimal digits, not {_show(node.value)}, "
                                            f"which YAML reads as {value}")
        if minimum is not None and value < minimum:
            raise self.error(node, keypath, f"must be {expected}, not {value}")
        return value

    def boolean(self, node: Node, keypath: str) -> bool:
        if not _is(node, "bool"):
            raise self.error(node, keypath, f"must be true or false, not {_describe(node)}")
        return self.constructor.construct_object(node)

    def expand(self, node: Node, keypath: str, value: str) -> str:
        """Replace ``{NAME}`` from the environment; ``{{`` and ``}}`` are literal braces."""

        def replace(match: re.Match) -> str:
            token = match.group()
            if token in ("{{", "}}"):
                return token[0]
            name = match.group(1)
            if name is None:
                raise self.error(node, keypath, f"unmatched {token!r} in {_show(value)}; write {token * 2!r} for a literal brace")
            if not _NAME.fullmatch(name):
                raise self.error(node, keypath, f"{{{name}}} is not a variable name")
            result = self.env.get(name)
            if not result and name == "HOSTNAME":
                result = socket.gethostname()
            if result is None:
                raise self.error(node, keypath, f"variable {{{name}}} is not set in the environment")
            if result == "":
                raise self.error(node, keypath, f"variable {{{name}}} is empty in the environment")
            return result

        return _VARIABLE.sub(replace, value)

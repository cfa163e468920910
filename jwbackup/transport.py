"""Running commands at the destination: on this machine, or over OpenSSH.

``Local`` and ``Ssh`` share one interface: ``run``, ``rsync_target``,
``rsync_args``, ``env``, ``connection_error``, ``close`` and use as a context
manager.  Over ssh, one master connection (``ControlMaster``) is opened on
first use and reused by every later command and by rsync; ``close`` ends it.
Remote commands are argv lists, each argument quoted with ``shlex.quote``.
A password reaches ssh only through ``sshpass -e`` and ``$SSHPASS``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import stat
import subprocess
import secrets
import tempfile
from typing import TYPE_CHECKING, Sequence

from jwbackup import execute, rsync
from jwbackup.errors import DestinationError
from jwbackup.execute import Arg, CommandError

if TYPE_CHECKING:
    from jwbackup.config import Destination

logger = logging.getLogger(__name__)

CONTROL_PERSIST = 60
CONNECT_TIMEOUT = 30
# A unix socket path holds at most 107 bytes.  The socket is cm-<8 hex>-%C: %C
# expands to 40 hex digits, and ssh appends ".XXXXXXXXXXXXXXXX" while creating it.
_SOCKET_PATH_MAX = 107
_CONTROL_NAME_LEN = len("cm--") + 8 + 40 + 17

HOST_KEY_HINT = "unknown or changed host key; check known_hosts or set destination.accept_new_host_key"

# ssh's stderr (exit status 255) -> the one-line reason shown to the user.
_SSH_FAILURES = (
    (re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed", re.I),
     lambda m: f"host key verification failed ({HOST_KEY_HINT})"),
    (re.compile(r"Permission denied \(([^)]*)\)"), lambda m: f"permission denied ({m.group(1)})"),
    (re.compile(r"Permission denied, please try again"), lambda m: "permission denied (wrong password)"),
    (re.compile(r"Connection refused"), lambda m: "connection refused"),
    (re.compile(r"Could not resolve hostname [^:]*: (.*)"), lambda m: f"cannot resolve host name ({m.group(1).rstrip('.')})"),
    (re.compile(r"Connection timed out|Operation timed out"), lambda m: "connection timed out"),
    (re.compile(r"No route to host"), lambda m: "no route to host"),
    (re.compile(r"Network is unreachable"), lambda m: "network is unreachable"),
    (re.compile(r"Too many authentication failures"), lambda m: "too many authentication failures"),
    (re.compile(r"Connection (?:closed|reset) by|kex_exchange_identification|Broken pipe"),
     lambda m: "connection closed by the server"),
)


def connect(destination: Destination, *, runtime_dir: str | None = None) -> Local | Ssh:
    """The transport for ``destination``: ``Ssh`` when it names a host, else ``Local``."""
    return Ssh(destination, runtime_dir=runtime_dir) if destination.remote else Local()


class Local:
    """The destination is a directory on this machine."""

    where = "local"

    def run(self, argv: Sequence[Arg], *, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return execute.run(argv, input=input, check=check)

    def rsync_target(self, path: str) -> str:
        """``path`` as rsync's destination argument (never mistaken for ``host:path``)."""
        return path if os.path.isabs(path) else "./" + path

    def rsync_args(self) -> list[str]:
        return []

    def env(self) -> dict[str, str]:
        return {}

    def connection_error(self, stderr: bytes, returncode: int | None = None) -> DestinationError | None:
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> Local:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Ssh:
    """The destination is a directory on another machine, reached with OpenSSH."""

    def __init__(self, destination: Destination, *, runtime_dir: str | None = None):
        self.destination = destination
        self._runtime_dir = runtime_dir
        self._control_dir: str | None = None
        # One master per Ssh object: another run's (or test's) master to the same
        # host, opened with other options, is never picked up by accident.
        self._control_name = f"cm-{secrets.token_hex(4)}-%C"
        host = destination.host or ""
        self.where = f"{destination.user + '@' if destination.user else ''}{host}:{destination.port}"

    # --- command lines -------------------------------------------------------

    @property
    def control_path(self) -> str:
        """The ssh ControlPath template (``<runtime dir>/cm-<id>-%C``); creates the directory."""
        if self._control_dir is None:
            self._control_dir = private_runtime_dir(self._runtime_dir)
        return os.path.join(self._control_dir, self._control_name)

    def ssh_options(self) -> list[str]:
        """``ssh`` and its options, up to (not including) the host."""
        d = self.destination
        argv = ["ssh", "-p", str(d.port)]
        if d.user:
            argv += ["-l", d.user]
        if d.key:
            # not -i: ssh checks -i's argument before its own %-expansion, so no escape works there
            argv += ["-o", "IdentityFile=" + _config_quote(_percent_escape(d.key)), "-o", "IdentitiesOnly=yes"]
        if d.password:
            methods = "password,keyboard-interactive"
            argv += ["-o", "BatchMode=no", "-o", f"PreferredAuthentications={'publickey,' if d.key else ''}{methods}",
                     "-o", "NumberOfPasswordPrompts=1"]
        else:
            argv += ["-o", "BatchMode=yes"]
        argv += ["-o", f"StrictHostKeyChecking={'accept-new' if d.accept_new_host_key else 'yes'}"]
        if d.known_hosts:
            argv += ["-o", "UserKnownHostsFile=" + _config_quote(_percent_escape(d.known_hosts))]
        interval, count = server_alive(d.timeout)
        argv += [
            "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
            "-o", f"ServerAliveInterval={interval}",
            "-o", f"ServerAliveCountMax={count}",
            "-o", "ControlMaster=auto",
            "-o", "ControlPath=" + _config_quote(_percent_escape(self.control_path, keep="-%C")),
            "-o", f"ControlPersist={CONTROL_PERSIST}",
        ]
        return argv

    def _prefix(self) -> list[str]:
        return ["sshpass", "-e"] if self.destination.password else []

    def command(self, argv: Sequence[Arg]) -> list[str]:
        """The local argv that runs ``argv`` at the destination."""
        if not argv:
            raise ValueError("empty command")
        remote = " ".join(shlex.quote(os.fsdecode(a)) for a in argv)
        return [*self._prefix(), *self.ssh_options(), "--", self.destination.host, remote]

    def rsync_target(self, path: str) -> str:
        """``[user@]host:path`` for rsync; rsync >= 3.2.4 passes the path to the server unsplit."""
        d = self.destination
        host = f"[{d.host}]" if ":" in d.host else d.host
        return f"{d.user + '@' if d.user else ''}{host}:{path}"

    def rsync_args(self) -> list[str]:
        """``--timeout`` and ``-e <remote shell>``: the same ssh options, so rsync uses the master connection."""
        shell = " ".join(_rsync_quote(a) for a in [*self._prefix(), *self.ssh_options()])
        return [f"--timeout={self.destination.timeout}", "-e", shell]

    def env(self) -> dict[str, str]:
        """Extra environment for processes that talk to the destination."""
        return {"SSHPASS": self.destination.password} if self.destination.password else {}

    # --- running -------------------------------------------------------------

    def run(self, argv: Sequence[Arg], *, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` at the destination.

        ssh failures (exit 255) raise :class:`DestinationError` whatever ``check``
        says; a failing remote command raises :class:`CommandError` with ``check``.
        """
        masked = [self.destination.password] if self.destination.password else []
        result = execute.run(self.command(argv), input=input, env=self.env(), check=False, secrets=masked)
        if result.returncode == 255:
            raise self.connection_error(result.stderr) or DestinationError(
                execute.failure_message(["ssh"], 255, result.stderr, self.where))
        if self.destination.password and result.returncode == 5 and not result.stderr.strip():
            raise DestinationError(f"{self.where}: permission denied (wrong password)")
        if check and result.returncode != 0:
            raise CommandError(argv, result.returncode, result.stderr, where=self.where)
        return result

    def connection_error(self, stderr: bytes, returncode: int | None = None) -> DestinationError | None:
        """A :class:`DestinationError` when ssh could not connect or log in (``stderr``
        says so), or when rsync gave up on a silent link (its ``returncode`` does)."""
        host = self.rsync_target("")[:-1]  # [user@]host, as rsync names it
        if returncode == rsync.TIMEOUT:
            return DestinationError(f"{host}: no data for {self.destination.timeout} s, link stalled or down")
        if returncode == rsync.CONNECT_TIMEOUT:
            return DestinationError(f"{host}: connection timed out")
        text = stderr.decode("utf-8", "replace")
        for pattern, reason in _SSH_FAILURES:
            match = pattern.search(text)
            if match:
                return DestinationError(f"{self.where}: {reason(match)}")
        return None

    def master_running(self) -> bool:
        """Whether the shared master connection is up (``ssh -O check``)."""
        return self._control("check").returncode == 0

    def _control(self, command: str) -> subprocess.CompletedProcess:
        return execute.run([*self.ssh_options(), "-O", command, "--", self.destination.host], check=False)

    def close(self) -> None:
        """End the master connection, if one is running."""
        if self._control_dir is None:
            return
        result = self._control("exit")
        if result.returncode == 0:
            logger.debug("closed the ssh master connection to %s", self.where)

    def __enter__(self) -> Ssh:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def server_alive(timeout: int) -> tuple[int, int]:
    """ssh's ServerAliveInterval and ServerAliveCountMax for ``destination.timeout``.

    A probe every 15 s at most (NAT boxes forget quiet connections); ssh gives
    up two probes after rsync's own ``--timeout``, so that rsync reports a
    stalled transfer itself, and a stalled master connection still ends.
    """
    interval = max(1, min(15, timeout // 4))
    return interval, -(-timeout // interval) + 2


def private_runtime_dir(parent: str | None = None) -> str:
    """A directory only we can use, for ssh control sockets.

    ``parent`` when given (tests), else ``$XDG_RUNTIME_DIR/jwbackup``, else
    ``/run/jwbackup`` for root, else a fresh ``mkdtemp`` directory.
    """
    if parent is None:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isabs(xdg):
            parent = os.path.join(xdg, "jwbackup")
        elif os.geteuid() == 0:
            parent = "/run/jwbackup"
        else:
            parent = tempfile.mkdtemp(prefix="jwbackup-")
    if len(os.fsencode(parent)) + 1 + _CONTROL_NAME_LEN > _SOCKET_PATH_MAX:
        raise DestinationError(f"{parent}: path too long for an ssh control socket; use a shorter runtime directory")
    try:
        os.mkdir(parent, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise DestinationError(f"{parent}: cannot create the ssh control directory: {error.strerror}") from None
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise DestinationError(f"{parent}: not a directory owned by this user; refusing to put ssh control sockets there")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(parent, 0o700)
    return parent


def _percent_escape(value: str, keep: str = "") -> str:
    """Protect ``%`` from ssh's token expansion (``keep`` is a trailing template left as is)."""
    head = value[: len(value) - len(keep)] if keep else value
    return head.replace("%", "%%") + keep


def _config_quote(value: str) -> str:
    """Quote a value for ``ssh -o KEY=VALUE`` (parsed like a line of ssh_config)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rsync_quote(arg: str) -> str:
    """Quote one word of rsync's ``-e`` string, which rsync splits on spaces and quotes."""
    if arg and not re.search(r"[\s'\"]", arg):
        return arg
    return "'" + arg.replace("'", "''") + "'"

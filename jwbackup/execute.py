"""The one place that starts processes.

Commands are argv lists (``str`` or ``bytes`` items), never shell strings.  Each
command is logged at DEBUG, quoted as a shell would need it, with secrets
masked.  A failing command becomes a :class:`CommandError` whose message is one
line taken from the command's own stderr.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
from typing import Iterable, Mapping, Sequence, Union

from jwbackup.errors import JwbackupError

logger = logging.getLogger(__name__)

Arg = Union[str, bytes]

# Debian package that ships a command, where it differs from the command's name.
PACKAGES = {"ssh": "openssh-client", "scp": "openssh-client", "setfacl": "acl", "getfattr": "attr"}

# stderr lines that carry no information about why a command failed.
_NOISE = (
    re.compile(r"^Warning: Permanently added .* to the list of known hosts\.?$"),
    re.compile(r"^rsync error: .* \(code \d+\) at \S+\(\d+\)"),
    re.compile(r"^rsync: connection unexpectedly closed"),
)


class CommandNotFoundError(JwbackupError):
    """A program jwbackup needs is not installed."""


class CommandError(JwbackupError):
    """A command exited with a non-zero status (or was killed by a signal)."""

    def __init__(self, argv: Sequence[Arg], returncode: int, stderr: bytes = b"", where: str | None = None):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr or b""
        super().__init__(failure_message(self.argv, returncode, self.stderr, where))


def program(argv: Sequence[Arg]) -> str:
    """The name of the program ``argv`` runs, for messages."""
    return os.path.basename(os.fsdecode(argv[0])) if argv else "?"


# Lines that report the consequence of an earlier failure, not its cause.
_CONSEQUENCES = re.compile(r"Broken pipe|connection unexpectedly closed|error in rsync protocol data stream")


def _lines(stderr: bytes) -> tuple[list[str], list[str]]:
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    return lines, [line for line in lines if not any(p.search(line) for p in _NOISE)]


def last_meaningful_line(stderr: bytes) -> str | None:
    """The last stderr line that says something, preferring lines that are not boilerplate."""
    lines, useful = _lines(stderr)
    return (useful or lines or [None])[-1]


def first_cause(stderr: bytes) -> str | None:
    """The first stderr line naming a cause: when the receiving side fails
    (disk full), the sending side's "Broken pipe" that follows is no reason."""
    lines, useful = _lines(stderr)
    causes = [line for line in useful if not _CONSEQUENCES.search(line)]
    return (causes or useful or lines or [None])[0]


def ended(returncode: int) -> str:
    """How a process of ours that sent no report ended (``returncode`` as subprocess gives it)."""
    return f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"


def failure_message(argv: Sequence[Arg], returncode: int, stderr: bytes, where: str | None = None) -> str:
    """One line explaining why ``argv`` failed."""
    name = program(argv)
    line = last_meaningful_line(stderr)
    if line is None:
        if returncode < 0:
            try:
                reason = f"killed by signal {signal.Signals(-returncode).name}"
            except ValueError:
                reason = f"killed by signal {-returncode}"
        else:
            reason = f"exited with status {returncode}"
        line = f"{name} {reason}"
    elif not line.startswith(name + ":"):
        line = f"{name}: {line}"
    return f"{where}: {line}" if where else line


def quote(argv: Iterable[Arg], secrets: Sequence[str] = ()) -> str:
    """``argv`` as a copy-pastable shell line, every secret replaced by ``***``."""
    words = []
    for arg in argv:
        word = os.fsdecode(arg)
        for secret in secrets:
            if secret:
                word = word.replace(secret, "***")
        words.append(word)
    return shlex.join(words)


def _environment(env: Mapping[str, str] | None) -> dict[str, str] | None:
    return {**os.environ, **env} if env else None


def _not_found(argv: Sequence[Arg], error: OSError) -> JwbackupError:
    name = program(argv)
    if isinstance(error, FileNotFoundError):
        return CommandNotFoundError(f"{name}: command not found; install the {PACKAGES.get(name, name)} package")
    return CommandNotFoundError(f"{name}: cannot run: {error.strerror or error}")


def run(
    argv: Sequence[Arg],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    secrets: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion and return it with stdout and stderr as bytes.

    ``env`` holds variables added to (or overriding) the inherited environment.
    With ``check``, a non-zero exit raises :class:`CommandError`.
    """
    if not argv:
        raise ValueError("empty command")
    logger.debug("run: %s", quote(argv, secrets))
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=_environment(env),
        )
    except OSError as error:
        raise _not_found(argv, error) from None
    if result.returncode != 0:
        logger.debug("exit %d from %s: %s", result.returncode, program(argv), result.stderr.decode("utf-8", "replace").strip())
        if check:
            raise CommandError(argv, result.returncode, result.stderr)
    return result


def popen(argv: Sequence[Arg], *, env: Mapping[str, str] | None = None, secrets: Sequence[str] = (), **kwargs) -> subprocess.Popen:
    """Start ``argv`` for streaming (e.g. feeding rsync ``--files-from=-``).

    Keyword arguments go to :class:`subprocess.Popen`; ``env`` is added to the
    inherited environment.  The caller waits for the process and may raise
    ``CommandError(argv, returncode, stderr)`` itself.
    """
    if not argv:
        raise ValueError("empty command")
    logger.debug("start: %s", quote(argv, secrets))
    try:
        return subprocess.Popen(list(argv), env=_environment(env), **kwargs)
    except OSError as error:
        raise _not_found(argv, error) from None

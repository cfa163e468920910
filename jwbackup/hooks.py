"""The admin's shell commands around a backup run: ``hooks: before/after/on_error``.

Each command runs as ``/bin/sh -c COMMAND`` (the admin wrote a shell command),
with stdin from /dev/null, stdout and stderr going to the log at INFO, one
record per line, never to jwbackup's stdout.  The commands see:

  JWBACKUP_DESTINATION  the destination directory (``[user@]host:directory`` when remote)
  JWBACKUP_GENERATION   the generation's name, once it is known (empty in ``before``)
  JWBACKUP_STATUS       ``success`` or ``warnings`` in ``after``, ``failed`` in ``on_error``
  JWBACKUP_ERROR        the error message, in ``on_error``

All hooks run under the run's lock.  ``before`` runs first (it may mount the
destination); the first one that fails stops the run before anything is
written.  ``after`` runs once the generation is committed, with the run
successful or with warnings; a failing ``after`` hook makes the run end with
warnings.  ``on_error`` runs when the run fails after the lock was taken, a
failing ``before`` hook included; its own failures are logged only.  A dry run
runs no hooks.
"""

from __future__ import annotations

import logging
import subprocess
from typing import Sequence

from jwbackup import execute
from jwbackup.config import Destination, Hooks
from jwbackup.errors import EX_OK, EX_WARNINGS, JwbackupError, Terminated

logger = logging.getLogger(__name__)

SHELL = "/bin/sh"


class HookError(JwbackupError):
    """A hook command failed."""


def describe(destination: Destination) -> str:
    """The destination as the hooks see it in JWBACKUP_DESTINATION."""
    if not destination.remote:
        return destination.directory
    user = f"{destination.user}@" if destination.user else ""
    return f"{user}{destination.host}:{destination.directory}"


def _short(command: str) -> str:
    text = " ".join(command.split())
    return text if len(text) <= 60 else text[:57] + "..."


def run_command(kind: str, command: str, env: dict[str, str]) -> None:
    """Run one hook command; its output goes to the log.  Raises HookError on failure."""
    logger.info("%s hook: %s", kind, _short(command))
    proc = execute.popen(
        [SHELL, "-c", command], env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    last = None
    with proc.stdout:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "backslashreplace").rstrip("\r\n")
            logger.info("%s hook: | %s", kind, line)
            if line.strip():
                last = line.strip()
    returncode = proc.wait()
    if returncode == 0:
        return
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
    raise HookError(f"{kind} hook {_short(command)!r} {how}" + (f": {last}" if last else ""))


class Runner:
    """Runs the hooks of one backup run; a context manager around the locked part.

    Entering runs the ``before`` hooks; leaving with an exception, Ctrl-C or
    SIGTERM runs the ``on_error`` hooks (the exception travels on); :meth:`after` runs the
    ``after`` hooks.  Set :attr:`generation` as soon as the name is known.
    """

    def __init__(self, hooks: Hooks, destination: str, enabled: bool = True):
        self.hooks = hooks
        self.destination = destination
        self.enabled = enabled
        self.generation = ""
        if not enabled and hooks != Hooks():
            logger.info("dry run: hooks are not run")

    def env(self, status: str = "", error: str = "") -> dict[str, str]:
        return {
            "JWBACKUP_DESTINATION": self.destination,
            "JWBACKUP_GENERATION": self.generation,
            "JWBACKUP_STATUS": status,
            "JWBACKUP_ERROR": error,
        }

    def __enter__(self) -> "Runner":
        if self.enabled:
            try:
                for command in self.hooks.before:
                    run_command("before", command, self.env())
            except JwbackupError as exc:
                self.on_error(exc)
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, (Exception, KeyboardInterrupt, Terminated)):
            self.on_error(exc)
        return False

    def after(self, generation: str, status: int) -> int:
        """Run the ``after`` hooks; returns the run's status (warnings if one failed)."""
        self.generation = generation
        if not self.enabled:
            return status
        env = self.env("success" if status == EX_OK else "warnings")
        if not _run_all("after", self.hooks.after, env):
            return EX_WARNINGS
        return status

    def on_error(self, exc: BaseException) -> None:
        if not self.enabled or not self.hooks.on_error:
            return
        if isinstance(exc, (JwbackupError, Terminated)):
            message = str(exc)
        elif isinstance(exc, KeyboardInterrupt):
            message = "interrupted (SIGINT)"
        else:
            message = f"internal error: {type(exc).__name__}: {exc}"
        _run_all("on_error", self.hooks.on_error, self.env("failed", message))


def _run_all(kind: str, commands: Sequence[str], env: dict[str, str]) -> bool:
    """Run every command even when one fails; False if any failed."""
    ok = True
    for command in commands:
        try:
            run_command(kind, command, env)
        except JwbackupError as exc:
            logger.warning("%s", exc)
            ok = False
    return ok

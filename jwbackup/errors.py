"""The exceptions jwbackup raises, and the exit code each one maps to.

Only ``cli.py`` turns them into a message and an exit status; the rest of the
code raises and lets them travel.  The codes borrow from sysexits(3).
"""

import signal

EX_OK = 0
EX_WARNINGS = 1  # the generation was written, but some files or directories could not be read
EX_FAILURE = 2  # the run failed; nothing was committed
EX_USAGE = 64
EX_DATAERR = 65
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78


class JwbackupError(Exception):
    """Base of every error jwbackup reports as one line to the user."""

    exit_code = EX_FAILURE


class UsageError(JwbackupError):
    exit_code = EX_USAGE


class ConfigError(JwbackupError):
    """A configuration file that cannot be used; the message names file, line and key."""

    exit_code = EX_CONFIG


class ManifestError(JwbackupError):
    """A package database that cannot be read safely."""

    exit_code = EX_DATAERR


class DestinationError(JwbackupError):
    """The destination cannot be reached or written."""

    exit_code = EX_TEMPFAIL


class LockedError(JwbackupError):
    """Another jwbackup run holds the lock."""

    exit_code = EX_TEMPFAIL


class OutputError(JwbackupError):
    """The output (``-o FILE``, or stdout) cannot be written; an existing file is left as it was."""

    exit_code = EX_CANTCREAT


class TransferError(JwbackupError):
    """rsync failed; the in-progress generation was kept, nothing was committed."""

    exit_code = EX_IOERR


class Terminated(BaseException):
    """SIGTERM (``systemctl stop``, shutdown): unwinds like Ctrl-C, so that the
    lock is released and the ``on_error`` hooks run (they may unmount a disk).
    A BaseException, as KeyboardInterrupt is: no ``except Exception`` stops it."""

    exit_code = 128 + signal.SIGTERM


def raise_terminated(signum, frame) -> None:
    raise Terminated("terminated (SIGTERM)")

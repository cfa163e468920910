"""The ``jwbackup`` command: arguments, logging, and errors turned into exit codes.

Exit codes (also in jwbackup(8)):

  0   success
  1   the backup was written, with warnings (files or directories that could not be read)
  2   the run failed; earlier generations are untouched
  64  usage error
  65  a package database that cannot be read safely
  70  internal error (a bug: please report it with the -L DEBUG output)
  73  the output (-o FILE, or stdout) cannot be written; an existing FILE is left as it was
  74  rsync failed: a backup keeps the in-progress generation for the next run; a restore is incomplete
  75  temporary failure: another run holds the lock, or the destination is unreachable
  78  configuration error
  130 interrupted (Ctrl-C): a backup keeps the in-progress generation, its on_error hooks have run
  143 stopped by SIGTERM (systemctl stop, shutdown): as for 130
"""

from __future__ import annotations

import argparse
import grp
import logging
import logging.handlers
import os
import signal
import sys

from jwbackup import __version__, config, errors, pkgstate
from jwbackup.excludes import FORMATS as EXCLUDE_FORMATS

logger = logging.getLogger("jwbackup")

DEFAULT_LOG_FILE = "/var/log/jwbackup.log"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(errors.EX_USAGE, f"{self.prog}: error: {message}\n")


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before and after the subcommand.

    After a subcommand their default is SUPPRESS, so that ``jwbackup -c F files``
    keeps the ``-c`` given before it.
    """

    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "-c", "--config", metavar="FILE", default=default(config.DEFAULT_PATH),
        help=f"configuration file (default: {config.DEFAULT_PATH})",
    )
    parser.add_argument(
        "-L", "--log-level", metavar="LEVEL", type=str.upper, choices=LOG_LEVELS,
        default=default("INFO"), help="DEBUG, INFO, WARNING or ERROR (default: INFO)",
    )
    parser.add_argument(
        "-l", "--log-file", metavar="FILE", default=default(DEFAULT_LOG_FILE),
        help=f"log file (default: {DEFAULT_LOG_FILE}); '-' for none",
    )
    # Made absolute at once: the linker moves the working directory.
    parser.add_argument(
        "--root", metavar="DIR", default=default("/"), type=os.path.abspath,
        help="the system to back up lives under DIR (a chroot, a mounted disk); default: /",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="jwbackup",
        description="Daily differential backup that leaves out what the package manager can reinstall. "
        "Without a command, run the backup.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"jwbackup {__version__}")
    _common_options(parser, suppress=False)
    parser.add_argument("-n", "--dry-run", action="store_true", help="show what a backup would copy and remove; write nothing")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name, help):
        sub = commands.add_parser(name, help=help, description=help)
        _common_options(sub, suppress=True)
        return sub

    backup = command("backup", "run the backup (the default command)")
    backup.add_argument("-n", "--dry-run", action="store_true", default=argparse.SUPPRESS,
                        help="show what would be copied and removed; write nothing")

    command("init", "create the destination directory (mode 0700)")

    listing = command("list", "list the generations, newest first")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    prune = command("prune", "remove expired generations (retention) without backing up")
    prune.add_argument("-n", "--dry-run", action="store_true", default=argparse.SUPPRESS,
                       help="show what would be removed; remove nothing")

    def package_state_option(parser):
        parser.add_argument(
            "--no-package-state", dest="write_state", action="store_false",
            help=f"do not write the package state ({pkgstate.STATE_DIR}, what to reinstall) into the system first",
        )

    files = command("files", "print the paths a backup holds (unowned and modified files)")
    package_state_option(files)
    files.add_argument("-0", "--null", action="store_true", help="end each path with NUL, not newline")
    files.add_argument(
        "--no-dirs", action="store_true",
        help="leave out directories that hold anything (for tools that recurse into listed directories, like restic)",
    )

    excludes = command("excludes", "print exclude rules for the installed, unmodified files, swap files and pruned directories")
    excludes.add_argument("--format", "-f", choices=sorted(EXCLUDE_FORMATS), default="plain", help="rule syntax (default: plain)")
    excludes.add_argument("-o", "--output", metavar="FILE", help="write to FILE atomically instead of stdout")
    excludes.add_argument("-0", "--null", action="store_true", help="end each rule with NUL (rsync --from0, plain)")
    package_state_option(excludes)

    restore = command("restore", "copy files back from a generation, or print the package reinstall plan")
    restore.epilog = (
        "PATHs are named as the system sees them (/etc/ssh, /home/alice/notes.txt); relative ones start from "
        "the current directory; a symlink above one in the generation (/bin -> usr/bin) is followed within the "
        "generation, never out of it.  They come back with their modes, owners, ACLs, xattrs and times, to where they "
        "were (under --root) or under --target DIR.  Nothing at the target is deleted without --delete.  "
        "With --packages: print the commands that reinstall the packages the generation recorded."
    )
    restore.add_argument("paths", nargs="*", metavar="PATH", help="a file or directory to restore")
    restore.add_argument("-g", "--generation", metavar="NAME",
                         help="the generation to restore from (default: the one 'latest' names, the last run's; see 'jwbackup list')")
    restore.add_argument("-t", "--target", metavar="DIR", help="restore under DIR instead of the original place")
    restore.add_argument("-n", "--dry-run", action="store_true", default=argparse.SUPPRESS,
                         help="show what would be copied (rsync's itemized list); change nothing")
    restore.add_argument("--delete", action="store_true",
                         help="delete what a backup made now would hold in the restored directories and the generation "
                              "does not (created since); installed files, pruned, .no-backup and cache-tagged directories "
                              "and the destination are kept")
    restore.add_argument("--packages", action="store_true", help="print the package reinstall plan (apt-get or emerge commands)")
    restore.add_argument("--from", dest="state_from", metavar="DIR",
                         help=f"with --packages: read the package state from DIR ({pkgstate.STATE_DIR} as another tool "
                              "restored it, or the root it was restored under) instead of a generation")
    restore.add_argument("--exact-versions", action="store_true",
                         help="with --packages on dpkg systems: pin each package to the version the generation recorded")

    diff = command("diff", "list paths added (+), removed (-) or changed (M) between two generations, "
                           "or from a generation to the system now")
    diff.add_argument("generations", nargs="+", metavar="GENERATION",
                      help="the older generation, then the newer one; without it, the system now ('latest': the last run's)")
    diff.add_argument("-0", "--null", action="store_true", help="end each line with NUL, not newline")

    cfg = command("config", "configuration commands")
    cfg_commands = cfg.add_subparsers(dest="config_command", metavar="ACTION", parser_class=Parser, required=True)
    check = cfg_commands.add_parser("check", help="validate the configuration and print the effective values")
    _common_options(check, suppress=True)
    return parser


LOG_GROUP = "adm"  # Debian's and Gentoo's group for reading system logs


def _interactive() -> bool:
    return sys.stderr.isatty() or "JOURNAL_STREAM" in os.environ


class _LogFile(logging.handlers.WatchedFileHandler):
    """The log, reopened when logrotate moves it.  It names the files of every
    user: created root:adm 0640 as logrotate creates it, whatever the umask
    (cron's is 022, the service's 077); an existing log keeps its mode."""

    def _open(self):
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors, opener=_open_log)


def _open_log(path: str, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_EXCL, 0o640)
    except FileExistsError:
        return os.open(path, flags)
    os.fchmod(fd, 0o640)
    try:
        os.fchown(fd, -1, grp.getgrnam(LOG_GROUP).gr_gid)
    except (KeyError, OSError):  # no such group, or not ours to give
        pass
    return fd


def setup_logging(level: str, log_file: str) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("jwbackup: %(message)s"))
    root.addHandler(stderr)
    if log_file == "-":
        stderr.setLevel(level)
        return
    stderr.setLevel(level if _interactive() else logging.WARNING)
    try:
        handler = _LogFile(log_file, encoding="utf-8", errors="backslashreplace")
    except OSError as exc:
        logger.warning("cannot write the log file %s (%s); logging to stderr only", log_file, exc.strerror)
        stderr.setLevel(level)
        return
    handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    previous = signal.signal(signal.SIGTERM, errors.raise_terminated)
    try:
        return run(args)
    except errors.JwbackupError as exc:
        logger.debug("error details", exc_info=True)
        logger.error("error: %s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        logger.error("error: interrupted")
        return 130
    except errors.Terminated as exc:
        logger.error("error: %s", exc)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (jwbackup files | head): not our failure.
        sys.stderr.close()
        return errors.EX_OK
    except Exception as exc:  # a bug: one line, the traceback only with -L DEBUG
        logger.debug("internal error", exc_info=True)
        logger.error("internal error: %s: %s (run with -L DEBUG for the traceback)", type(exc).__name__, exc)
        return errors.EX_SOFTWARE
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    from jwbackup import backup, generate, maintenance

    if args.command == "restore" and args.packages:
        if args.paths:
            raise errors.UsageError("restore --packages takes no paths")
        if args.state_from is not None:
            return _packages_from(args)  # a rescue system may have no configuration at all
    cfg = config.load(args.config)
    if args.command in (None, "backup"):
        return backup.run(cfg, args.root, dry_run=args.dry_run).status
    if args.command == "init":
        return maintenance.init(cfg)
    if args.command == "list":
        return maintenance.list_generations(cfg, as_json=args.json)
    if args.command == "prune":
        return maintenance.prune(cfg, dry_run=args.dry_run)
    if args.command == "files":
        return generate.files(cfg, args.root, null=args.null, no_dirs=args.no_dirs, write_state=args.write_state)
    if args.command == "excludes":
        return generate.excludes(cfg, args.root, fmt=args.format, output=args.output, null=args.null,
                                 write_state=args.write_state)
    if args.command == "restore":
        from jwbackup import restore

        if args.packages:
            return restore.restore_packages(cfg, args.generation, exact_versions=args.exact_versions)
        return restore.restore_paths(cfg, args.root, args.paths, args.generation, target=args.target,
                                     dry_run=args.dry_run, delete=args.delete)
    if args.command == "diff":
        from jwbackup import restore

        return restore.diff(cfg, args.root, args.generations, null=args.null)
    if args.command == "config":
        sys.stdout.write(config.dump(cfg))
        if cfg.destination is None:  # valid for the generators, but every backup would fail
            logger.warning("%s has no destination section: files and excludes can run, "
                           "backup, list, prune, restore and diff cannot", cfg.path)
            return errors.EX_WARNINGS
        return errors.EX_OK
    raise errors.UsageError(f"unknown command {args.command!r}")


def _packages_from(args: argparse.Namespace) -> int:
    from jwbackup import restore

    if args.generation is not None:
        raise errors.UsageError("restore --packages reads --from DIR or a generation (-g), not both")
    return restore.packages_from(args.state_from, exact_versions=args.exact_versions)


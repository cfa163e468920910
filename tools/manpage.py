#!/usr/bin/env python3
"""Write jwbackup(8) from the argument parser and the exit-code table in ``jwbackup/cli.py``.

    python3 tools/manpage.py > man/jwbackup.8      (or: make man)

Options and commands come from ``jwbackup.cli.build_parser()``; the exit codes
from the "Exit codes" block of ``jwbackup.cli``'s docstring.  The rest (the
configuration summary, FILES) is written here.  The output depends only on the
source tree, so the page in ``man/`` can be compared with a fresh one.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jwbackup import __version__, cli  # noqa: E402

COMMON = {"help", "config", "log_level", "log_file", "root"}


def roff(text: str) -> str:
    """Plain text as roff: backslashes, hyphens and leading control characters escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{roff(text)}\\fR"


def exit_codes() -> list[tuple[str, str]]:
    """(code, meaning) pairs from the "Exit codes" block of the cli docstring."""
    doc = cli.__doc__ or ""
    block = doc.split("Exit codes", 1)[1] if "Exit codes" in doc else ""
    return re.findall(r"^\s+(\d+)\s+(\S.*)$", block, re.M)


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in definition order."""
    result = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                result.append((name, helps.get(name) or "", sub))
    return result


def option_item(action: argparse.Action) -> str:
    names = ", ".join(bold(s) for s in action.option_strings)
    if action.nargs != 0:
        metavar = action.metavar or action.dest.upper()
        names += " " + italic(metavar)
    text = action.help or ""
    if action.choices and not all(str(c) in text for c in action.choices):
        text += "; one of: " + ", ".join(map(str, action.choices))
    if action.dest == "version":
        text = "print the version and exit"
    elif action.dest == "help":
        text = "print a short help and exit"
    return f".TP\n{names}\n{roff(text[:1].upper() + text[1:])}.\n"


def options(parser: argparse.ArgumentParser, skip: set[str]) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest not in skip]


def command_section(parser: argparse.ArgumentParser) -> str:
    out = [".SH COMMANDS\n", "Without a command, " + bold("jwbackup") + " runs the backup.\n"]
    for name, text, sub in subcommands(parser):
        nested = subcommands(sub)
        if nested:
            for action_name, action_text, action_parser in nested:
                out.append(f".TP\n{bold(name)} {bold(action_name)}\n{roff(action_text[:1].upper() + action_text[1:])}.\n")
                for action in options(action_parser, COMMON):
                    out.append(".RS\n" + option_item(action) + ".RE\n")
            continue
        out.append(f".TP\n{bold(name)}\n{roff(text[:1].upper() + text[1:])}.\n")
        own = options(sub, COMMON)
        if own:
            out.append(".RS\n")
            out.extend(option_item(a) for a in own)
            out.append(".RE\n")
    return "".join(out)


CONFIGURATION = r"""
.SH CONFIGURATION
The configuration file (default
.IR /etc/jwbackup.yaml )
is YAML; every key is optional except
.BR destination.directory .
.TP
.BR root " (or " roots )
Directories to back up: one absolute path or a list (default:
.IR / ).
.TP
.B prune
Directories never walked into; replaces the default list
(/tmp, /proc, /sys, /dev, /mnt, /var/tmp, /var/run, /var/cache, /run, /lost+found).
A directory listed under
.B root
is backed up all the same.
.TP
.B destination.directory
Where generations are written, one directory per run named after its start time
.RI ( YYYY\-MM\-DD\-HH:MM:SS ),
with a
.I latest
symlink to the newest.
.BI { NAME }
is replaced by the environment variable
.IR NAME ;
.B {HOSTNAME}
falls back to the host name.
.TP
.BR destination.host ", " user ", " port ", " key ", " known_hosts ", " accept_new_host_key ", " password
A remote destination reached with
.BR ssh (1);
without
.B host
the directory is local.
A
.B password
is handed to
.BR sshpass (1)
through the environment, and the file must then be readable by its owner only.
.TP
.B destination.timeout
Seconds without data from an ssh destination before the transfer gives up
(exit 75) and the connection is dropped (default: 300).
.TP
.B destination.generations
How many complete generations to keep (default: 30).
.TP
.BR destination.keep.daily ", " weekly ", " monthly ", " yearly
Also keep the newest generation of each of the last N days, weeks, months, years,
like
.BR "borg prune" ;
0 turns a rule off.
The newest generation is never removed, nor the one a run has just made,
even when the clock was set back behind the names of earlier ones (the run
warns of those).
.TP
.B manager
The package manager whose files are left out,
.B dpkg
or
.BR portage ;
detected by default.
.TP
.B verify
Which installed files are compared with their recorded checksums:
.B all
(default),
.BR conffiles ,
or
.BR none .
Checksums are cached in
.IR /var/lib/jwbackup/cache .
.TP
.B transfer
How generations are built:
.B auto
(default: a hard-link builder for a local destination; over ssh, a hard-linked
copy of the previous generation, with rsync for what changed since) or
.B rsync
(always
.BR "rsync \-\-link\-dest" ).
.TP
.BR hooks.before ", " after ", " on_error
Shell commands run before a backup, after a committed generation, and when a
run fails; they see
.BR JWBACKUP_DESTINATION ,
.BR JWBACKUP_GENERATION ,
.B JWBACKUP_STATUS
and
.BR JWBACKUP_ERROR .
.TP
.B lock_file
The lock that keeps runs from overlapping (default:
.IR /run/lock/jwbackup/jwbackup.lock ).
.PP
A directory holding a file named
.I .no\-backup
or a
.I CACHEDIR.TAG
with the standard signature is left out, as is the destination itself.
.B jwbackup config check
validates the file and prints the effective values.
"""

FILES = r"""
.SH FILES
.TP
.I /etc/jwbackup.yaml
The configuration.
.TP
.I /etc/default/jwbackup
.B JWBACKUP_OPTS
for the daily run (for example
.BR "\-c \fIFILE\fP" ).
.TP
.I /etc/cron.daily/jwbackup
The daily run on systems without systemd.
.TP
.IR jwbackup.timer ", " jwbackup.service
The daily run under systemd, with a randomized delay of up to an hour.
.TP
.I /var/lib/jwbackup
State: under
.I cache
the checksum cache and the manifest kept while the package database is
unchanged (both can be deleted at any time; the next run rebuilds them),
and the package lists recorded before each run.
.TP
.I /var/log/jwbackup.log
The log; rotated by
.BR logrotate (8).
.TP
.I /var/backups/jwbackup/HOSTNAME
The default destination.
.TP
.I /run/lock/jwbackup/jwbackup.lock
The default lock file.
"""


def page() -> str:
    parser = cli.build_parser()
    out = [
        f'.TH JWBACKUP 8 "" "jwbackup {__version__}" "System Administration"\n',
        ".SH NAME\n",
        "jwbackup \\- daily backup that leaves out what the package manager can reinstall\n",
        ".SH SYNOPSIS\n",
        ".B jwbackup\n",
        ".RI [ OPTIONS ]\n",
        ".RI [ COMMAND \" \" [ OPTIONS ]]\n",
        ".SH DESCRIPTION\n",
        bold("jwbackup") + " makes a differential backup with\n.BR rsync (1)\n",
        ".BR \\-\\-link\\-dest :\n"
        "each run writes a new generation, a plain directory tree in which files\n"
        "unchanged since the previous generation are hard links to it.\n"
        "Files that the package manager (dpkg or portage) installed and that still match\n"
        "their recorded checksums are left out, since they can be reinstalled;\n"
        "everything else is kept: configuration changes, /home, /root, /var/lib, /usr/local,\n"
        "and package files modified after installation.\n",
        ".PP\n",
        "A generation becomes visible only after rsync has finished; an interrupted run leaves\n"
        "a\n.I .partial\ndirectory that the next run continues.  Expired generations are removed\n"
        "after a successful run.\n",
        ".SH OPTIONS\n",
        "These options are accepted before and after the command.\n",
    ]
    out.extend(option_item(a) for a in options(parser, set()))
    out.append(command_section(parser))
    out.append(CONFIGURATION.lstrip("\n"))
    out.append(".SH EXIT STATUS\n")
    for code, meaning in exit_codes():
        out.append(f".TP\n.B {code}\n{roff(meaning)}.\n")
    out.append(FILES.lstrip("\n"))
    out.append(
        ".SH SEE ALSO\n"
        ".BR rsync (1),\n.BR ssh (1),\n.BR sshpass (1),\n.BR borgmatic (1),\n"
        ".BR systemd.timer (5),\n.BR cron (8)\n"
    )
    return "".join(out)


def main() -> int:
    sys.stdout.write(page())
    return 0


if __name__ == "__main__":
    sys.exit(main())

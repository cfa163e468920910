"""Hold jwbackup's lock from another process, as a running backup would."""

from __future__ import annotations

import contextlib
import subprocess
import sys


@contextlib.contextmanager
def held_lock(path):
    code = (
        "import sys, time\n"
        "from jwbackup.lock import Lock\n"
        "with Lock(sys.argv[1]):\n"
        "    print('locked', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"locked\n"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)

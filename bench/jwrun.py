"""Run ``jwbackup`` (``jwbackup.cli.main``, what the console script calls) and
record the Python process's own resource use.

    python bench/jwrun.py RESULT.json [jwbackup arguments...]

RESULT.json gets the Python process's user/sys CPU and peak RSS
(``RUSAGE_SELF``) and those of the processes it waited for (rsync, ssh,
mv ...: ``RUSAGE_CHILDREN``), so the benchmark can split jwbackup's own cost
from rsync's.  The exit status is jwbackup's.
"""

import json
import resource
import sys
import time

started = time.time()
from jwbackup.cli import main  # noqa: E402

imported = time.time()
status = main(sys.argv[2:])
me = resource.getrusage(resource.RUSAGE_SELF)
children = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({
        "start": started, "imported": imported, "end": time.time(), "status": status,
        "python_user": me.ru_utime, "python_sys": me.ru_stime, "python_maxrss_kib": me.ru_maxrss,
        "children_user": children.ru_utime, "children_sys": children.ru_stime,
        "children_maxrss_kib": children.ru_maxrss,
    }, f)
sys.exit(status)

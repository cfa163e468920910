"""The linker's helper process (see :class:`jwbackup.transfer.linker._Helper`).

Started as ``python -I -m jwbackup.transfer.helper ...`` by the linker, never by hand.
"""

import sys

from jwbackup.transfer.linker import serve

if __name__ == "__main__":
    serve(sys.argv[1:])

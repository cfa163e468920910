import sys

from jwbackup.cli import main

sys.exit(main())

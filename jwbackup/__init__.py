"""jwbackup: a daily differential backup that leaves out what the package manager can reinstall."""

__version__ = "0.1.0"

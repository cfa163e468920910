import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(
    r'^__version__ = "([^"]+)"', Path("jwbackup/__init__.py").read_text(), re.M
).group(1)

setup(
    name="jwbackup",
    version=version,
    description="Daily differential backup that leaves out what the package manager can reinstall",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    python_requires=">=3.9",
    packages=find_packages(include=["jwbackup", "jwbackup.*"]),
    install_requires=["PyYAML", "python-debian"],
    extras_require={
        "portage": ["portage"],
        "test": ["pytest", "portage"],
    },
    entry_points={
        "console_scripts": ["jwbackup = jwbackup.cli:main"],
        "jwbackup.managers": [
            "dpkg = jwbackup.managers.dpkg:Dpkg",
            "portage = jwbackup.managers.portage:Portage",
        ],
    },
    classifiers=[
        "Environment :: Console",
        "Intended Audience :: System Administrators",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Archiving :: Backup",
    ],
)

"""A real OpenSSH server on 127.0.0.1 for the tests.

``SshServer(directory).start()`` generates a host key and a client key in
``directory``, writes an sshd config and runs ``/usr/sbin/sshd -D -e`` on a
free port until ``stop()``.  The client key is the only authorized key (for
every user); ``known_hosts`` is pre-filled with the host key.  The server's
log (``-e``) goes to ``sshd.log`` in the same directory.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str = "jwbackup-test") -> Path:
    """A new passphrase-less ed25519 key at ``path`` (and ``path.pub``)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path


def short_private_dir(prefix: str = "jwb-") -> str:
    """A fresh 0700 directory with a short path (ssh control sockets need one)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class SshServer:
    """One sshd on 127.0.0.1; see the module docstring."""

    host = "127.0.0.1"

    def __init__(self, directory: Path, *, password_authentication: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.user = getpass.getuser()
        self.port = free_port()
        self.host_key = keygen(self.directory / "ssh_host_ed25519_key", "host")
        self.key = str(keygen(self.directory / "client_key"))
        self.known_hosts = str(self.directory / "known_hosts")
        host_pub = (self.directory / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        Path(self.known_hosts).write_text(f"[{self.host}]:{self.port} {' '.join(host_pub)}\n")
        self.config = self.directory / "sshd_config"
        self.config.write_text(
            f"ListenAddress {self.host}:{self.port}\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.key}.pub\n"
            "PermitRootLogin yes\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PidFile none\n"
            f"PasswordAuthentication {'yes' if password_authentication else 'no'}\n"
            "KbdInteractiveAuthentication no\n"
            "PermitEmptyPasswords no\n"
            "MaxStartups 100\n"
            "MaxSessions 100\n"
            "LogLevel INFO\n"
        )
        self.log_path = self.directory / "sshd.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> "SshServer":
        """Start sshd and wait until it accepts connections."""
        if self.process is not None:
            return self
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"sshd exited at start: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(4).startswith(b"SSH-"):
                        return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"sshd did not listen on port {self.port}")
                time.sleep(0.05)

    def stop(self) -> None:
        """Kill sshd and every session it serves (clients see the connection drop)."""
        if self.process is None:
            return
        pids = [self.process.pid, *_descendants(self.process.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.process = None

    def restart(self) -> "SshServer":
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def accepted_logins(self) -> int:
        """How many logins sshd accepted so far (one per ssh connection)."""
        return self.log().count("Accepted ")

    def destination(self, directory: str, **overrides):
        """A ``Destination`` for ``directory`` on this server, logging in with the client key."""
        from jwbackup.config import Destination

        fields = dict(directory=str(directory), host=self.host, port=self.port, user=self.user,
                      key=self.key, known_hosts=self.known_hosts)
        fields.update(overrides)
        return Destination(**fields)

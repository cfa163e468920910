"""A slow link and a stalled link between jwbackup and a real sshd.

``Link`` is a TCP proxy on 127.0.0.1 put between ssh and the test sshd (the
destination's ``port`` points at it).  It can throttle each direction and
delay every chunk, and it can stall: stop forwarding both ways while every
TCP connection stays open, as a dead route or a hung NAT box does.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from backupenv import System
from faultkit import (
    assert_untouched, backup, complete_generations, snapshot, start_during_a_big_transfer,
)

CHUNK = 64 << 10


class Link:
    """A TCP proxy from a free port on 127.0.0.1 to ``upstream``; see the module docstring.

    ``rate`` is bytes per second in each direction of each connection (None:
    unlimited), ``latency`` the seconds every chunk is held back.
    """

    host = "127.0.0.1"

    def __init__(self, upstream: tuple[str, int], *, rate: float | None = None, latency: float = 0.0):
        self.upstream = upstream
        self.rate = rate
        self.latency = latency
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.connections = 0
        self.forwarded = 0  # bytes sent on from the clients to ``upstream``
        self.listener = socket.create_server((self.host, 0))
        self.port = self.listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, name="link-accept", daemon=True)]
        self._threads[0].start()

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close every connection made so far (new ones are still accepted)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        """Stop forwarding and end every thread: none is left behind for the
        tests that run after."""
        self._closed.set()
        self._flowing.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        except OSError:
            pass
        self.listener.close()
        self.cut()
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
                self.connections += 1
            for src, dst, upward in ((client, server, True), (server, client, False)):
                pump = threading.Thread(target=self._pump, args=(src, dst, upward), name="link-pump", daemon=True)
                self._threads.append(pump)
                pump.start()

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        next_send = time.monotonic()
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                # a stalled link holds this chunk and reads nothing more, so
                # the sender's buffers fill up and its writes block
                while not self._flowing.wait(0.05):
                    pass
                if self._closed.is_set():
                    return
                if self.latency:
                    time.sleep(self.latency)
                if self.rate:
                    next_send = max(next_send, time.monotonic()) + len(data) / self.rate
                    time.sleep(max(0.0, next_send - time.monotonic()))
                dst.sendall(data)
                if upward:
                    with self._lock:
                        self.forwarded += len(data)
        except OSError:
            pass


@pytest.fixture
def system(tmp_path):
    return System(tmp_path)


def _via(link: Link, sshd, tmp_path, extra: str = "") -> str:
    """Destination keys for the test sshd reached through ``link``."""
    known = tmp_path / "known_hosts"
    host_key = open(f"{sshd.host_key}.pub").read().split()[:2]
    known.write_text(f"[{link.host}]:{link.port} {' '.join(host_key)}\n")
    return (f"  host: {link.host}\n  port: {link.port}\n  user: {sshd.user}\n  key: {sshd.key}\n"
            f"  known_hosts: {known}\n{extra}")


def _read(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_backup_over_a_slow_link_completes_with_the_right_files(jwbackup, system, sshd, tmp_path):
    with Link((sshd.host, sshd.port), rate=256 << 10, latency=0.03) as link:
        system.configure(destination=_via(link, sshd, tmp_path))
        backup(jwbackup, system)
        (first,) = complete_generations(system.dest)
        before = snapshot(system.dest)
        system.write(b"/home/alice/notes.txt", b"buy bread\n")
        data = system.write(b"/srv/data.bin", os.urandom(256 << 10))
        sent = link.forwarded
        backup(jwbackup, system)
    assert link.forwarded - sent > 256 << 10  # the new file crossed the slow link
    older, second = complete_generations(system.dest)
    assert older == first and os.readlink(system.dest / "latest") == second
    assert_untouched(before, system.dest)
    assert _read(system.in_generation(second, b"/srv/data.bin")) == _read(data)
    assert _read(system.in_generation(second, b"/home/alice/notes.txt")) == b"buy bread\n"
    for path in (b"/etc/hostname", b"/root/.profile", b"/var/lib/app/state.db", b"/usr/local/bin/script"):
        assert _read(system.in_generation(second, path)) == _read(system.path(path)), path
        assert os.lstat(system.in_generation(second, path)).st_ino == os.lstat(system.in_generation(first, path)).st_ino
    for path in (b"/usr/bin/tool", b"/usr/share/doc/tool/README", b"/etc/tool.conf"):
        assert not os.path.lexists(system.in_generation(second, path)), path


def test_stalled_link_gives_up_in_bounded_time_and_the_next_run_succeeds(jwbackup, system, sshd, tmp_path):
    with Link((sshd.host, sshd.port), rate=1 << 20) as link:
        system.configure(destination=_via(link, sshd, tmp_path, "  timeout: 3\n"))
        first, before, proc = start_during_a_big_transfer(jwbackup, system, tmp_path / "run.log", 32 << 20, 30)
        try:
            link.stall()
            stalled = time.monotonic()
            _, err = proc.communicate(timeout=60)
            waited = time.monotonic() - stalled
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lines = err.decode().strip().splitlines()
        assert proc.returncode == 75, lines
        assert lines == [f"jwbackup: error: {sshd.user}@{link.host}: no data for 3 s, link stalled or down"]
        assert waited < 20, f"gave up only after {waited:.0f} s"
        assert complete_generations(system.dest) == [first]
        assert os.readlink(system.dest / "latest") == first
        assert_untouched(before, system.dest)

        link.cut()
        link.resume()
        os.unlink(system.path(b"/srv/zz-big"))
        backup(jwbackup, system)
    assert len(complete_generations(system.dest)) == 2 and system.partials() == []
    assert_untouched(before, system.dest)

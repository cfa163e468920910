"""Running commands locally and at an ssh destination, against a real sshd."""

from __future__ import annotations

import logging
import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sshd import free_port, keygen, short_private_dir

from jwbackup import execute, transport
from jwbackup.errors import DestinationError, JwbackupError
from jwbackup.execute import CommandError, CommandNotFoundError
from jwbackup.transport import Local, Ssh


@pytest.fixture
def runtime_dir():
    path = short_private_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ssh(sshd, tmp_path, runtime_dir):
    with Ssh(sshd.destination(str(tmp_path)), runtime_dir=runtime_dir) as t:
        yield t


def one_line(error: Exception) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


# --- execute ---------------------------------------------------------------


def test_missing_program_is_one_line_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CommandNotFoundError) as raised:
        execute.run(["rsync", "--version"])
    assert one_line(raised.value) == "rsync: command not found; install the rsync package"
    with pytest.raises(JwbackupError, match=r"^ssh: command not found; install the openssh-client package$"):
        execute.popen(["ssh", "-V"])


def test_failure_message_is_the_last_meaningful_stderr_line():
    with pytest.raises(CommandError) as raised:
        execute.run(["sh", "-c", 'echo first >&2; echo "the real reason" >&2; echo >&2; exit 3', "sh"])
    error = raised.value
    assert one_line(error) == "sh: the real reason"
    assert error.returncode == 3
    assert error.argv[0] == "sh"
    assert error.stderr == b"first\nthe real reason\n\n"


def test_failure_without_stderr_names_the_status_and_check_false_returns_it():
    with pytest.raises(CommandError, match=r"^false exited with status 1$"):
        execute.run(["false"])
    assert execute.run(["false"], check=False).returncode == 1


def test_run_returns_bytes_and_feeds_input():
    result = execute.run(["cat"], input=b"\xff\n")
    assert result.stdout == b"\xff\n"
    assert execute.run([b"printf", b"%s", b"\xfe"]).stdout == b"\xfe"


def test_logged_command_is_quoted_and_masks_secrets(caplog):
    caplog.set_level(logging.DEBUG, logger="jwbackup.execute")
    execute.run(["echo", "a b", "token=hunter2"], secrets=["hunter2"])
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "echo 'a b' 'token=***'" in logged
    assert "hunter2" not in logged


def test_env_is_added_to_the_inherited_environment(monkeypatch):
    monkeypatch.setenv("JWB_INHERITED", "yes")
    out = execute.run(["sh", "-c", 'echo "$JWB_INHERITED $JWB_ADDED"'], env={"JWB_ADDED": "too"}).stdout
    assert out == b"yes too\n"


# --- local -----------------------------------------------------------------


def test_local_transport_runs_here_and_targets_plain_paths(tmp_path):
    with transport.connect(_local_destination(tmp_path)) as local:
        assert isinstance(local, Local)
        assert local.run(["pwd"]).returncode == 0
        assert local.rsync_target("/srv/back up") == "/srv/back up"
        assert local.rsync_target("relative:path") == "./relative:path"
        assert local.rsync_args() == [] and local.env() == {}


def _local_destination(directory):
    from jwbackup.config import Destination

    return Destination(directory=str(directory))


# --- ssh: running commands -------------------------------------------------


def test_remote_command_output_comes_back(ssh):
    assert ssh.run(["echo", "hello"]).stdout == b"hello\n"
    assert ssh.run(["cat"], input=b"through stdin\n").stdout == b"through stdin\n"


def test_remote_arguments_arrive_verbatim_and_execute_nothing(ssh, tmp_path):
    marker = tmp_path / "pwned"
    args = [
        "two words",
        "it's \"quoted\"",
        f"; touch {marker}",
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"| touch {marker} &",
        "line\nbreak",
        "-n",
        "--help",
        "*",
        "~root",
        "$HOME",
        "",
        b"\xffnot-utf8",
    ]
    out = ssh.run(["printf", "%s\\0", *args]).stdout
    assert out.split(b"\0")[:-1] == [os.fsencode(a) for a in args]
    assert not marker.exists()


def test_failing_remote_command_names_the_destination(ssh, sshd):
    with pytest.raises(CommandError) as raised:
        ssh.run(["ls", "/nonexistent dir"])
    message = one_line(raised.value)
    assert message.startswith(f"{sshd.user}@127.0.0.1:{sshd.port}: ls: ")
    assert "No such file or directory" in message
    assert raised.value.returncode == 2
    assert ssh.run(["sh", "-c", "exit 7"], check=False).returncode == 7


def test_commands_and_rsync_share_one_master_connection(sshd, tmp_path, runtime_dir):
    source = tmp_path / "file"
    source.write_bytes(b"x")
    before = sshd.accepted_logins()
    with Ssh(sshd.destination(str(tmp_path)), runtime_dir=runtime_dir) as ssh:
        for _ in range(3):
            ssh.run(["true"])
        subprocess.run(["rsync", *ssh.rsync_args(), str(source), ssh.rsync_target(str(tmp_path / "copy"))],
                       check=True, capture_output=True, env={**os.environ, **ssh.env()})
        assert ssh.master_running()
        assert sshd.accepted_logins() == before + 1
    assert not ssh.master_running()
    assert (tmp_path / "copy").read_bytes() == b"x"


def test_control_socket_lives_in_a_private_directory(ssh, runtime_dir):
    ssh.run(["true"])
    assert os.stat(runtime_dir).st_mode & 0o777 == 0o700
    assert [name for name in os.listdir(runtime_dir) if name.startswith("cm-")]


def test_runtime_dir_is_made_private_and_never_followed_through_a_symlink(tmp_path, runtime_dir, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime_dir)
    made = transport.private_runtime_dir()
    assert made == os.path.join(runtime_dir, "jwbackup") and os.stat(made).st_mode & 0o777 == 0o700
    loose = Path(runtime_dir, "loose")
    loose.mkdir()
    loose.chmod(0o777)
    assert os.stat(transport.private_runtime_dir(str(loose))).st_mode & 0o777 == 0o700
    Path(runtime_dir, "link").symlink_to(loose)
    with pytest.raises(DestinationError, match="not a directory owned by this user"):
        transport.private_runtime_dir(os.path.join(runtime_dir, "link"))
    with pytest.raises(DestinationError, match="path too long for an ssh control socket"):
        transport.private_runtime_dir(str(tmp_path / ("x" * 60)))
    assert not (tmp_path / ("x" * 60)).exists()


# --- ssh: errors -----------------------------------------------------------


def test_wrong_port_is_connection_refused(sshd, tmp_path, runtime_dir):
    port = free_port()
    with Ssh(sshd.destination(str(tmp_path), port=port, user=None), runtime_dir=runtime_dir) as ssh:
        with pytest.raises(DestinationError) as raised:
            ssh.run(["true"])
    assert one_line(raised.value) == f"127.0.0.1:{port}: connection refused"


def test_unknown_host_key_is_refused(sshd, tmp_path, runtime_dir):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with Ssh(sshd.destination(str(tmp_path), known_hosts=str(empty)), runtime_dir=runtime_dir) as ssh:
        with pytest.raises(DestinationError) as raised:
            ssh.run(["true"])
    assert one_line(raised.value) == (
        f"{sshd.user}@127.0.0.1:{sshd.port}: host key verification failed (unknown or changed host key; "
        "check known_hosts or set destination.accept_new_host_key)"
    )
    assert empty.read_text() == ""


def test_accept_new_host_key_connects_and_records_the_key(sshd, tmp_path):
    known = tmp_path / "known hosts"
    known.write_text("")
    first, second = short_private_dir(), short_private_dir()
    try:
        with Ssh(sshd.destination(str(tmp_path), known_hosts=str(known), accept_new_host_key=True),
                 runtime_dir=first) as ssh:
            assert ssh.run(["echo", "ok"]).stdout == b"ok\n"
        host_key = (sshd.directory / "ssh_host_ed25519_key.pub").read_text().split()[1]
        recorded = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f", str(known)],
                                  capture_output=True, check=True).stdout.decode()
        assert host_key in recorded
        with Ssh(sshd.destination(str(tmp_path), known_hosts=str(known)), runtime_dir=second) as ssh:
            assert ssh.run(["echo", "again"]).stdout == b"again\n"
    finally:
        shutil.rmtree(first, ignore_errors=True)
        shutil.rmtree(second, ignore_errors=True)


def test_changed_host_key_is_refused_even_with_accept_new(sshd, tmp_path, runtime_dir):
    other = keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} " + " ".join(Path(f"{other}.pub").read_text().split()[:2]) + "\n")
    destination = sshd.destination(str(tmp_path), known_hosts=str(known), accept_new_host_key=True)
    with Ssh(destination, runtime_dir=runtime_dir) as ssh:
        with pytest.raises(DestinationError, match=r": host key verification failed \(unknown or changed host key;"):
            ssh.run(["true"])


def test_unauthorized_key_is_permission_denied(sshd, tmp_path, runtime_dir):
    wrong = keygen(tmp_path / "wrong key")
    with Ssh(sshd.destination(str(tmp_path), key=str(wrong)), runtime_dir=runtime_dir) as ssh:
        with pytest.raises(DestinationError) as raised:
            ssh.run(["true"])
    assert one_line(raised.value).startswith(f"{sshd.user}@127.0.0.1:{sshd.port}: permission denied (publickey")


def test_connection_error_is_recognised_in_rsync_stderr(ssh, sshd):
    stderr = b"ssh: connect to host 127.0.0.1 port 1: Connection refused\r\nrsync: connection unexpectedly closed\n"
    assert str(ssh.connection_error(stderr)) == f"{sshd.user}@127.0.0.1:{sshd.port}: connection refused"
    assert ssh.connection_error(b"rsync: some other trouble\n") is None


# --- ssh: passwords --------------------------------------------------------


def test_password_goes_to_sshpass_through_the_environment_only(sshd, tmp_path, runtime_dir):
    password = "s3cret word"
    ssh = Ssh(sshd.destination(str(tmp_path), key=None, password=password), runtime_dir=runtime_dir)
    argv = ssh.command(["true"])
    assert argv[:2] == ["sshpass", "-e"]
    assert "BatchMode=no" in argv and "BatchMode=yes" not in argv
    assert not any(password in a for a in argv + ssh.rsync_args())
    assert ssh.env() == {"SSHPASS": password}


def test_missing_sshpass_is_one_clear_line(sshd, tmp_path, runtime_dir, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").symlink_to(shutil.which("ssh"))
    monkeypatch.setenv("PATH", str(bin_dir))
    with Ssh(sshd.destination(str(tmp_path), password="pw"), runtime_dir=runtime_dir) as ssh:
        with pytest.raises(CommandNotFoundError) as raised:
            ssh.run(["true"])
    assert one_line(raised.value) == "sshpass: command not found; install the sshpass package"


def _cmdlines() -> list[bytes]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found.append(Path(f"/proc/{entry}/cmdline").read_bytes())
            except OSError:
                pass
    return found


@contextlib.contextmanager
def cmdlines_seen(*markers: bytes):
    """Sample every process's command line while the block runs; yields the
    list of those holding any of ``markers``, filled in when the block ends."""
    seen: list[bytes] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.extend(c for c in _cmdlines() if any(m in c for m in markers))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()


def test_password_login_works_and_the_password_is_in_no_command_line(sshd, tmp_path, runtime_dir, password_user):
    name, password = password_user
    destination = sshd.destination(str(tmp_path), user=name, key=None, password=password)
    with Ssh(destination, runtime_dir=runtime_dir) as ssh, cmdlines_seen(b"sshpass", password.encode()) as seen:
        assert ssh.run(["sh", "-c", "sleep 0.5; id -un"]).stdout == name.encode() + b"\n"
    assert any(c.startswith(b"sshpass\0-e\0ssh\0") for c in seen)
    assert not any(password.encode() in c for c in seen)


def test_wrong_password_is_permission_denied(sshd, tmp_path, runtime_dir, password_user):
    name, _ = password_user
    with Ssh(sshd.destination(str(tmp_path), user=name, key=None, password="wrong"), runtime_dir=runtime_dir) as ssh:
        with pytest.raises(DestinationError) as raised:
            ssh.run(["true"])
    assert one_line(raised.value).startswith(f"{name}@127.0.0.1:{sshd.port}: permission denied")


# --- ssh: rsync ------------------------------------------------------------


def test_rsync_copies_a_file_named_with_spaces_into_a_remote_dir_with_spaces(sshd, tmp_path):
    weird = "dir with spaces 'single' \"double\" $(touch pwned) %C"
    runtime = short_private_dir()
    try:
        source = tmp_path / "a file with spaces 'and' \"quotes\""
        source.write_bytes(b"content\n")
        remote = tmp_path / weird
        known = tmp_path / "known hosts 'q'"
        shutil.copy(sshd.known_hosts, known)
        key = tmp_path / "key with space %d"
        shutil.copy(sshd.key, key)
        os.chmod(key, 0o600)
        destination = sshd.destination(str(remote), key=str(key), known_hosts=str(known))
        with Ssh(destination, runtime_dir=runtime) as ssh:
            ssh.run(["mkdir", "-p", destination.directory])
            subprocess.run(["rsync", "-a", *ssh.rsync_args(), str(source),
                            ssh.rsync_target(destination.directory + "/")],
                           check=True, capture_output=True, env={**os.environ, **ssh.env()})
        assert (remote / source.name).read_bytes() == b"content\n"
        assert os.listdir(remote) == [source.name]
        assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)

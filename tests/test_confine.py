"""The view of the source rsync reads through: no symlink followed, nothing writable."""

from __future__ import annotations

import errno
import os

import pytest

from jwbackup import confine


@pytest.fixture
def view(tmp_path):
    (tmp_path / "src/home/alice/docs").mkdir(parents=True)
    (tmp_path / "src/home/alice/docs/a.txt").write_bytes(b"alice's\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/a.txt").write_bytes(b"SECRET\n")
    os.symlink(tmp_path / "outside", tmp_path / "src/home/alice/link")
    with confine.source(str(tmp_path / "src")) as (path, fds):
        yield path, fds


def test_the_view_reads_the_source_and_its_symlinks_as_symlinks(view):
    path, fds = view
    assert path == f"/proc/self/fd/{fds[0]}"
    with open(path + "/home/alice/docs/a.txt", "rb") as f:
        assert f.read() == b"alice's\n"
    assert os.readlink(path + "/home/alice/link").endswith("/outside")


def test_a_path_through_a_symlink_fails_instead_of_leading_outside(view):
    path, _ = view
    with pytest.raises(OSError) as caught:
        open(path + "/home/alice/link/a.txt", "rb")
    assert caught.value.errno == errno.ELOOP


def test_nothing_can_be_written_through_the_view(view, tmp_path):
    path, _ = view
    with pytest.raises(OSError) as caught:
        open(path + "/home/alice/new", "wb")
    assert caught.value.errno == errno.EROFS
    assert sorted(os.listdir(tmp_path / "src/home/alice")) == ["docs", "link"]


def test_the_view_is_gone_with_its_descriptor(tmp_path):
    (tmp_path / "src").mkdir()
    with confine.source(str(tmp_path / "src")) as (_, fds):
        pass
    with pytest.raises(OSError):
        os.fstat(fds[0])

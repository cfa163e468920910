"""The manifest's compact storage: what goes in as an Entry comes back the same."""

from __future__ import annotations

import hashlib

import pytest

from jwbackup.managers import DIR, FILE, OTHER, SYMLINK, Digest, Entry, Manifest


def md5(data: bytes) -> Digest:
    return Digest("md5", hashlib.md5(data).hexdigest())


ENTRIES = {
    b"/usr/bin/tool": Entry(FILE, "tool", md5(b"tool")),
    b"/etc/tool.conf": Entry(FILE, "tool", md5(b"conf"), conffile=True),
    b"/usr/share/tool": Entry(DIR, "tool"),
    b"/usr/lib/tool": Entry(None, "tool"),  # dpkg records no kind
    b"/usr/bin/link": Entry(SYMLINK, "app-misc/tool-1", conffile=True, mtime=1_700_000_000),
    b"/usr/lib/gentoo.so": Entry(FILE, "app-misc/tool-1", md5(b"so"), mtime=-5),
    b"/run/tool.fifo": Entry(OTHER, "app-misc/tool-1"),
    b"/usr/bin/other": Entry(FILE, "other", Digest("sha256", hashlib.sha256(b"x").hexdigest())),
    b"/usr/bin/nodigest": Entry(FILE, "other"),
    b"/usr/lib/libt.so": Entry(SYMLINK, "app-misc/tool-1", mtime=1_700_000_000, target=b"libt.so.1"),
    b"/usr/lib/odd": Entry(SYMLINK, "app-misc/tool-1", target=b"../a \n\xff->b"),  # no mtime recorded
}


def test_every_entry_comes_back_as_it_went_in():
    manifest = Manifest(ENTRIES, warnings=["a warning"])
    assert dict(manifest.items()) == ENTRIES
    assert {path: manifest[path] for path in manifest} == ENTRIES
    assert len(manifest) == len(ENTRIES) and manifest.warnings == ["a warning"]
    assert manifest.get(b"/not/installed") is None and b"/not/installed" not in manifest
    del manifest[b"/usr/bin/tool"]
    assert b"/usr/bin/tool" not in manifest and manifest.get(b"/usr/bin/tool") is None


def test_entries_without_a_digest_share_one_record_per_package_and_kind():
    manifest = Manifest({b"/usr/share/a": Entry(None, "pkg"), b"/usr/share/b": Entry(None, "pkg"),
                         b"/usr/share/c": Entry(None, "other")})
    assert manifest.record(b"/usr/share/a") is manifest.record(b"/usr/share/b")
    assert manifest[b"/usr/share/c"].package == "other"


@pytest.mark.parametrize("digest", [Digest("md5", "not hex at all, but 32 chars long"), Digest("md5", "abcd"),
                                    Digest("crc32", "00000000")])
def test_a_digest_that_cannot_be_stored_is_refused_and_changes_nothing(digest):
    manifest = Manifest({b"/usr/bin/tool": ENTRIES[b"/usr/bin/tool"]})
    with pytest.raises(ValueError):
        manifest[b"/usr/bin/tool"] = Entry(FILE, "tool", digest)
    assert dict(manifest.items()) == {b"/usr/bin/tool": ENTRIES[b"/usr/bin/tool"]}


@pytest.mark.parametrize("entry", [Entry(FILE, "tool", target=b"x"), Entry(SYMLINK, "tool", md5(b"x"), target=b"x"),
                                   Entry(SYMLINK, "tool", target=b"")])
def test_a_target_is_refused_but_for_a_symlink_without_a_digest(entry):
    with pytest.raises(ValueError):
        Manifest({b"/usr/bin/tool": entry})


def test_an_mtime_beyond_64_bits_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        Manifest({b"/usr/bin/tool": Entry(FILE, "tool", mtime=1 << 63)})


def test_paths_are_kept_by_directory_and_come_back_whole():
    odd = {
        b"/": Entry(DIR, "base"),
        b"/etc": Entry(DIR, "base"),
        b"/etc/a file with spaces": Entry(FILE, "base", md5(b"1")),
        b"/etc/\xff\xfe not utf-8": Entry(FILE, "base", md5(b"2")),
        b"/etc/new\nline": Entry(FILE, "base", md5(b"3")),
        b"/etc/-leading-dash": Entry(None, "base"),
    }
    manifest = Manifest(odd)
    assert set(manifest.dirs) == {b"/", b"/etc/"}
    assert dict(manifest.items()) == odd
    assert manifest.directory(b"/etc/") == {name[len(b"/etc/"):]: manifest.record(name) for name in odd if name.startswith(b"/etc/")}
    assert manifest.directory(b"/usr/") is None and manifest.get(b"/usr") is None


def test_changes_after_freezing_land_in_the_right_directory():
    manifest = Manifest(ENTRIES)
    manifest[b"/usr/bin/new"] = Entry(FILE, "new", md5(b"new"))
    del manifest[b"/run/tool.fifo"]  # the only path in /run/
    with pytest.raises(KeyError):
        del manifest[b"/run/tool.fifo"]
    manifest.freeze()
    expected = {**ENTRIES, b"/usr/bin/new": Entry(FILE, "new", md5(b"new"))}
    del expected[b"/run/tool.fifo"]
    assert dict(manifest.items()) == expected and len(manifest) == len(expected)
    assert b"/run/" not in manifest.dirs

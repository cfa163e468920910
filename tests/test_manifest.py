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
    records = manifest.records
    assert records[b"/usr/share/a"] is records[b"/usr/share/b"]
    assert manifest[b"/usr/share/c"].package == "other"


@pytest.mark.parametrize("digest", [Digest("md5", "not hex at all, but 32 chars long"), Digest("md5", "abcd"),
                                    Digest("crc32", "00000000")])
def test_a_digest_that_cannot_be_stored_is_refused_and_changes_nothing(digest):
    manifest = Manifest({b"/usr/bin/tool": ENTRIES[b"/usr/bin/tool"]})
    with pytest.raises(ValueError):
        manifest[b"/usr/bin/tool"] = Entry(FILE, "tool", digest)
    assert dict(manifest.items()) == {b"/usr/bin/tool": ENTRIES[b"/usr/bin/tool"]}


def test_an_mtime_beyond_64_bits_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        Manifest({b"/usr/bin/tool": Entry(FILE, "tool", mtime=1 << 63)})


def test_dropping_the_digests_keeps_kinds_packages_and_conffile_marks():
    entries = {**ENTRIES, b"/usr/bin/tool2": Entry(FILE, "tool", md5(b"tool2"))}
    manifest = Manifest(entries)
    manifest.drop_digests()
    assert dict(manifest.items()) == {path: entry._replace(digest=None, mtime=None) for path, entry in entries.items()}
    records = manifest.records  # what is left is shared, as for entries that never had a digest
    assert records[b"/usr/bin/tool"] is records[b"/usr/bin/tool2"] is not records[b"/etc/tool.conf"]

"""Finding swap files in the tables Linux writes them to."""

from __future__ import annotations

from jwbackup import swap


def test_proc_swaps_gives_the_files_not_the_partitions():
    # As the kernel prints it; a space in a name is written \040.
    text = (b"Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
            b"/dev/vda3                               partition\t2097148\t\t0\t\t-2\n"
            b"/swapfile                               file\t\t1048572\t\t512\t\t-3\n"
            b"/var/swap\\040files/one                  file\t\t65532\t\t0\t\t-4\n")
    assert swap.parse_proc_swaps(text) == [b"/swapfile", b"/var/swap files/one"]


def test_fstab_gives_swap_entries_only():
    text = (b"# /swapfile none swap sw 0 0\n"
            b"UUID=0a1b / ext4 errors=remount-ro 0 1\n"
            b"UUID=77ff none swap sw 0 0\n"
            b"/dev/vda3 none swap sw 0 0\n"
            b"\t/swap.img\tnone\tswap\tsw\t0\t0\n"
            b"/srv/data /mnt/data none bind 0 0\n")
    assert swap.parse_fstab(text) == [b"/dev/vda3", b"/swap.img"]


def test_files_of_another_root_come_from_its_fstab_only(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "fstab").write_bytes(b"/swapfile none swap sw 0 0\n")
    assert swap.files(str(tmp_path)) == {b"/swapfile"}
    assert swap.files(str(tmp_path / "nothing-here")) == set()

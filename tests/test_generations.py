"""Generation names, destination listings and retention plans (pure functions, no files)."""

from __future__ import annotations

import os
import random
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from jwbackup import generations as g


def keep(daily=0, weekly=0, monthly=0, yearly=0):
    """A retention policy shaped like ``config.Keep``."""
    return SimpleNamespace(daily=daily, weekly=weekly, monthly=monthly, yearly=yearly)


def day(text: str) -> str:
    """``"2014-03-01"`` -> the generation name of that day at noon."""
    return text + "-12:00:00"


def shuffled(names):
    names = list(names)
    random.Random(4).shuffle(names)
    return names


# --- names --------------------------------------------------------------------


def test_name_is_written_in_the_original_tools_format():
    assert g.name_for(datetime(2014, 2, 12, 3, 12, 26)) == "2014-02-12-03:12:26"


def test_name_drops_fractions_of_a_second():
    assert g.name_for(datetime(2014, 2, 12, 3, 12, 26, 999999)) == "2014-02-12-03:12:26"


def test_name_pads_every_field_with_zeros():
    assert g.name_for(datetime(999, 1, 2, 3, 4, 5)) == "0999-01-02-03:04:05"


def test_name_matches_the_strftime_format():
    moment = datetime(2014, 2, 12, 3, 12, 26)
    assert g.name_for(moment) == moment.strftime(g.FORMAT)


@pytest.fixture
def utc_local_time(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


def test_name_of_an_aware_time_is_its_local_wall_clock_time(utc_local_time):
    moment = datetime(2014, 2, 12, 3, 12, 26, tzinfo=timezone(timedelta(hours=2)))
    assert g.name_for(moment) == "2014-02-12-01:12:26"


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2014, 2, 12, 3, 12, 26),
        datetime(2016, 2, 29, 0, 0, 0),
        datetime(1999, 12, 31, 23, 59, 59),
        datetime(1, 1, 1, 0, 0, 0),
        datetime(9999, 12, 31, 23, 59, 59),
    ],
)
def test_name_parses_back_to_the_same_time(moment):
    assert g.parse(g.name_for(moment)) == moment


def test_parse_reads_a_name_the_original_tool_wrote():
    assert g.parse("2014-02-12-03:12:26") == datetime(2014, 2, 12, 3, 12, 26)


@pytest.mark.parametrize(
    "name",
    [
        "notes",
        "latest",
        "",
        "2014-02-30-00:00:00",  # no such day
        "2015-02-29-00:00:00",  # not a leap year
        "2014-13-01-00:00:00",
        "2014-00-01-00:00:00",
        "0000-01-01-00:00:00",
        "2014-02-12-24:00:00",
        "2014-02-12-23:60:00",
        "2016-12-31-23:59:60",  # leap second
        "2014-02-12-03:12:26.partial",
        "2014-02-12-03:12:26x",
        "x2014-02-12-03:12:26",
        " 2014-02-12-03:12:26",
        "2014-02-12-03:12:26 ",
        "2014-02-12-03:12:26\n",
        "2014-2-12-03:12:26",  # not zero-padded
        "2014-02-12-3:12:26",
        "2014-02-12 03:12:26",
        "2014-02-12T03:12:26",
        "2014-02-12-03-12-26",
        "2014-02-12-03:12",
        "12014-02-12-03:12:26",
        "２０１４-02-12-03:12:26",  # non-ASCII digits
        "-2014-02-12-03:12:26",
    ],
)
def test_parse_rejects_anything_that_is_not_exactly_a_generation_name(name):
    assert g.parse(name) is None


def test_parse_accepts_the_29th_of_february_in_a_leap_year():
    assert g.parse("2016-02-29-00:00:00") == datetime(2016, 2, 29)


# --- listing ------------------------------------------------------------------


def test_scan_sorts_generations_by_time_newest_first_across_year_boundaries():
    names = [
        "2013-12-31-23:59:59",
        "2014-01-01-00:00:00",
        "2012-06-15-08:00:00",
        "2014-01-01-00:00:01",
        "2013-01-01-00:00:00",
        "2013-12-31-09:00:00",
    ]
    listing = g.scan((name, "d") for name in shuffled(names))
    assert listing.complete == (
        "2014-01-01-00:00:01",
        "2014-01-01-00:00:00",
        "2013-12-31-23:59:59",
        "2013-12-31-09:00:00",
        "2013-01-01-00:00:00",
        "2012-06-15-08:00:00",
    )


def test_scan_sorts_partials_by_time_newest_first():
    names = ["2013-12-31-23:59:59.partial", "2014-01-01-00:00:00.partial", "2013-01-02-00:00:00.partial"]
    listing = g.scan((name, "d") for name in names)
    assert listing.partial == (
        "2014-01-01-00:00:00.partial",
        "2013-12-31-23:59:59.partial",
        "2013-01-02-00:00:00.partial",
    )
    assert listing.complete == ()


def test_scan_separates_complete_partial_and_other_entries():
    listing = g.scan(
        [
            ("latest", "l"),
            ("2014-02-12-03:12:26", "d"),
            ("2014-02-13-03:00:00.partial", "d"),
            ("notes", "f"),
            ("lost+found", "d"),
            ("2014-02-11-03:00:00", "d"),
        ]
    )
    assert listing.complete == ("2014-02-12-03:12:26", "2014-02-11-03:00:00")
    assert listing.partial == ("2014-02-13-03:00:00.partial",)
    assert listing.other == ("latest", "lost+found", "notes")


def test_symlink_named_like_a_generation_is_not_a_generation():
    listing = g.scan(
        [
            ("2014-02-12-03:12:26", "d"),
            ("2099-01-01-00:00:00", "l"),
            ("2099-01-02-00:00:00.partial", "l"),
        ]
    )
    assert listing.complete == ("2014-02-12-03:12:26",)
    assert listing.partial == ()
    assert g.latest_complete(listing) == "2014-02-12-03:12:26"
    assert g.resumable_partial(listing) is None
    assert set(listing.other) == {"2099-01-01-00:00:00", "2099-01-02-00:00:00.partial"}


def test_file_named_like_a_generation_is_not_a_generation():
    listing = g.scan([("2014-02-12-03:12:26", "f"), ("2014-02-12-03:12:26.partial", "f")])
    assert listing.complete == ()
    assert listing.partial == ()
    assert listing.other == ("2014-02-12-03:12:26", "2014-02-12-03:12:26.partial")


@pytest.mark.parametrize(
    "name",
    [
        "2014-02-12-03:12:26.partial.partial",
        "2014-02-30-03:12:26.partial",
        ".partial",
        "notes.partial",
        "2014-02-12-03:12:26.PARTIAL",
    ],
)
def test_directory_with_a_malformed_partial_name_is_neither_complete_nor_partial(name):
    listing = g.scan([(name, "d")])
    assert listing == g.Listing(other=(name,))


def test_scan_accepts_byte_names_including_undecodable_ones():
    listing = g.scan([(b"2014-02-12-03:12:26", "d"), (b"\xff junk", "d"), (b"2014-02-13-00:00:00.partial", "d")])
    assert listing.complete == ("2014-02-12-03:12:26",)
    assert listing.partial == ("2014-02-13-00:00:00.partial",)
    assert [os.fsencode(name) for name in listing.other] == [b"\xff junk"]


def test_scan_refuses_an_unknown_entry_type():
    with pytest.raises(ValueError, match="dir"):
        g.scan([("2014-02-12-03:12:26", "dir")])


def test_empty_destination_has_no_latest_and_nothing_to_resume():
    listing = g.scan([])
    assert g.latest_complete(listing) is None
    assert g.resumable_partial(listing) is None


def test_latest_complete_is_the_newest_by_name_time_not_by_listing_order():
    listing = g.scan([("2014-01-01-00:00:00", "d"), ("2014-03-01-00:00:00", "d"), ("2014-02-01-00:00:00", "d")])
    assert g.latest_complete(listing) == "2014-03-01-00:00:00"


def test_newest_partial_is_resumed_even_when_older_than_latest_complete():
    listing = g.scan(
        [
            ("2014-03-01-00:00:00", "d"),
            ("2014-01-01-00:00:00.partial", "d"),
            ("2014-02-01-00:00:00.partial", "d"),
        ]
    )
    assert g.resumable_partial(listing) == "2014-02-01-00:00:00.partial"
    assert g.latest_complete(listing) == "2014-03-01-00:00:00"


# --- unique names -------------------------------------------------------------


def test_unique_name_is_the_plain_name_when_free():
    existing = ["latest", "2014-02-12-03:12:25", "2014-02-12-03:12:27"]
    assert g.unique_name(datetime(2014, 2, 12, 3, 12, 26), existing) == "2014-02-12-03:12:26"


@pytest.mark.parametrize(
    "existing, expected",
    [
        (["2014-02-12-03:12:26"], "2014-02-12-03:12:27"),
        (["2014-02-12-03:12:26.partial"], "2014-02-12-03:12:27"),
        (["2014-02-12-03:12:26", "2014-02-12-03:12:27.partial", "2014-02-12-03:12:28"], "2014-02-12-03:12:29"),
    ],
)
def test_unique_name_steps_forward_one_second_past_taken_names(existing, expected):
    assert g.unique_name(datetime(2014, 2, 12, 3, 12, 26), existing) == expected


def test_unique_name_steps_across_a_year_boundary():
    existing = ["2013-12-31-23:59:58", "2013-12-31-23:59:59.partial"]
    assert g.unique_name(datetime(2013, 12, 31, 23, 59, 58), existing) == "2014-01-01-00:00:00"


def test_unique_name_ignores_fractions_of_a_second():
    moment = datetime(2014, 2, 12, 3, 12, 26, 999999)
    assert g.unique_name(moment, ["2014-02-12-03:12:26"]) == "2014-02-12-03:12:27"


def test_unique_name_accepts_any_iterable_once():
    existing = iter(["2014-02-12-03:12:26", "2014-02-12-03:12:27"])
    assert g.unique_name(datetime(2014, 2, 12, 3, 12, 26), existing) == "2014-02-12-03:12:28"


# --- retention: the original tool's "generations" ----------------------------


def test_generations_3_with_five_keeps_the_three_newest():
    names = [day("2014-02-10"), day("2014-02-11"), day("2014-02-12"), day("2014-02-13"), day("2014-02-14")]
    plan = g.plan_retention(shuffled(names), generations=3, keep=None)
    assert plan.kept == [day("2014-02-14"), day("2014-02-13"), day("2014-02-12")]
    assert plan.remove == [day("2014-02-11"), day("2014-02-10")]


def test_generations_count_by_time_across_a_year_boundary():
    names = ["2013-12-30-23:00:00", "2013-12-31-23:59:59", "2014-01-01-00:00:00", "2014-01-02-00:00:00"]
    plan = g.plan_retention(names, generations=2, keep=None)
    assert plan.kept == ["2014-01-02-00:00:00", "2014-01-01-00:00:00"]
    assert plan.remove == ["2013-12-31-23:59:59", "2013-12-30-23:00:00"]


def test_fewer_generations_than_the_limit_removes_nothing():
    names = [day("2014-02-12"), day("2014-02-13")]
    plan = g.plan_retention(names, generations=30, keep=None)
    assert plan.kept == [day("2014-02-13"), day("2014-02-12")]
    assert plan.remove == []


def test_plan_of_no_generations_is_empty():
    plan = g.plan_retention([], generations=3, keep=keep(daily=7))
    assert plan.keep == [] and plan.remove == []


@pytest.mark.parametrize("generations", [0, -1, -30])
@pytest.mark.parametrize("policy", [None, keep(), keep(daily=0, weekly=0, monthly=0, yearly=0)])
def test_newest_generation_is_never_removed(generations, policy):
    names = [day("2014-02-12"), day("2014-02-13"), day("2014-02-11")]
    plan = g.plan_retention(names, generations=generations, keep=policy)
    assert plan.keep == [(day("2014-02-13"), ("newest",))]
    assert plan.remove == [day("2014-02-12"), day("2014-02-11")]


def test_single_generation_is_kept_with_generations_0():
    plan = g.plan_retention([day("2014-02-12")], generations=0, keep=None)
    assert plan.kept == [day("2014-02-12")]
    assert plan.remove == []


def test_names_that_are_not_generations_are_never_in_the_plan():
    names = [
        day("2014-02-10"),
        day("2014-02-11"),
        "2014-02-12-12:00:00.partial",
        "latest",
        "notes",
        "2014-02-30-00:00:00",
    ]
    plan = g.plan_retention(names, generations=1, keep=None)
    assert plan.kept == [day("2014-02-11")]
    assert plan.remove == [day("2014-02-10")]


def test_the_run_s_own_generation_is_kept_when_others_are_named_later():
    # the clock was set back: this run's name sorts below the two before it
    names = [day("2014-02-10"), day("2014-02-12"), day("2014-02-11")]
    plan = g.plan_retention(names, generations=1, keep=None, current=day("2014-02-10"))
    assert plan.kept == [day("2014-02-12"), day("2014-02-10")]
    assert plan.remove == [day("2014-02-11")]


def test_a_name_given_twice_is_planned_once():
    plan = g.plan_retention([day("2014-02-11"), day("2014-02-10"), day("2014-02-10")], generations=1, keep=None)
    assert plan.remove == [day("2014-02-10")]


def test_every_generation_is_either_kept_or_removed():
    names = [g.name_for(datetime(2013, 11, 1, 3) + timedelta(hours=13 * i)) for i in range(300)]
    plan = g.plan_retention(shuffled(names), generations=5, keep=keep(daily=7, weekly=4, monthly=6, yearly=2))
    assert sorted(plan.kept + plan.remove) == sorted(names)
    assert not set(plan.kept) & set(plan.remove)


# --- retention: borg prune's --keep-daily/weekly/monthly/yearly --------------


def test_keep_daily_keeps_the_last_generation_of_each_day_across_a_month_end():
    names = [
        "2014-03-01-23:00:00",
        "2014-03-01-01:00:00",
        "2014-02-28-12:00:00",
        "2014-02-27-12:00:00",
        "2014-02-26-12:00:00",
    ]
    plan = g.plan_retention(shuffled(names), generations=0, keep=keep(daily=3))
    assert plan.keep == [
        ("2014-03-01-23:00:00", ("newest", "daily #1")),
        ("2014-02-28-12:00:00", ("daily #2",)),
        ("2014-02-27-12:00:00", ("daily #3",)),
    ]
    assert plan.remove == ["2014-03-01-01:00:00", "2014-02-26-12:00:00"]


def test_keep_daily_counts_only_days_that_have_generations():
    names = [day("2014-03-05"), day("2014-03-01"), day("2014-02-20"), day("2014-02-19")]
    plan = g.plan_retention(names, generations=0, keep=keep(daily=2))
    assert plan.kept == [day("2014-03-05"), day("2014-03-01")]
    assert plan.remove == [day("2014-02-20"), day("2014-02-19")]


def test_keep_weekly_uses_iso_weeks_across_a_year_boundary():
    # 2016-01-01 is a Friday: 2015-12-28 .. 2016-01-03 is ISO week 2015-W53.
    names = [
        day("2016-01-05"),  # 2016-W01
        day("2016-01-03"),  # 2015-W53, newest of that week
        day("2016-01-01"),  # 2015-W53
        day("2015-12-28"),  # 2015-W53 (Monday)
        day("2015-12-27"),  # 2015-W52 (Sunday)
        day("2015-12-20"),  # 2015-W51
    ]
    plan = g.plan_retention(shuffled(names), generations=0, keep=keep(weekly=3))
    assert plan.keep == [
        (day("2016-01-05"), ("newest", "weekly #1")),
        (day("2016-01-03"), ("weekly #2",)),
        (day("2015-12-27"), ("weekly #3",)),
    ]
    assert plan.remove == [day("2016-01-01"), day("2015-12-28"), day("2015-12-20")]


def test_keep_weekly_puts_late_december_in_the_next_years_first_week():
    # 2014-12-29 (Monday) is ISO week 2015-W01, together with 2015-01-02.
    names = [day("2015-01-02"), day("2014-12-29"), day("2014-12-28")]
    plan = g.plan_retention(names, generations=0, keep=keep(weekly=2))
    assert plan.kept == [day("2015-01-02"), day("2014-12-28")]
    assert plan.remove == [day("2014-12-29")]


def test_keep_monthly_keeps_the_last_generation_of_each_month_across_a_year_end():
    names = [
        "2014-03-01-00:00:00",
        "2014-02-28-23:59:59",
        "2014-02-01-00:00:00",
        "2014-01-31-12:00:00",
        "2013-12-31-23:59:59",
        "2013-12-01-00:00:00",
    ]
    plan = g.plan_retention(shuffled(names), generations=0, keep=keep(monthly=3))
    assert plan.keep == [
        ("2014-03-01-00:00:00", ("newest", "monthly #1")),
        ("2014-02-28-23:59:59", ("monthly #2",)),
        ("2014-01-31-12:00:00", ("monthly #3",)),
    ]
    assert plan.remove == ["2014-02-01-00:00:00", "2013-12-31-23:59:59", "2013-12-01-00:00:00"]


def test_keep_yearly_keeps_the_last_generation_of_each_year():
    names = [
        "2016-01-01-00:00:00",
        "2015-12-31-23:59:59",
        "2015-06-01-00:00:00",
        "2014-12-31-00:00:00",
        "2013-01-01-00:00:00",
    ]
    plan = g.plan_retention(names, generations=0, keep=keep(yearly=2))
    assert plan.kept == ["2016-01-01-00:00:00", "2015-12-31-23:59:59"]
    assert plan.remove == ["2015-06-01-00:00:00", "2014-12-31-00:00:00", "2013-01-01-00:00:00"]


def test_rule_short_of_its_count_also_keeps_the_oldest_generation():
    # borg >= 1.2: the first generation keeps ageing until a newer one fills the slot.
    names = [day("2015-12-31"), day("2014-12-31"), day("2014-06-01")]
    plan = g.plan_retention(names, generations=0, keep=keep(yearly=5))
    assert plan.keep == [
        (day("2015-12-31"), ("newest", "yearly #1")),
        (day("2014-12-31"), ("yearly #2",)),
        (day("2014-06-01"), ("yearly[oldest] #3",)),
    ]
    assert plan.remove == []


def test_rule_that_reaches_its_count_does_not_keep_the_oldest():
    names = [day("2015-12-31"), day("2014-12-31"), day("2014-06-01")]
    plan = g.plan_retention(names, generations=0, keep=keep(yearly=2))
    assert plan.remove == [day("2014-06-01")]


def test_negative_count_keeps_every_period():
    names = ["2014-03-02-08:00:00", "2014-03-02-20:00:00", day("2014-03-01"), day("2014-02-01"), day("2013-01-01")]
    plan = g.plan_retention(names, generations=0, keep=keep(daily=-1))
    assert plan.kept == ["2014-03-02-20:00:00", day("2014-03-01"), day("2014-02-01"), day("2013-01-01")]
    assert plan.remove == ["2014-03-02-08:00:00"]


def test_generation_kept_by_an_earlier_rule_does_not_count_for_a_later_one():
    # 2014-W01 starts on Monday 2013-12-30; W02 is 01-06..12, W03 is 01-13..19.
    names = [
        day("2014-01-15"),  # W03
        day("2014-01-14"),  # W03
        day("2014-01-13"),  # W03
        day("2014-01-10"),  # W02
        day("2014-01-03"),  # W01
        day("2013-12-27"),  # 2013-W52
    ]
    plan = g.plan_retention(shuffled(names), generations=0, keep=keep(daily=2, weekly=2))
    # The daily rule takes 01-15 and 01-14; week W03's newest (01-15) is already
    # kept, so the weekly rule's two slots go to W02 and W01.
    assert plan.keep == [
        (day("2014-01-15"), ("newest", "daily #1")),
        (day("2014-01-14"), ("daily #2",)),
        (day("2014-01-10"), ("weekly #1",)),
        (day("2014-01-03"), ("weekly #2",)),
    ]
    assert plan.remove == [day("2014-01-13"), day("2013-12-27")]


def test_yearly_rule_reaches_past_a_year_already_kept_by_the_monthly_rule():
    names = [day("2015-03-10"), day("2015-02-10"), day("2014-12-10"), day("2014-11-10")]
    plan = g.plan_retention(names, generations=0, keep=keep(monthly=1, yearly=1))
    assert plan.keep == [
        (day("2015-03-10"), ("newest", "monthly #1")),
        (day("2014-12-10"), ("yearly #1",)),
    ]
    assert plan.remove == [day("2015-02-10"), day("2014-11-10")]


def test_generations_and_keep_rules_are_united_independently():
    names = [day("2014-03-02"), day("2014-03-01"), day("2014-02-28"), day("2014-02-27"), day("2014-01-31")]
    plan = g.plan_retention(names, generations=2, keep=keep(monthly=2))
    # The monthly rule counts from the newest, whatever "generations" kept.
    assert plan.keep == [
        (day("2014-03-02"), ("newest", "generations #1", "monthly #1")),
        (day("2014-03-01"), ("generations #2",)),
        (day("2014-02-28"), ("monthly #2",)),
    ]
    assert plan.remove == [day("2014-02-27"), day("2014-01-31")]


def test_daily_weekly_monthly_yearly_together_over_a_winter_of_daily_backups():
    # One generation a day at 03:00 from 2013-11-01 to 2014-02-14 (a Friday).
    first = datetime(2013, 11, 1, 3)
    names = [g.name_for(first + timedelta(days=i)) for i in range(106)]
    assert names[-1] == "2014-02-14-03:00:00"
    plan = g.plan_retention(shuffled(names), generations=1, keep=keep(daily=3, weekly=2, monthly=2, yearly=2))
    assert plan.keep == [
        ("2014-02-14-03:00:00", ("newest", "generations #1", "daily #1")),
        ("2014-02-13-03:00:00", ("daily #2",)),
        ("2014-02-12-03:00:00", ("daily #3",)),
        # W07 (02-10..16) is used up by daily #1; W06 ends on Sunday 02-09, W05 on 02-02.
        ("2014-02-09-03:00:00", ("weekly #1",)),
        ("2014-02-02-03:00:00", ("weekly #2",)),
        # February is used up by daily #1; January ends 01-31, December 12-31.
        ("2014-01-31-03:00:00", ("monthly #1",)),
        ("2013-12-31-03:00:00", ("monthly #2",)),
        # 2014 is used up; 2013 is used up by monthly #2; the oldest survives.
        ("2013-11-01-03:00:00", ("yearly[oldest] #1",)),
    ]
    assert len(plan.remove) == 106 - 8


def test_keep_rules_accept_the_config_keep_type():
    config = pytest.importorskip("jwbackup.config")
    names = [day("2014-03-02"), day("2014-03-01"), day("2014-02-28")]
    plan = g.plan_retention(names, generations=0, keep=config.Keep(daily=2))
    assert plan.kept == [day("2014-03-02"), day("2014-03-01")]
    assert plan.remove == [day("2014-02-28")]


def test_last_run_is_what_latest_names_when_it_names_a_complete_generation():
    entries = [("2014-02-12-03:12:26", "d"), ("2099-01-01-00:00:00", "d"), ("latest", "l")]
    assert g.last_run(g.scan(entries, latest=b"2014-02-12-03:12:26")) == "2014-02-12-03:12:26"
    for target in (None, "2014-02-13-00:00:00", "/elsewhere/2014-02-12-03:12:26", "2014-02-12-03:12:26.partial"):
        listing = g.scan(entries, latest=target)
        assert listing.latest is None and g.last_run(listing) == "2099-01-01-00:00:00"
    assert g.last_run(g.scan([])) is None

"""Generation names, the listing of a destination, and the retention plan.

A generation is a directory named after the local time its run started,
``YYYY-MM-DD-HH:MM:SS`` (``2014-02-12-03:12:26``).  A run writes into
``<name>.partial`` and renames it when rsync has finished; ``latest`` is a
symlink to the newest complete generation.

Everything here is pure: functions take names (and entry types) and return
data.  Times are naive local times, exactly as written in the names; ordering
is by the parsed time, never by mtime.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Iterable, Sequence

logger = logging.getLogger(__name__)

FORMAT = "%Y-%m-%d-%H:%M:%S"
PARTIAL_SUFFIX = ".partial"
LATEST = "latest"

DIRECTORY = "d"
SYMLINK = "l"
OTHER = "f"
_TYPES = (DIRECTORY, SYMLINK, OTHER)

_NAME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})-([0-9]{2}):([0-9]{2}):([0-9]{2})")


def name_for(moment: datetime) -> str:
    """The generation name for ``moment``: naive times as given, aware ones in local time."""
    if moment.tzinfo is not None:
        moment = moment.astimezone().replace(tzinfo=None)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"-{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )


def parse(name: str) -> datetime | None:
    """The naive local time a generation name stands for, or None if ``name`` is not one.

    Strict: exactly ``FORMAT`` with zero-padded ASCII digits and a real date
    and time; no suffix, no surrounding space, no ``.partial``.
    """
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return datetime(*map(int, match.groups()))
    except ValueError:
        return None


def _newest_first(names: Iterable[str], key: Callable[[str], datetime]) -> tuple[str, ...]:
    return tuple(sorted(names, key=lambda name: (key(name), name), reverse=True))


@dataclass(frozen=True)
class Listing:
    """The entries of a destination directory, sorted into generations and the rest."""

    complete: tuple[str, ...] = ()  # generation directories, newest first
    partial: tuple[str, ...] = ()  # ``<generation>.partial`` directories, newest first
    other: tuple[str, ...] = ()  # everything else (``latest``, symlinks, files), by name
    latest: str | None = None  # the complete generation the ``latest`` symlink names, if it names one


def scan(entries: Iterable[tuple[str | bytes, str]], latest: str | bytes | None = None) -> Listing:
    """Sort directory entries ``(name, type)`` into a :class:`Listing`.

    ``type`` is ``"d"`` (directory), ``"l"`` (symlink) or ``"f"`` (anything
    else).  Only real directories count as generations: a symlink named like
    one is never linked against nor removed.  Byte names are decoded with
    :func:`os.fsdecode`, so ``os.fsencode`` gives them back unchanged.
    ``latest`` is the target of the ``latest`` symlink, if there is one.
    """
    complete: list[str] = []
    partial: list[str] = []
    other: list[str] = []
    for name, kind in entries:
        if kind not in _TYPES:
            raise ValueError(f"unknown entry type {kind!r} for {name!r}")
        name = os.fsdecode(name)
        if kind == DIRECTORY and parse(name) is not None:
            complete.append(name)
        elif kind == DIRECTORY and _partial_time(name) is not None:
            partial.append(name)
        else:
            other.append(name)
    latest = os.fsdecode(latest) if latest is not None else None
    return Listing(
        complete=_newest_first(complete, parse),
        partial=_newest_first(partial, _partial_time),
        other=tuple(sorted(other)),
        latest=latest if latest in complete else None,
    )


def _partial_time(name: str) -> datetime | None:
    if not name.endswith(PARTIAL_SUFFIX):
        return None
    return parse(name[: -len(PARTIAL_SUFFIX)])


def latest_complete(listing: Listing) -> str | None:
    """The newest complete generation, the one the next run links against."""
    return listing.complete[0] if listing.complete else None


def last_run(listing: Listing) -> str | None:
    """The generation the last run made, as ``latest`` names it; else the newest.

    The two differ once the clock went back: a generation named later than
    the runs after it stays the newest by name.
    """
    return listing.latest or latest_complete(listing)


def resumable_partial(listing: Listing) -> str | None:
    """The newest in-progress generation, which the next run resumes into."""
    return listing.partial[0] if listing.partial else None


def unique_name(moment: datetime, existing_names: Iterable[str]) -> str:
    """The name for a new generation started at ``moment``.

    If that name, or its ``.partial`` form, is already taken, step forward one
    second until both are free.
    """
    taken = set(existing_names)
    moment = moment.replace(microsecond=0)
    while True:
        name = name_for(moment)
        if name not in taken and name + PARTIAL_SUFFIX not in taken:
            return name
        moment += timedelta(seconds=1)


# --- retention ---------------------------------------------------------------

# borg prune's period of a time for each rule, applied in this order.
_PERIODS: tuple[tuple[str, Callable[[datetime], object]], ...] = (
    ("daily", lambda t: t.date()),
    ("weekly", lambda t: t.isocalendar()[:2]),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: t.year),
)


@dataclass(frozen=True)
class RetentionPlan:
    """Which complete generations stay (with the rules that keep them) and which go.

    Both lists are newest first.  Reasons read like borg's ``--list``:
    ``"newest"``, ``"generations #2"``, ``"daily #1"``, ``"yearly[oldest] #3"``.
    """

    keep: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)

    @property
    def kept(self) -> list[str]:
        return [name for name, _ in self.keep]


def plan_retention(complete: Sequence[str], generations: int, keep: object | None = None,
                   current: str | None = None) -> RetentionPlan:
    """Plan which of the ``complete`` generation names to keep and which to remove.

    - the newest ``generations`` are kept (``<= 0``: only the newest);
    - ``keep`` is anything with ``daily``/``weekly``/``monthly``/``yearly``
      counts (``config.Keep``); 0 or None turns a rule off, a negative count
      keeps every period.  The rules follow ``borg prune``: applied daily to
      yearly, each walks the generations newest first and keeps the newest
      one of each day / ISO week / month / year until it has kept its count;
      a period whose newest generation an earlier rule already kept is used
      up without counting; a rule that runs out of generations before its
      count is reached also keeps the oldest one;
    - a generation kept by any rule stays; the newest is never removed, nor
      is ``current``, the one this run has just made, whatever its name says
      against the others (the clock may have been set back since they were made).

    Names that do not parse as generations (``.partial`` ones included) are
    left out of the plan entirely: they are neither kept nor removed.
    """
    times = {name: when for name in set(complete) if (when := parse(name)) is not None}
    ordered = _newest_first(times, times.__getitem__)
    reasons: dict[str, list[str]] = {name: [] for name in ordered}
    if not ordered:
        return RetentionPlan()

    reasons[ordered[0]].append("newest")
    if current in reasons:
        reasons[current].append("this run")
    for number, name in enumerate(ordered[: max(generations, 0)], start=1):
        reasons[name].append(f"generations #{number}")

    if keep is not None:
        kept_by_rule: set[str] = set()
        for rule, period_of in _PERIODS:
            count = getattr(keep, rule, 0) or 0
            for reason, name in _borg_split(ordered, times, rule, period_of, count, kept_by_rule):
                reasons[name].append(reason)

    plan = RetentionPlan(
        keep=[(name, tuple(reasons[name])) for name in ordered if reasons[name]],
        remove=[name for name in ordered if not reasons[name]],
    )
    for name, why in plan.keep:
        logger.debug("keeping generation %s (%s)", name, ", ".join(why))
    for name in plan.remove:
        logger.debug("generation %s has expired", name)
    return plan


def _borg_split(
    ordered: Sequence[str],
    times: dict[str, datetime],
    rule: str,
    period_of: Callable[[datetime], object],
    count: int,
    kept_by_rule: set[str],
) -> list[tuple[str, str]]:
    """One ``--keep-<rule> count`` pass of borg prune; updates ``kept_by_rule``."""
    kept: list[tuple[str, str]] = []
    if count == 0:
        return kept
    last_period = None
    for name in ordered:
        period = period_of(times[name])
        if period == last_period:
            continue
        last_period = period
        if name in kept_by_rule:
            continue
        kept_by_rule.add(name)
        kept.append((f"{rule} #{len(kept) + 1}", name))
        if len(kept) == count:
            return kept
    oldest = ordered[-1]
    if len(kept) < count and oldest not in kept_by_rule:
        kept_by_rule.add(oldest)
        kept.append((f"{rule}[oldest] #{len(kept) + 1}", oldest))
    return kept

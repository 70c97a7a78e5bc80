"""The audit page's query parameters, checked: a malformed one is a 400 that says what is accepted."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

PAGE_SIZE = 50
MAX_TEXT = 200
_WORD = re.compile(r"^[A-Za-z_]{1,40}$")
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]*$")


class BadParameter(ValueError):
    """A query parameter the page cannot use; the message names it and what it accepts."""


@dataclass(frozen=True)
class AuditFilter:
    """Which audit records to show: by project, event, outcome, time and free text; one page of them."""

    project: str = ""
    event: str = ""
    outcome: str = ""
    since: str = ""
    until: str = ""
    q: str = ""
    page: int = 1

    @classmethod
    def parse(cls, params: Iterable[tuple[str, str]]) -> AuditFilter:
        """Read the page's parameters; raises :class:`BadParameter`."""
        known = {f.name for f in fields(cls)}
        given: dict[str, str] = {}
        for name, value in params:
            if name not in known:
                raise BadParameter(f"unknown parameter {name!r}; the audit page takes {', '.join(sorted(known))}")
            if name in given:
                raise BadParameter(f"parameter {name!r} is given twice")
            if len(value) > MAX_TEXT or not _PRINTABLE.match(value):
                raise BadParameter(f"{name}: at most {MAX_TEXT} printable characters")
            given[name] = value.strip()
        for name in ("event", "outcome"):
            if given.get(name) and not _WORD.match(given[name]):
                raise BadParameter(f"{name}: a word such as ok, budget_exhausted or policy_reload")
        for name in ("since", "until"):
            if given.get(name):
                _moment(name, given[name])
        page = given.pop("page", "") or "1"
        if not page.isdigit() or not 1 <= int(page) <= 1_000_000:
            raise BadParameter("page: a whole number from 1")
        return cls(**given, page=int(page))

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` passes every filter given."""
        if self.project and record.get("project") != self.project:
            return False
        if self.event and record.get("event") != self.event:
            return False
        if self.outcome and record.get("outcome") != self.outcome:
            return False
        when = record.get("time")
        when = float(when) if isinstance(when, int | float) else 0.0
        if self.since and when < _moment("since", self.since):
            return False
        if self.until and when >= _moment("until", self.until):
            return False
        return not self.q or self.q.casefold() in _text(record)

    def query(self, **changes: Any) -> str:
        """The query string of this filter, with ``changes`` (e.g. another page)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)} | changes
        return urlencode({k: v for k, v in values.items() if v and not (k == "page" and v == 1)})

    @property
    def active(self) -> bool:
        """Whether any filter (not just a page) is given."""
        return any((self.project, self.event, self.outcome, self.since, self.until, self.q))


def _moment(name: str, text: str) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadParameter(f"{name}: an ISO date or time such as 2026-11-23 or 2026-11-23T08:00 (UTC unless it "
                           "says)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _text(record: Mapping[str, Any]) -> str:
    """What free-text search looks in: every value of the record except its chain fields."""
    return " ".join(str(v) for k, v in record.items() if k not in ("prev", "hash")).casefold()


@dataclass(frozen=True)
class Page:
    """One page of matching records (newest first), and where the others are."""

    records: tuple[Mapping[str, Any], ...]
    number: int
    pages: int
    total: int


def paginate(records: Iterable[Mapping[str, Any]], chosen: AuditFilter) -> Page:
    """The matching records, newest first, cut to the chosen page (past the last page: empty, said so)."""
    matching = [r for r in records if chosen.matches(r)]
    matching.reverse()
    pages = max(1, -(-len(matching) // PAGE_SIZE))
    start = (chosen.page - 1) * PAGE_SIZE
    return Page(tuple(matching[start:start + PAGE_SIZE]), chosen.page, pages, len(matching))

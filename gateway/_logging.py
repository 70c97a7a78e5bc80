"""Logs as events: one JSON object per line for machines, or one readable line for people.

A record logged through :func:`event` carries an ``event`` name (``query``, ``policy_reload``,
``started``, ``stopping``, ``stopped``) and its fields; any other record is an event named
``log``. The JSON form is ``{"time", "level", "logger", "event", "message", ...fields}``, with
``exception`` holding a traceback when there is one, so a log shipper needs no parsing rules.

The format is chosen once, at the edge (:func:`log_format`): the ``--log-format`` flag, else
``GATEWAY_LOG_FORMAT``, else ``json`` when stderr is not a terminal (a service manager or a
container runtime collects it) and ``text`` when a person watches it. The level comes from
``GATEWAY_LOG_LEVEL`` (default ``INFO`` for servers, ``WARNING`` for one-shot commands).

Fields never hold rows, exact aggregates or tokens: a query event names its dataset, project,
outcome, epsilon and the refusal's reason, as the audit record does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

FORMATS = ("json", "text")
_FIELDS = "gateway_fields"  # the attribute of a LogRecord that holds an event's fields
_EVENT = "gateway_event"


def event(logger: logging.Logger, name: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log the event ``name`` with a readable ``message`` and its ``fields`` (JSON-serialisable values)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={_EVENT: name, _FIELDS: fields})


def log_format(flag: str | None, environ: Mapping[str, str], interactive: bool) -> str:
    """The log format: ``flag``, else ``GATEWAY_LOG_FORMAT``, else json unless a person watches (``interactive``)."""
    chosen = flag or environ.get("GATEWAY_LOG_FORMAT", "").strip().lower() or ("text" if interactive else "json")
    if chosen not in FORMATS:
        raise ValueError(f"GATEWAY_LOG_FORMAT: {chosen!r} is not a log format; use json or text")
    return chosen


def log_level(environ: Mapping[str, str], default: str) -> int:
    """The level named by ``GATEWAY_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR), else ``default``."""
    name = environ.get("GATEWAY_LOG_LEVEL", "").strip().upper() or default
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"GATEWAY_LOG_LEVEL: {name!r} is not a level; use DEBUG, INFO, WARNING or ERROR")
    return level


def configure(fmt: str, level: int, stream: IO[str]) -> None:
    """Send every log record to ``stream`` in ``fmt``, replacing any handler set before."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "event": getattr(record, _EVENT, "log"),
            "message": record.getMessage()}
        for key, value in getattr(record, _FIELDS, {}).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, _FIELDS, {})
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # fields before a traceback, on the message's line
        extra = " ".join(f"{k}={json.dumps(v, default=str, ensure_ascii=False)}" for k, v in fields.items())
        return f"{head} [{extra}]{newline}{rest}"

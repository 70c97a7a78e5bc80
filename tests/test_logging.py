"""Logs as events (gateway._logging): one JSON object per line or one readable line, chosen at the edge."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gateway._logging import configure, event, log_format, log_level
from tests.helpers.cli import run_cli


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_are_one_object_per_line_with_the_event_and_its_fields(restore_logging):
    out = io.StringIO()
    configure("json", logging.INFO, out)
    log = logging.getLogger("gateway.test")
    event(log, "query", "query refused: budget_exhausted", outcome="budget_exhausted", project="onc-lung",
          reason="needs 0.5\nhas 0.1")
    log.debug("not shown at INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("plain record with a traceback")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the newline in a field and the traceback stay inside their line
    first, second = map(json.loads, lines)
    assert first["event"] == "query" and first["level"] == "INFO" and first["logger"] == "gateway.test"
    assert first["outcome"] == "budget_exhausted" and first["reason"] == "needs 0.5\nhas 0.1"
    assert first["time"].endswith("Z")
    assert second["event"] == "log" and "ValueError: boom" in second["exception"]


def test_text_logs_put_the_fields_on_the_message_line(restore_logging):
    out = io.StringIO()
    configure("text", logging.INFO, out)
    event(logging.getLogger("gateway.test"), "started", "site north serving", site="north", tls=True)
    line = out.getvalue().rstrip("\n")
    assert "\n" not in line and line.endswith('site north serving [site="north" tls=true]')
    assert " INFO gateway.test: " in line


def test_the_format_is_the_flag_else_the_environment_else_json_unless_a_person_watches():
    assert log_format("text", {"GATEWAY_LOG_FORMAT": "json"}, interactive=False) == "text"
    assert log_format(None, {"GATEWAY_LOG_FORMAT": "TEXT"}, interactive=False) == "text"
    assert log_format(None, {}, interactive=False) == "json"
    assert log_format(None, {}, interactive=True) == "text"
    with pytest.raises(ValueError, match="use json or text"):
        log_format(None, {"GATEWAY_LOG_FORMAT": "xml"}, interactive=False)
    assert log_level({"GATEWAY_LOG_LEVEL": "debug"}, "INFO") == logging.DEBUG
    assert log_level({}, "WARNING") == logging.WARNING
    with pytest.raises(ValueError, match="not a level"):
        log_level({"GATEWAY_LOG_LEVEL": "loud"}, "INFO")


def test_a_bad_log_setting_is_one_line_and_exit_2():
    result = run_cli("policy", "schema", env={"GATEWAY_LOG_LEVEL": "loud"})
    assert result.returncode == 2 and result.stderr.strip() == (
        "gateway: error: GATEWAY_LOG_LEVEL: 'LOUD' is not a level; use DEBUG, INFO, WARNING or ERROR")

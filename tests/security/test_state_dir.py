"""The state dir: held by one site process, private, and never silently restarting budgets."""

from __future__ import annotations

import os
import stat

import pytest

from gateway.client import Client
from gateway.site._statedir import StateDirError


def test_a_second_site_on_the_same_state_dir_refuses_and_names_the_holder(start_site, tmp_path) -> None:
    state = tmp_path / "shared-state"
    first = start_site(state_dir=state)
    with pytest.raises(StateDirError) as refused:
        start_site(state_dir=state)
    assert f"state dir {state} is in use by process {os.getpid()}" in str(refused.value)
    first.stop(grace=0)
    start_site(state_dir=state)  # free again once the holder stops


def test_the_state_dir_and_its_files_are_private(start_site, token, tmp_path) -> None:
    state = tmp_path / "private"
    site = start_site(state_dir=state)
    with Client(site.target, token=token(), retries=0) as c:
        c.query("SELECT count(*) FROM treatments", epsilon=0.1)  # builds the bounded snapshot
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = [p for p in state.iterdir() if p.is_file()]
    assert {"ledger.sqlite", "audit.jsonl", "lock"} <= {p.name for p in files}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}


def test_a_missing_ledger_beside_an_audit_history_refuses_unless_told_to_begin_anew(start_site, tmp_path) -> None:
    state = tmp_path / "lost"
    site = start_site(state_dir=state)
    site.stop(grace=0)
    (state / "ledger.sqlite").unlink()
    (state / "audit.jsonl").write_text('{"seq": 1}\n')
    with pytest.raises(StateDirError, match=r"ledger .* is missing while the audit log .* has a history.*--init"):
        start_site(state_dir=state)
    start_site(state_dir=state, init=True)


def test_a_damaged_ledger_is_one_clear_line(start_site, tmp_path) -> None:
    state = tmp_path / "damaged"
    state.mkdir()
    (state / "ledger.sqlite").write_bytes(b"not a database, just bytes " * 200)
    with pytest.raises(StateDirError) as refused:
        start_site(state_dir=state)
    assert str(refused.value).startswith(f"the ledger {state / 'ledger.sqlite'} cannot be read (")
    assert "\n" not in str(refused.value)
    start_site(state_dir=tmp_path / "fine")  # the failed start left no lock behind elsewhere


def test_a_site_serves_on_ipv6_loopback(start_site, token) -> None:
    site = start_site(host="::1")
    assert site.target.startswith("[::1]:")
    with Client(site.target, token=token(), retries=0) as c:
        assert c.query("SELECT count(*) FROM patients", epsilon=0.1).to_polars().height == 1

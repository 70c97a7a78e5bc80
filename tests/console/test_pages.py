"""The console's pages over a serving site's state dir, through its ASGI app (Starlette's TestClient).

Sign-in, sessions and every refusal; each page's content (budgets with burn-down, the audit trail
with filters and chain status, the policy, reloads); malformed input as 4xx pages.
"""

from __future__ import annotations

import html
import json
import re
from fractions import Fraction

import pytest

from gateway import audit
from gateway.console._sessions import SignInLinks
from gateway.policy import load_policy
from tests.console.conftest import form_token, sign_in
from tests.helpers.policies import dump_policy, with_policy
from tests.helpers.servers import wait_for

PAGES = ("/budgets", "/audit", "/policy", "/reloads")


def text(page: str) -> str:
    """A page's visible text, tags dropped and spaces collapsed, for asserting on sentences."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def test_every_page_needs_a_session_and_sends_a_stranger_to_sign_in(browse) -> None:
    web = browse()
    for path in (*PAGES, "/"):
        response = web.get(path)
        assert response.status_code == 303 and response.headers["location"] in ("/sign-in", "/budgets"), path
    assert web.get("/budgets").headers["location"] == "/sign-in"


def test_an_officer_token_signs_in_to_a_short_http_only_strict_session(browse, officer_token) -> None:
    web = browse()
    response = sign_in(web, officer_token())
    assert response.status_code == 303 and response.headers["location"] == "/budgets"
    cookie = response.headers["set-cookie"]
    assert "console_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    max_age = int(re.search(r"Max-Age=(\d+)", cookie).group(1))
    assert 0 < max_age <= 300 + 30  # never beyond the token's exp (5 minutes), nor the 30-minute cap
    page = web.get("/budgets")
    assert page.status_code == 200 and "Signed in: priya (officer)" in text(page.text)


@pytest.mark.parametrize(("make", "status", "says"), [
    (lambda mint: mint(role="researcher"), 403, "Role 'researcher' may not use this console"),
    (lambda mint: mint(exp=1_000_000), 401, "not valid here, or it has expired"),
    (lambda mint: mint()[:-4] + "AAAA", 401, "not valid here, or it has expired"),
    (lambda mint: "not a token", 401, "not valid here"),
    (lambda mint: "", 400, "Paste the token"),
    (lambda mint: "x" * 9000, 400, "Paste the token"),
])
def test_a_bad_expired_or_non_officer_token_gets_no_session(browse, officer_token, make, status, says) -> None:
    web = browse()
    response = sign_in(web, make(officer_token))
    assert response.status_code == status and says in text(response.text)
    assert "console_session" not in response.headers.get("set-cookie", "")
    assert web.get("/budgets").status_code == 303


def test_the_officer_roles_are_the_policys(served, browse, make_console, officer_token) -> None:
    loaded = load_policy(served.policy)
    dump_policy(with_policy(loaded.policy, officer_roles=("privacy-officer",)), served.policy)
    web = browse(make_console())
    refused = sign_in(web, officer_token(role="officer"))
    assert refused.status_code == 403 and "officer roles are: privacy-officer" in text(refused.text)
    assert sign_in(web, officer_token(role="privacy-officer")).status_code == 303


def test_a_sign_in_form_must_come_from_the_console_itself(browse, officer_token) -> None:
    web = browse()
    web.get("/sign-in")
    no_form_token = web.post("/sign-in", data={"token": officer_token()})
    assert no_form_token.status_code == 403 and "not sent from this console" in text(no_form_token.text)
    page = web.get("/sign-in")
    cross_site = web.post("/sign-in", data={"form_token": form_token(page.text), "token": officer_token()},
                          headers={"sec-fetch-site": "cross-site"})
    assert cross_site.status_code == 403 and "only from this console" in text(cross_site.text)
    as_json = web.post("/sign-in", content=json.dumps({"token": "x"}), headers={"content-type": "application/json"})
    assert as_json.status_code == 415
    huge = web.post("/sign-in", content=b"token=" + b"a" * 20_000,
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert huge.status_code == 413
    assert web.get("/budgets").status_code == 303


def test_the_one_time_link_signs_in_once(browse, make_console) -> None:
    links = SignInLinks()
    code = links.issue()
    web = browse(make_console(links))
    assert web.get(f"/sign-in/link?code={code}").headers["location"] == "/budgets"
    assert web.get("/budgets").status_code == 200
    again = browse(make_console(links)).get(f"/sign-in/link?code={code}")
    assert again.status_code == 403 and "works once" in text(again.text)
    for bad in ("", "guess", "x" * 500):
        assert browse(make_console(links)).get(f"/sign-in/link?code={bad}").status_code == 403


def test_an_expired_link_and_a_console_without_links_refuse(browse, make_console) -> None:
    expired = SignInLinks(seconds=0)
    assert browse(make_console(expired)).get(f"/sign-in/link?code={expired.issue()}").status_code == 403
    issued = SignInLinks().issue()
    assert browse(make_console(None)).get(f"/sign-in/link?code={issued}").status_code == 403


def test_sign_out_ends_the_session_on_the_server(browse, officer_token) -> None:
    web = browse()
    sign_in(web, officer_token())
    cookie = web.cookies.get("console_session")
    page = web.get("/budgets").text
    forged = web.post("/sign-out", data={"form_token": "wrong"})
    assert forged.status_code == 403 and web.get("/budgets").status_code == 200
    assert web.post("/sign-out", data={"form_token": form_token(page)}).headers["location"] == "/sign-in"
    web.cookies.set("console_session", cookie)  # the old cookie, replayed
    assert web.get("/budgets").status_code == 303


def test_pages_carry_security_headers_and_are_not_stored(browse, officer_token) -> None:
    web = browse()
    sign_in(web, officer_token())
    for path in (*PAGES, "/sign-in", "/nowhere"):
        response = web.get(path)
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script" not in csp, path
        assert response.headers["x-frame-options"] == "DENY" and response.headers["cache-control"] == "no-store"
        assert "<script" not in response.text
    assert web.get("/static/console.css").headers["content-type"].startswith("text/css")


def test_budgets_show_limit_spent_remaining_and_a_burn_down_per_budget(browse, officer_token) -> None:
    web = browse()
    sign_in(web, officer_token())
    page = web.get("/budgets").text
    rows = {m.group(1): text(m.group(2)) for m in re.finditer(
        r'<tr>\s*<th scope="row"><a href="#budget-\d+">([^<]+)</a></th>(.*?)</tr>', page, re.S)}
    assert rows["tight"].split()[:5] == ["patients", "(patients,", "treatments)", "1", "0.8"]
    assert " 0.2 " in rows["tight"] and "80%" in rows["tight"] and "lifetime" in rows["tight"]
    assert rows["onc-test"].split()[3:5][1] == "0.5"
    assert page.count("<svg") == len(rows) and 'role="img"' in page
    assert "2 charge(s) since" in text(page) and "0.2 of 1 remaining" in text(page)
    steps = re.findall(r"<tr><td>[^<]+</td><td class=\"num\">([^<]+)</td><td class=\"num\">([^<]+)</td></tr>", page)
    assert ("0.4", "0.6") in steps and ("0.4", "0.2") in steps


def test_the_audit_trail_verifies_filters_searches_and_pages(served, browse, officer_token) -> None:
    web = browse()
    sign_in(web, officer_token())
    page = text(web.get("/audit").text)
    records = audit.records(served.state_dir / "audit.jsonl")
    assert f"Chain intact: all {len(records)} records verify" in page and "2 release record(s) match" not in page
    tight = text(web.get("/audit?project=tight").text)
    assert "3 of" in tight and "budget_exhausted" in tight and "onc-test" not in tight.split("records match")[1]
    refused = text(web.get("/audit", params={"outcome": "budget_exhausted"}).text)
    assert "1 of" in refused and "requested epsilon 0.4" in refused
    assert "1 of" in text(web.get("/audit", params={"q": "AGE_AT_DIAGNOSIS"}).text)  # case-insensitive text search
    assert "0 of" in text(web.get("/audit", params={"since": "2999-01-01"}).text)
    many = text(web.get("/audit", params={"until": "2999-01-01T00:00Z"}).text)
    assert f"{len(records)} of {len(records)}" in many


@pytest.mark.parametrize("query", ["page=abc", "page=0", "since=yesterday", "until=2026-13-01", "colour=red",
                                   "project=a&project=b", "outcome=no%20such", "q=" + "x" * 300, "q=%00"])
def test_malformed_audit_parameters_are_a_400_page_that_says_what_is_accepted(browse, officer_token, query) -> None:
    web = browse()
    sign_in(web, officer_token())
    response = web.get(f"/audit?{query}")
    assert response.status_code == 400 and "Bad request" in response.text and "Traceback" not in response.text


def test_other_pages_refuse_parameters_and_unknown_paths_are_404_pages(browse, officer_token) -> None:
    web = browse()
    sign_in(web, officer_token())
    for path in ("/budgets?x=1", "/policy?x=1", "/reloads?x=1"):
        assert web.get(path).status_code == 400
    assert web.get("/nowhere").status_code == 404 and "Not found" in web.get("/nowhere").text
    assert web.put("/budgets").status_code == 405


def test_audit_pages_hold_fifty_records_newest_first(served, browse, officer_token, token) -> None:
    from tests.helpers.servers import client

    with client(served.site, token, project="onc-test") as c:
        for i in range(55):
            c.query(f"SELECT count(*) FROM patients WHERE age_at_diagnosis > {i}", epsilon=0.01, dry_run=True)
    web = browse()
    sign_in(web, officer_token())
    first, second = web.get("/audit").text, web.get("/audit?page=2").text
    seqs = [int(s) for s in re.findall(r'<tr[^>]*>\s*<td class="num">(\d+)</td>', first)]
    assert len(seqs) == 50 and seqs == sorted(seqs, reverse=True)
    assert 'rel="next"' in first and 'rel="prev"' in second and "page 2 of 2" in text(second)
    assert text(web.get("/audit?page=9").text).count("page 9 of 2") == 1


def test_a_tampered_log_shows_where_the_chain_breaks(served, browse, officer_token) -> None:
    web = browse()
    sign_in(web, officer_token())
    served.site.stop(grace=0)
    assert "Chain intact" in web.get("/audit").text  # read once: the console's copy must not outlive an edit
    log_file = served.state_dir / "audit.jsonl"
    lines = log_file.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["project"] = "someone-else"
    lines[1] = json.dumps(edited, sort_keys=True)
    log_file.write_text("\n".join(lines) + "\n")
    page = text(web.get("/audit").text)
    assert "Chain broken at record 2:" in page and "line 2: record was modified" in page


def test_the_policy_page_says_what_each_project_may_do_and_what_it_costs(browse, officer_token) -> None:
    web = browse()
    sign_in(web, officer_token())
    page = text(web.get("/policy").text)
    assert "The guarantee to each patient" in page and "Officer roles (may sign in here): officer" in page
    tight = re.search(r"tight patients \S+ 1 lifetime ([\d.]+) / ([\d.]+) (\d+)", page)
    assert tight, page[:2000]
    assert Fraction(tight.group(3)) == int(1 / Fraction(tight.group(1)))
    assert "Columns of patients" in page and "Budget rules in order" in page


def test_reloads_show_accepted_diffs_and_refused_reasons(served, browse, officer_token) -> None:
    good = load_policy(served.policy).policy
    log_file = served.state_dir / "audit.jsonl"
    web = browse()  # started on the good policy: a console does not start on one that does not load
    sign_in(web, officer_token())
    dump_policy(with_policy(good, population_caps={"patients": {"epsilon": Fraction(50), "period": "365d"}}),
                served.policy)
    wait_for(lambda: any(r.get("event") == "policy_reload" for r in audit.records(log_file)))
    served.policy.write_text(served.policy.read_text() + "\nunknown_key: 1\n")
    wait_for(lambda: sum(r.get("event") == "policy_reload" for r in audit.records(log_file)) == 2)
    page = web.get("/reloads").text
    assert page.index(": refused") < page.index(": accepted")  # newest first
    assert "unknown_key" in text(page) and "population_caps" in text(page) and 'class="budget"' in page
    current = text(web.get("/budgets").text)
    assert "The policy file on disk does not load" in current and "unknown_key" in current


def test_a_missing_ledger_is_a_503_page_that_says_what_to_check(tmp_path, served, officer_verifier, officer_token):
    from starlette.testclient import TestClient

    from gateway.console import Console, build_app
    from gateway.console._readers import PolicyReader

    empty = tmp_path / "empty-state"
    empty.mkdir()
    web = TestClient(build_app(Console(PolicyReader(served.policy), empty, officer_verifier, None)),
                     follow_redirects=False)
    sign_in(web, officer_token())
    response = web.get("/budgets")
    assert response.status_code == 503 and "no ledger at" in text(response.text)
    assert web.get("/audit").status_code == 200  # no log yet: an empty, intact trail


def test_a_population_cap_is_a_budget_row_over_all_projects(start_site, token, tmp_path, site_data, officer_verifier,
                                                            officer_token) -> None:
    from starlette.testclient import TestClient

    from gateway.console import Console, build_app
    from gateway.console._readers import PolicyReader
    from tests.console.conftest import run_queries
    from tests.helpers.policies import write_policy

    policy = write_policy(tmp_path, site_data)
    dump_policy(with_policy(load_policy(policy).policy,
                            population_caps={"patients": {"epsilon": Fraction(20), "period": "30d"}}), policy)
    site = start_site(policy=policy)
    run_queries(site, token)
    web = TestClient(build_app(Console(PolicyReader(policy), site.state.state_dir, officer_verifier, None)),
                     follow_redirects=False)
    sign_in(web, officer_token())
    page = text(web.get("/budgets").text)
    cap = re.search(r"all projects \(cap\) patients \(patients, treatments\) 20 ([\d.]+) ([\d.]+) \S+ \S+ 30d", page)
    assert cap and (cap.group(1), cap.group(2)) == ("1.3", "18.7")


def test_too_many_failed_sign_ins_in_a_minute_are_refused_for_a_while(browse, officer_token) -> None:
    web = browse()
    for _ in range(21):
        assert sign_in(web, "not a token").status_code == 401
    throttled = sign_in(web, officer_token())
    assert throttled.status_code == 429 and "Wait a minute" in text(throttled.text)
    assert web.get("/budgets").status_code == 303


def test_a_session_ends_when_its_time_is_up(browse, make_console, officer_token) -> None:
    from gateway.console._sessions import Sessions

    console = make_console(SignInLinks(), sessions=Sessions(seconds=0))
    web = browse(console)
    assert sign_in(web, officer_token()).status_code == 303
    assert web.get("/budgets").status_code == 303  # expired at once: sign in again

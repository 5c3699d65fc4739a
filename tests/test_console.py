"""`apprentice console` without a browser: operators and their file, the login and its session,
CSRF on every POST, the read-only role, decisions through loop/promotion.py with its refusals, the
review queue through loop/production.py, and every page rendered from a store that real policies
were evaluated into (tests/test_console_browser.py drives the same app in Chromium)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from environments.builtin import build_packs
from loop.evaluate import evaluate
from loop.gate import gate
from loop.metrics import report
from loop.promotion import record_gate
from loop.records import outcomes_of, record_eval
from ops.cli import main
from ops.console import Console, Operator, OperatorsError, add_operator, create_app, load_operators, token_hash
from policies.policy import baseline
from store import AdapterRow, CorrectionRow, EpisodeRow, StepRow, Store, TraceRow

HELDOUT = [p for p in build_packs(0) if p.company.split == "heldout"]
TOKENS = {"ana": "ana-token-0123456789", "lee": "lee-token-0123456789"}
OPERATORS = [Operator("ana", "operator", token_hash(TOKENS["ana"])), Operator("lee", "read-only", token_hash(TOKENS["lee"]))]


def seed_store(db: Path, adapters_dir: Path, tickets: int = 12) -> None:
    """A store as the daemon leaves it: the base model and two versions evaluated on the held-out
    companies' tickets (real episodes, steps and checker verdicts: the oracle plays v0001, which
    passes the gate; always-escalate plays v0002, which fails it), and one production correction
    waiting for review."""
    store = Store.open(db)
    record_eval(store, "student", HELDOUT, evaluate(baseline("keyword"), HELDOUT, limit=tickets, progress=False))
    base = outcomes_of(store.evaluations("base"))
    for version, policy in (("v0001", "oracle"), ("v0002", "always-escalate")):
        store.add_adapter(AdapterRow(version=version, parent=None, path=str(adapters_dir / version), base_model="tiny", status="candidate",
                                     config={"sources": {"demonstration": 60, "simulation": 25}}))
        record_eval(store, "student", HELDOUT, evaluate(baseline(policy), HELDOUT, limit=tickets, progress=False), adapter_version=version)
        candidate = outcomes_of(store.evaluations(version))
        record_gate(store, version, gate(candidate, base), baseline="base", metrics=report(candidate).as_json(), auto_approve=False)
    pack = HELDOUT[0]
    ticket = pack.tickets[0]
    step = {"thought": "", "action": "escalate", "args": {"reason": "likely_bug"}, "message": "Passing you on."}
    raw = json.dumps({"id": "prod-1", "company": pack.id, "opening": ticket.opening, "steps": [{"action": step, "observation": ""}]})
    store.add_trace(TraceRow(id="prod-1", company_id=pack.id, format="native", raw=raw, status="review", failure_note="should have searched"))
    episode = store.add_episode(EpisodeRow(run_kind="production", policy="production", company_id=pack.id, ticket_id=None, trace_id="prod-1",
                                           outcome="failure_reported", resolved=None, escalated=True, should_escalate=None),
                                [StepRow(idx=0, raw="{}", action=step, valid=True, acceptable=None, verdict="", observation="")])
    store.add_correction(CorrectionRow(episode_id=episode, step_idx=0, student_raw="{}", student_action=step, teacher="openai/t",
                                       teacher_action={"thought": "look it up", "action": "search_kb", "args": {"query": "refund"}, "message": ""},
                                       rationale="the KB answers this", verified=False, status="review"))
    store.close()


@pytest.fixture
def store_path(tmp_path):
    db = tmp_path / "apprentice.db"
    seed_store(db, tmp_path / "adapters")
    return db


@pytest.fixture
def client(store_path):
    return TestClient(create_app(Console(store_path, OPERATORS, HELDOUT)))


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def login(client: TestClient, name: str) -> str:
    """Log in as `name`; returns the session's CSRF token (from the overview page's forms)."""
    page = client.get("/login")
    response = client.post("/login", data={"token": TOKENS[name], "csrf": csrf_of(page.text), "next": "/"})
    assert response.status_code == 200 and f"{name} " in response.text
    return csrf_of(response.text)


def test_without_a_session_pages_redirect_to_login_and_the_api_answers_401(client, store_path):
    response = client.get("/compare?candidate=v0001", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login?next=/compare%3Fcandidate%3Dv0001"
    assert client.get("/api/status").status_code == 401
    assert client.post("/adapters/v0001/approve", data={"note": "x"}, follow_redirects=False).status_code == 303
    assert [d.action for d in Store.open(store_path).decisions()] == ["gate", "gate"]


def test_login_needs_a_known_token_and_the_forms_csrf(client, store_path):
    page = client.get("/login")
    assert client.post("/login", data={"token": TOKENS["ana"], "csrf": "forged"}).status_code == 403
    wrong = client.post("/login", data={"token": "guess", "csrf": csrf_of(page.text)})
    assert wrong.status_code == 401 and "unknown token" in wrong.text
    response = client.post("/login", data={"token": TOKENS["ana"], "csrf": csrf_of(page.text), "next": "/decisions"})
    assert response.url.path == "/decisions" and "ana" in response.text
    cookie = response.history[0].headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert client.get("/api/decisions").status_code == 200  # the session cookie works for the API too
    assert TestClient(client.app).get("/api/status", headers={"Authorization": f"Bearer {TOKENS['lee']}"}).json()["promoted"] == "base"
    client.post("/logout", data={"csrf": csrf_of(client.get("/").text)})
    assert client.get("/", follow_redirects=False).status_code == 303 and client.get("/api/status").status_code == 401


def test_every_page_renders_from_the_store(client):
    login(client, "ana")
    overview = client.get("/").text
    assert "Awaiting approval" in overview and 'href="/compare?candidate=v0001"' in overview and "gate" in overview
    adapters = client.get("/adapters").text
    assert adapters.count('class="pt ') == 3  # J of base, v0001, v0002 with their intervals
    assert "60 demonstration" in adapters and "rejected by gate" in adapters
    compare = client.get("/compare").text  # default: the candidate awaiting approval against the promoted (base)
    assert "<span>v0001</span>" in compare and "<span>base</span>" in compare
    for company in ("tunewave", "wayfarer-trips"):
        assert f"<caption>{company} " in compare
    assert 'class="num better"' in compare  # the oracle's ΔJ interval lies above 0
    assert compare.count('<details class="ticket">') > 0 and "checker:" in compare
    assert "escalation recall by reason" in compare
    review = client.get("/review").text
    assert "should have searched" in review and "the KB answers this" in review
    assert "gate" in client.get("/decisions").text


def test_approve_goes_through_promotion_with_the_clis_refusals(client, store_path):
    csrf = login(client, "ana")
    refused = client.post("/adapters/v0002/approve", data={"csrf": csrf, "note": "looks fine", "next": "/compare?candidate=v0002"})
    assert "refused: v0002 is rejected_by_gate" in refused.text and "approve it anyway with --force" in refused.text
    no_note = client.post("/adapters/v0002/approve", data={"csrf": csrf, "force": "on", "next": "/adapters"})
    assert "refused: --force needs a --note saying why" in no_note.text
    assert "refused: the console asks for a note" in client.post("/adapters/v0001/approve", data={"csrf": csrf}).text
    store = Store.open(store_path)
    assert [d.action for d in store.decisions()] == ["gate", "gate"] and store.promoted_version() is None

    done = client.post("/adapters/v0001/approve", data={"csrf": csrf, "note": "J up, paired", "next": "/compare?candidate=v0001"})
    assert "v0001 promoted by ana" in done.text
    forced = client.post("/adapters/v0002/approve", data={"csrf": csrf, "note": "to watch the swap", "force": "on"})
    assert "v0002 promoted by ana" in forced.text
    back = client.post("/rollback", data={"csrf": csrf, "note": "v0002 escalates everything"})
    assert "promoted: v0001 (rolled back by ana)" in back.text
    assert "refused: v0001 is promoted: use `apprentice rollback`" in client.post("/adapters/v0001/reject", data={"csrf": csrf, "note": "no"}).text
    assert [(d.adapter_version, d.action, d.by, d.note) for d in store.decisions()][2:] == [
        ("v0001", "approve", "ana", "J up, paired"), ("v0002", "approve_forced", "ana", "to watch the swap"),
        ("v0001", "rollback", "ana", "v0002 escalates everything")]
    assert store.promoted_version() == "v0001"


def test_every_post_needs_the_sessions_csrf_token(client, store_path):
    login(client, "ana")
    for path in ("/adapters/v0001/approve", "/adapters/v0001/reject", "/rollback", "/review/1/accept", "/logout"):
        response = client.post(path, data={"note": "n", "csrf": "forged"})
        assert response.status_code == 403 and "CSRF" in response.text
    assert len(Store.open(store_path).decisions()) == 2  # the gate's two


def test_read_only_operator_sees_but_cannot_decide(client, store_path):
    csrf = login(client, "lee")
    assert "Read-only: you can look, not decide." in client.get("/compare?candidate=v0001").text
    assert 'action="/adapters/v0001/approve"' not in client.get("/compare?candidate=v0001").text
    for path in ("/adapters/v0001/approve", "/adapters/v0002/reject", "/review/1/accept"):
        response = client.post(path, data={"csrf": csrf, "note": "mine"})
        assert response.status_code == 403 and "lee is a read-only operator" in response.text
    assert Store.open(store_path).promoted_version() is None and len(Store.open(store_path).decisions()) == 2


def test_review_queue_decisions_match_apprentice_review(client, store_path):
    csrf = login(client, "ana")
    assert "refused: a rejection needs a --note" in client.post("/review/1/reject", data={"csrf": csrf}).text
    assert "correction 1 accepted by ana" in client.post("/review/1/accept", data={"csrf": csrf, "note": "the KB has it"}).text
    assert "refused: no correction 1 waits for review" in client.post("/review/1/accept", data={"csrf": csrf}).text
    store = Store.open(store_path)
    assert store.decisions()[-1].action == "review_accept" and store.decisions()[-1].by == "ana"
    (example,) = store.examples(source="production")
    assert '"search_kb"' in example.messages[-1]["content"]  # the teacher's replacement is the trained step


def test_calibration_plot_shows_only_where_the_file_exists(client, store_path):
    login(client, "ana")
    assert "/adapters/v0001/calibration.png" not in client.get("/compare?candidate=v0001").text
    assert client.get("/adapters/v0001/calibration.png").status_code == 404
    png = Path(Store.open(store_path).adapter("v0001").path) / "calibration.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert '<img src="/adapters/v0001/calibration.png"' in client.get("/compare?candidate=v0001").text
    assert client.get("/adapters/v0001/calibration.png").content.startswith(b"\x89PNG")


def test_operators_file(tmp_path):
    path = tmp_path / "operators.toml"
    assert load_operators(path) == []
    token = add_operator(path, "ana", "operator")
    add_operator(path, "lee", "read-only")
    assert [(o.name, o.role) for o in load_operators(path)] == [("ana", "operator"), ("lee", "read-only")]
    assert load_operators(path)[0].token_sha256 == token_hash(token) and token not in path.read_text()
    assert path.stat().st_mode & 0o077 == 0
    with pytest.raises(OperatorsError, match="already an operator"):
        add_operator(path, "ana", "operator")
    path.write_text('[[operator]]\nname = "x"\nrole = "admin"\ntoken_sha256 = "00"\n')
    with pytest.raises(OperatorsError, match="role must be one of"):
        load_operators(path)
    with pytest.raises(OperatorsError, match="no operator is defined"):
        Console(tmp_path / "a.db", [], [])


def test_cli_adds_operators_and_refuses_to_start_without_one(tmp_path, store_path):
    ops_file = tmp_path / "ops.toml"
    args = ["--db", str(store_path), "--set", f"operators_file={ops_file}"]
    refused = CliRunner().invoke(main, ["console", *args])
    assert refused.exit_code == 2 and "no operator is defined" in refused.output
    added = CliRunner().invoke(main, ["console", *args, "add-operator", "ana"])
    token = added.output.strip().splitlines()[-1]
    assert added.exit_code == 0 and load_operators(ops_file)[0].token_sha256 == token_hash(token)


def test_overview_shows_a_daemon_running_on_the_same_store(client, store_path):
    """The daemon holds the store's lock and beats in `meta`; the console only reads both."""
    from datetime import datetime, timezone

    from loop.daemon import lock_store
    from loop.status import HEARTBEAT_KEY

    login(client, "ana")
    assert "stopped" in client.get("/").text
    lock = lock_store(store_path)
    try:
        Store.open(store_path).set_meta(HEARTBEAT_KEY, json.dumps({"pid": 1, "at": datetime.now(timezone.utc).isoformat()}))
        page = client.get("/").text
        assert '<p class="big">running</p>' in page and re.search(r"last heartbeat \d+ s ago", page)
    finally:
        lock.close()

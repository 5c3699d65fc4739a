"""Store tests: schema, atomicity (including a SIGKILLed writer), dedupe, promotion. Real SQLite, temp files."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from store import (
    MIGRATIONS,
    AdapterRow,
    CompanyRow,
    CorrectionRow,
    DecisionRow,
    EpisodeRow,
    EvaluationRow,
    ExampleRow,
    StepRow,
    Store,
    TicketRow,
    TraceRow,
    migrate,
)

REPO = Path(__file__).resolve().parents[1]
TABLES = ("companies", "tickets", "episodes", "steps", "corrections", "examples", "traces", "adapters",
          "evaluations", "decisions", "events", "meta")  # fmt: skip


def seed(store: Store) -> None:
    store.upsert_companies([
        CompanyRow(id="acme", name="Acme", domain="saas", split="train"),
        CompanyRow(id="tripco", name="TripCo", domain="travel", split="heldout"),
    ])  # fmt: skip
    store.upsert_tickets([
        TicketRow(company_id="acme", id="t1", opening="Refund?", truth={"resolution": "reply", "facts": ["30 days"]}),
        TicketRow(company_id="tripco", id="t1", opening="Hacked!", truth={"resolution": "escalate"}),
    ])  # fmt: skip


def episode(company_id: str = "acme", ticket_id: str | None = "t1", **fields) -> EpisodeRow:
    return EpisodeRow(
        run_kind=fields.pop("run_kind", "rollout"), policy="student", company_id=company_id, ticket_id=ticket_id,
        outcome="resolved", resolved=True, escalated=False, should_escalate=False, **fields,
    )  # fmt: skip


def steps(n: int, raw: str = '{"action": "reply"}') -> list[StepRow]:
    return [
        StepRow(idx=i, raw=raw, action={"action": "reply", "args": {}}, valid=i % 2 == 0, acceptable=True,
                verdict="ok", observation=f"obs {i}")
        for i in range(n)
    ]  # fmt: skip


def example(text: str, company_id: str = "acme", source: str = "simulation") -> ExampleRow:
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": '{"action": "reply"}'}]
    return ExampleRow(source=source, company_id=company_id, messages=messages, has_escalation=False)


def counts(store: Store) -> dict[str, int]:
    return {table: store.count(table) for table in TABLES}


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path / "apprentice.db") as store:
        seed(store)
        yield store


def test_migrations_apply_to_an_empty_file_once(tmp_path: Path):
    path = tmp_path / "fresh.db"
    Store.open(path).close()
    with Store.open(path) as store:  # second open: nothing to apply, no error
        assert migrate(store.db) == []
        names = [r["name"] for r in store.db["_migrations"].rows_where(order_by="rowid")]
        assert set(TABLES) <= set(store.db.table_names())
    assert names == [m.__name__ for m in MIGRATIONS]


def test_file_database_uses_wal_foreign_keys_and_busy_timeout(store: Store):
    assert store.db.journal_mode == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000


def test_memory_database_works():
    with Store.open(":memory:") as store:
        seed(store)
        episode_id = store.add_episode(episode(), steps(2))
        assert [s.idx for s in store.steps(episode_id)] == [0, 1]


def test_episode_round_trips_with_counts_set_from_steps(store: Store):
    written = steps(3)
    episode_id = store.add_episode(episode(round=2, adapter_version="v0001"), written)
    (stored,) = store.episodes(round=2)
    assert stored.id == episode_id and (stored.n_steps, stored.n_valid) == (3, 2)
    assert stored.resolved is True and stored.should_escalate is False
    assert store.steps(episode_id) == [replace(s, episode_id=episode_id) for s in written]
    assert store.episodes(adapter_version="v0002") == []


def test_foreign_keys_reject_unknown_company_and_ticket(store: Store):
    before = counts(store)
    with pytest.raises(sqlite3.IntegrityError):
        store.add_episode(episode(company_id="nobody"), steps(2))
    with pytest.raises(sqlite3.IntegrityError):
        store.add_episode(episode(ticket_id="no-such-ticket"), steps(2))
    assert counts(store) == before
    # A production episode has no ticket: the composite key is then not checked.
    store.add_trace(TraceRow(id="tr-1", format="native", raw="{}", status="accepted", company_id="acme"))
    store.add_episode(episode(ticket_id=None, trace_id="tr-1", run_kind="production"), steps(1))


def test_add_episode_is_all_or_nothing(store: Store):
    bad = steps(2) + [steps(1)[0]]  # the 3rd step repeats idx 0: primary key violation
    before = counts(store)
    with pytest.raises(sqlite3.IntegrityError):
        store.add_episode(episode(), bad)
    assert counts(store) == before


def test_exception_inside_transaction_rolls_back_every_write(store: Store):
    before = counts(store)
    with pytest.raises(RuntimeError), store.transaction():
        store.add_episode(episode(), steps(4))
        assert store.add_examples([example("a"), example("b")]) == 2
        store.log_event("halfway")
        raise RuntimeError("crash between writes")
    assert counts(store) == before


def test_nested_transaction_failure_undoes_only_the_inner_block(store: Store):
    with store.transaction():
        kept = store.add_episode(episode(), steps(1))
        with pytest.raises(sqlite3.IntegrityError):
            store.add_episode(episode(), steps(2) + steps(1))  # savepoint rolled back
    assert [e.id for e in store.episodes()] == [kept] and store.count("steps") == 1


CRASHING_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from test_store import episode, example, steps
    from store import Store

    store = Store.open(sys.argv[1])
    store.add_episode(episode(), steps(1))  # committed before the crash
    with store.transaction():
        store.add_episode(episode(), steps(2000, raw="x" * 2000))  # ~4 MB: spills into the WAL
        store.add_examples([example(str(i)) for i in range(50)])
        store.log_event("half-written")
        print("IN_TRANSACTION", flush=True)
        time.sleep(60)
""")


def test_sigkilled_writer_leaves_no_partial_rows(tmp_path: Path):
    path = tmp_path / "crash.db"
    with Store.open(path) as store:
        seed(store)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(path), str(Path(__file__).parent)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = writer.stdout.readline()
        assert line.strip() == "IN_TRANSACTION", writer.stderr.read()
        # Uncommitted pages already reached the disk, so recovery has something to throw away.
        assert Path(f"{path}-wal").stat().st_size > 1_000_000
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=10) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.stdout.close()
        writer.stderr.close()
    with Store.open(path) as store:
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert [e.n_steps for e in store.episodes()] == [1]
        assert (store.count("steps"), store.count("examples"), store.count("events")) == (1, 0, 0)


def test_examples_dedupe_by_content_hash(store: Store):
    first = example("a")
    assert store.add_examples([first, example("b"), example("a")]) == 2  # duplicate within the batch
    assert store.examples()[0] == replace(first, id=1)
    assert store.add_examples([example("b"), example("c", company_id="tripco", source="production")]) == 1
    assert [e.messages[0]["content"] for e in store.examples()] == ["a", "b", "c"]
    assert [e.messages[0]["content"] for e in store.examples(exclude_companies=["tripco"])] == ["a", "b"]
    assert [e.company_id for e in store.examples(source="production")] == ["tripco"]
    with pytest.raises(ValueError):
        store.add_examples([example("d", source="made-up")])
    assert store.count("examples") == 3


def test_corrections_traces_and_events_read_back(store: Store):
    episode_id = store.add_episode(episode(), steps(2))
    correction = CorrectionRow(
        episode_id=episode_id, step_idx=1, student_raw="not json", student_action=None, teacher="oracle",
        teacher_action={"action": "escalate", "args": {"reason": "security_sensitive"}}, verified=True,
        status="accepted", prompt_tokens=120, completion_tokens=30, cost_usd=0.0012, round=3,
    )  # fmt: skip
    correction_id = store.add_correction(correction)
    assert store.corrections(episode_id=episode_id) == [replace(correction, id=correction_id)]
    store.set_correction_status(correction_id, "rejected")
    assert store.corrections(status="rejected")[0].id == correction_id

    trace = TraceRow(id="tr-9", format="openai", raw='{"messages": []}', status="accepted", company_id="acme",
                     source_file="inbox/a.jsonl", line_no=4)  # fmt: skip
    assert store.add_trace(trace) is True
    assert store.add_trace(TraceRow(id="tr-9", format="native", raw="other", status="accepted")) is False
    store.set_trace_status("tr-9", "rejected", error="no assistant turn")
    stored = store.trace("tr-9")
    assert (stored.raw, stored.status, stored.error) == (trace.raw, "rejected", "no assistant turn")
    with pytest.raises(KeyError):
        store.set_trace_status("missing", "rejected")

    store.log_event("round_done", round=3, examples=12)
    assert [e.payload for e in store.events(kind="round_done")] == [{"round": 3, "examples": 12}]


def add_adapter(store: Store, version: str, parent: str | None = None) -> None:
    store.add_adapter(AdapterRow(version=version, parent=parent, path=f"adapters/{version}", base_model="smol",
                                 status="training", config={"r": 8}))  # fmt: skip


def test_adapter_status_transitions_are_stored(tmp_path: Path):
    path = tmp_path / "a.db"
    with Store.open(path) as store:
        assert store.next_adapter_version() == "v0001"
        add_adapter(store, "v0001")
        with pytest.raises(sqlite3.IntegrityError):
            add_adapter(store, store.next_adapter_version(), parent="v0404")  # parent must exist
        created = store.adapter("v0001")
        store.set_adapter_status("v0001", "candidate", train_metrics={"loss": 0.4})
        store.set_adapter_status("v0001", "awaiting_approval", metrics={"J": 0.7}, gate_reason="ΔJ=+0.1")
        with pytest.raises(ValueError):
            store.set_adapter_status("v0001", "bogus")  # type: ignore[arg-type]
        with pytest.raises(KeyError):
            store.set_adapter_status("v0404", "candidate")
        add_adapter(store, store.next_adapter_version(), parent="v0001")
    with Store.open(path) as store:
        a = store.adapter("v0001")
        assert (a.status, a.train_metrics, a.metrics, a.gate_reason, a.config) == (
            "awaiting_approval", {"loss": 0.4}, {"J": 0.7}, "ΔJ=+0.1", {"r": 8})  # fmt: skip
        assert a.updated_at > created.updated_at and a.created_at == created.created_at
        assert [x.version for x in store.adapters(status="training")] == ["v0002"]
        assert store.adapter("v0002").parent == "v0001" and store.next_adapter_version() == "v0003"


def test_set_promoted_moves_pointer_statuses_and_decision_together(store: Store):
    add_adapter(store, "v0001")
    add_adapter(store, "v0002", parent="v0001")
    assert store.promoted_version() is None
    store.set_promoted("v0001", by="ana", note="looks good")
    store.set_promoted("v0002", by="ana", note="better J")
    assert store.promoted_version() == "v0002"
    assert [(a.version, a.status) for a in store.adapters()] == [("v0001", "retired"), ("v0002", "promoted")]
    assert [(d.adapter_version, d.action, d.by) for d in store.decisions()] == [
        ("v0001", "approve", "ana"), ("v0002", "approve", "ana")]  # fmt: skip

    before = (store.promoted_version(), store.adapters(), store.decisions())
    with pytest.raises(KeyError):
        store.set_promoted("v0404", by="ana", note="typo")

    def fail(row: DecisionRow) -> int:
        raise RuntimeError("disk full")

    store.add_decision = fail  # the last write of set_promoted fails: the earlier ones must not stay
    with pytest.raises(RuntimeError):
        store.set_promoted("v0001", by="bob", note="rollback", action="rollback")
    del store.add_decision
    assert (store.promoted_version(), store.adapters(), store.decisions()) == before

    store.set_promoted("v0001", by="bob", note="rollback", action="rollback")
    store.set_promoted(None, by="bob", note="back to base", action="rollback")
    assert store.promoted_version() is None
    assert {a.status for a in store.adapters()} == {"retired"}
    assert store.decisions(adapter_version="v0001")[-1].note == "rollback"


def test_evaluations_pair_by_ticket_and_replace_on_rerun(store: Store):
    def row(version: str, company_id: str, escalated: bool) -> EvaluationRow:
        episode_id = store.add_episode(episode(company_id=company_id, run_kind="eval"), steps(1))
        return EvaluationRow(
            adapter_version=version, company_id=company_id, ticket_id="t1", episode_id=episode_id,
            escalated=escalated, should_escalate=company_id == "tripco", reason_correct=None, first_action_ok=True,
            resolved=not escalated, n_steps=1, n_acceptable=1, n_outputs=1, n_valid=1,
        )  # fmt: skip

    store.add_evaluations([row("base", "tripco", False), row("base", "acme", False)])
    store.add_evaluations([row("v0001", "tripco", True), row("v0001", "acme", True)])
    store.add_evaluations([row("v0001", "acme", False)])  # re-evaluated: replaces, not duplicates
    base, candidate = store.evaluations("base"), store.evaluations("v0001")
    assert [(r.company_id, r.ticket_id) for r in base] == [(r.company_id, r.ticket_id) for r in candidate]
    assert [r.escalated for r in candidate] == [False, True] and store.count("evaluations") == 4
    good, bad = row("v0002", "acme", False), replace(row("v0002", "tripco", False), episode_id=10_000)
    with pytest.raises(sqlite3.IntegrityError):
        store.add_evaluations([good, bad])
    assert store.evaluations("v0002") == []


def test_a_second_connection_reads_while_a_writer_holds_the_lock(store: Store, tmp_path: Path):
    with store.transaction():
        store.add_episode(episode(), steps(1))
        with Store.open(tmp_path / "apprentice.db") as reader:  # opening does not wait for the writer
            assert reader.count("episodes") == 0  # WAL: no blocking, no dirty read
    with Store.open(tmp_path / "apprentice.db") as reader:
        assert reader.count("episodes") == 1


def test_count_rejects_unknown_tables(store: Store):
    with pytest.raises(ValueError):
        store.count("episodes; DROP TABLE steps")

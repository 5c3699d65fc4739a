"""Ingest: both formats, duplicates, every kind of bad line; nothing good is lost."""

import json

from click.testing import CliRunner

from environments.actions import Action
from loop.ingest import MAX_LINE_BYTES, ingest_file, parse_trace
from ops.cli import main
from store import CompanyRow, Store

REPLY = Action(action="reply", message="Refunds take 5 business days.").model_dump()
SEARCH = {"action": "search_kb", "args": {"query": "refunds"}, "message": "", "thought": ""}


def openai_line(tid, company="acme-widgets", **extra):
    return json.dumps({"id": tid, "company": company, "failure_note": "wrong refund window", **extra, "messages": [
        {"role": "system", "content": "You are the support agent."},
        {"role": "user", "content": "Can I return my widget? I bought it 40 days ago."},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "search_kb", "arguments": json.dumps({"query": "refund policy"})}}]},
        {"role": "tool", "content": "[kb-refunds] Refund policy: within 30 days"},
        {"role": "assistant", "content": json.dumps(REPLY)},
    ]})


def native_line(tid):
    return json.dumps({"id": tid, "company": "acme-widgets", "opening": "Where is my order?",
                       "steps": [{"action": SEARCH, "observation": "[kb-shipping] ..."}, {"action": REPLY, "observation": ""}]})


def test_parse_both_formats():
    t = parse_trace(openai_line("a"), {"acme-widgets"})
    assert t.format == "openai" and [a.action for a in t.actions] == ["search_kb", "reply"]
    assert [e.role for e in t.transcript] == ["customer", "agent", "tool", "agent"] and t.failure_note == "wrong refund window"
    n = parse_trace(native_line("b"), {"acme-widgets"})
    assert n.format == "native" and [e.role for e in n.transcript] == ["customer", "agent", "tool", "agent"]


def test_mixed_file_counts_errors_and_reingest(tmp_path):
    bad = {
        "{not json": "not valid JSON",
        openai_line("c1", company="globex"): "unknown company 'globex'",
        json.dumps({"id": "c2", "company": "acme-widgets", "messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "refund_now", "arguments": "{}"}}]}]}): "unknown action 'refund_now'",
        json.dumps({"id": "c3", "company": "acme-widgets", "messages": [{"role": "user", "content": "hi"}]}): "no assistant turn",
        openai_line("c4", padding="x" * MAX_LINE_BYTES): "over the 256000-byte limit",
    }
    lines = [openai_line("g1"), *bad, native_line("g2"), openai_line("g1"), openai_line("g3")]
    path = tmp_path / "traces.jsonl"
    path.write_text("\n".join(lines) + "\n")
    store = Store.open(tmp_path / "a.db")
    from loop.records import register_packs
    from environments.pack import load_pack
    from pathlib import Path

    register_packs(store, [load_pack(Path(__file__).parent / "data" / "acme")])
    summary = ingest_file(store, path, {"acme-widgets"})
    assert (summary.accepted, summary.duplicate, summary.rejected) == (3, 1, 5)
    for lineno, (line, why) in enumerate(bad.items(), start=2):
        (error,) = [e for e in summary.errors if e.startswith(f"traces.jsonl:{lineno}:")]
        assert why in error
    assert {t.id for t in store.traces(status="accepted")} == {"g1", "g2", "g3"}
    assert all(t.raw in lines for t in store.traces())  # the raw payload is always kept
    again = ingest_file(store, path, {"acme-widgets"})
    assert (again.accepted, again.rejected, again.duplicate) == (0, 0, 9) and store.count("traces") == 8


def test_cli_exit_codes(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(openai_line("x1") + "\n{oops\n")
    bad.write_text("{oops\n")
    args = ["--set", "packs=tests/data/acme", "--db", str(tmp_path / "a.db")]
    ok = CliRunner().invoke(main, ["ingest", str(good), *args])
    assert ok.exit_code == 0 and "accepted 1, duplicate 0, conflict 0, rejected 1" in ok.output and "good.jsonl:2: not valid JSON" in ok.output
    nothing = CliRunner().invoke(main, ["ingest", str(bad), *args])
    assert nothing.exit_code == 1
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(openai_line("x1") + "\n" + openai_line("x2") + "\n[]\n")
    as_json = CliRunner().invoke(main, ["ingest", str(mixed), *args, "--json"])
    out = json.loads(as_json.output)
    assert as_json.exit_code == 0 and (out["accepted"], out["duplicate"], out["rejected"]) == (1, 1, 1)
    assert out["errors"] == ["mixed.jsonl:3: a trace must be a JSON object"]


# --- correction of production traces: self-consistency and the review queue ---------------------

from loop.production import correct_traces, decide_review, review_items  # noqa: E402
from policies.teacher import Judgement, Usage  # noqa: E402

ESCALATE = Action(action="escalate", args={"reason": "billing_exception"}, message="A colleague will sort out the refund.")


class QueueTeacher:
    """The real Teacher signature; judge() answers from a queue."""

    name = "queue-teacher"

    def __init__(self, judgements):
        self.queue = list(judgements)

    def judge(self, trajectory, context):
        assert context.ticket is None  # production: no hidden truth
        return self.queue.pop(0)

    def demonstrate(self, prefix, context):
        raise AssertionError("not used")


def ingested(tmp_path, *lines):
    from pathlib import Path

    from environments.pack import load_pack
    from loop.records import register_packs

    pack = load_pack(Path(__file__).parent / "data" / "acme")
    store = Store.open(tmp_path / "p.db")
    register_packs(store, [pack])
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ingest_file(store, path, {pack.id})
    return store, [pack]


def test_agreeing_judgements_become_training_rows(tmp_path):
    store, packs = ingested(tmp_path, openai_line("p1"))
    teacher = QueueTeacher([Judgement(1, ESCALATE, "outside the window", Usage(1, 50, 10, 0.002))] * 2)
    summary = correct_traces(store, teacher, packs, agreements=2, weight=2.0)
    assert (summary.corrected, summary.review) == (1, 0)
    (example,) = store.examples(source="production")
    assert example.weight == 2.0 and example.has_escalation
    assistant = [m["content"] for m in example.messages if m["role"] == "assistant"]
    assert json.loads(assistant[0])["action"] == "search_kb" and json.loads(assistant[-1]) == json.loads(ESCALATE.to_json())
    assert len(assistant) == 2  # prefix + the replacement, nothing after the error
    (correction,) = store.corrections()
    assert correction.status == "accepted" and not correction.verified and correction.cost_usd == 0.004
    assert store.trace("p1").status == "corrected"


def test_disagreeing_judgements_wait_for_review_then_accept_or_reject(tmp_path):
    store, packs = ingested(tmp_path, openai_line("p1"), openai_line("p2"))
    churn = Action(action="escalate", args={"reason": "churn_risk"}, message="Let me get someone.")
    teacher = QueueTeacher([Judgement(1, ESCALATE, "a"), Judgement(1, churn, "b"), Judgement(0, ESCALATE, "c"), Judgement(1, ESCALATE, "d")])
    summary = correct_traces(store, teacher, packs, agreements=2)
    assert (summary.corrected, summary.review) == (0, 2) and store.count("examples") == 0
    first, second = review_items(store)
    decide_review(store, packs, first.id, accept=True, by="ana", note="billing is right")
    decide_review(store, packs, second.id, accept=False, by="ana", note="unsure")
    assert store.count("examples") == 1 and review_items(store) == []
    assert [(d.action, d.by) for d in store.decisions()] == [("review_accept", "ana"), ("review_reject", "ana")]
    assert {store.trace("p1").status, store.trace("p2").status} == {"corrected", "review_rejected"}


def test_cli_ingest_correct_with_a_litellm_teacher(tmp_path, monkeypatch):
    from tests.openai_stub import OpenAIStub

    path = tmp_path / "t.jsonl"
    path.write_text(openai_line("c1") + "\n")
    args = ["ingest", str(path), "--correct", "--set", "packs=tests/data/acme", "--db", str(tmp_path / "a.db")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "needs a litellm teacher" in refused.output
    judgement = json.dumps({"first_error": 1, "replacement": ESCALATE.model_dump(), "rationale": "outside the window"})
    monkeypatch.setenv("STAND_IN_KEY", "test")
    with OpenAIStub() as stub:
        teacher = ["--set", "teacher=openai/stand-in", "--set", f"teacher_api_base={stub.base_url}", "--set", "teacher_redact=false",
                   "--set", "teacher_api_key_env=STAND_IN_KEY"]
        stub.enqueue([judgement] * 4)
        done = CliRunner().invoke(main, [*args, *teacher])
        path.write_text(openai_line("c2") + "\n")
        as_json = CliRunner().invoke(main, [*args, *teacher, "--json"])
    assert done.exit_code == 0, done.output
    assert "corrected 1, review 0, no error 0 (2 teacher calls" in done.output
    assert Store.open(tmp_path / "a.db").trace("c1").status == "corrected"
    out = json.loads(as_json.output)
    assert out["accepted"] == 1 and out["correction"]["corrected"] == 1 and out["correction"]["teacher_calls"] == 2


def test_production_rows_reach_the_next_training(tmp_path, tiny_model_dir):
    """A corrected production trace is in the conversations the next retrain trains on, and the
    adapter records how many examples of each source it saw."""

    from environments.pack import load_pack
    from loop.records import register_packs
    from loop.round import Runtime, RoundSettings, RoundSummary, ensure_base_evaluated, retrain
    from loop.train import LoraSettings, train_adapter
    from policies.hf import HFStudent
    from policies.teacher import OracleTeacher
    from tests.test_round import two_company_packs

    packs_root = two_company_packs(tmp_path / "packs")
    packs = [load_pack(packs_root / "acme"), load_pack(packs_root / "acme-heldout")]
    store, _ = ingested(tmp_path, openai_line("p1"))
    correct_traces(store, QueueTeacher([Judgement(1, ESCALATE, "outside the window")] * 2), packs, agreements=2)
    (production,) = store.examples(source="production")
    trained_on = []

    def train(model_dir, conversations, out_dir, settings):
        trained_on.extend(conversations)
        return train_adapter(model_dir, conversations, out_dir, settings, progress=False)

    rt = Runtime(store=store, packs=packs, student=HFStudent(tiny_model_dir, max_new_tokens=16, batch_size=2),
                 teacher=OracleTeacher(), train=train, model_dir=tiny_model_dir, base_model="tiny",
                 adapters_dir=tmp_path / "adapters", settings=RoundSettings(eval_tickets=1, max_steps=2, escalation_share=0.0),
                 lora=LoraSettings(epochs=1, batch_size=1), progress=False)
    register_packs(store, packs)
    ensure_base_evaluated(rt)
    summary = retrain(rt, 1, RoundSummary(1, "test"))
    assert production.messages in trained_on
    assert summary.trained_on == {"production": 1} and store.adapter(summary.version).config["sources"] == {"production": 1}


# --- every version is kept: a fixed line is accepted, a reused id is a reported conflict ------------


def versions_file(tmp_path, name, *lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_fixed_line_is_accepted_and_its_rejected_version_stays(tmp_path):
    store, packs = ingested(tmp_path)
    broken = native_line("t7").replace('"refunds"', '"refunds"').replace('"search_kb"', '"search_everything"')
    first = ingest_file(store, versions_file(tmp_path, "a.jsonl", broken), {"acme-widgets"})
    assert (first.accepted, first.rejected) == (0, 1) and "a.jsonl:1: steps[0]: invalid action" in first.errors[0]
    fixed = ingest_file(store, versions_file(tmp_path, "b.jsonl", native_line("t7")), {"acme-widgets"})
    assert (fixed.accepted, fixed.fixed, fixed.duplicate, fixed.conflict) == (1, 1, 0, 0)
    old, new = store.trace_versions("t7")
    assert (old.id, old.status, old.raw) == ("t7", "rejected", broken)  # kept for the audit
    assert (new.id, new.status, new.raw) == ("t7#2", "accepted", native_line("t7"))
    assert [t.id for t in store.traces(status="accepted")] == ["t7#2"]  # what the teacher corrects next
    again = ingest_file(store, versions_file(tmp_path, "c.jsonl", broken, native_line("t7")), {"acme-widgets"})
    assert (again.accepted, again.duplicate, again.rejected) == (0, 2, 0) and store.count("traces") == 2


def test_the_issues_reason_code_case_through_the_cli(tmp_path):
    """Issue 15: a line with an unknown reason code, then the same id with the right one."""
    line = json.loads(openai_line("r1"))
    line["messages"][-1]["content"] = json.dumps(ESCALATE.model_dump() | {"args": {"reason": "nope"}})
    args = ["--set", "packs=tests/data/acme", "--db", str(tmp_path / "a.db")]
    bad = CliRunner().invoke(main, ["ingest", str(versions_file(tmp_path, "bad.jsonl", json.dumps(line))), *args])
    assert "accepted 0, duplicate 0, conflict 0, rejected 1" in bad.output
    line["messages"][-1]["content"] = ESCALATE.to_json()
    good = CliRunner().invoke(main, ["ingest", str(versions_file(tmp_path, "good.jsonl", json.dumps(line))), *args])
    assert good.exit_code == 0 and "accepted 1 (1 fixing rejected versions), duplicate 0, conflict 0, rejected 0" in good.output
    assert [t.status for t in Store.open(tmp_path / "a.db").trace_versions("r1")] == ["rejected", "accepted"]


def test_a_reused_id_with_other_content_is_a_reported_conflict(tmp_path):
    store, packs = ingested(tmp_path, openai_line("p1"))
    other = openai_line("p1", failure_note="a different conversation")
    respaced = json.dumps(json.loads(openai_line("p1")), indent=1).replace("\n", " ")  # same content, other spacing
    result = ingest_file(store, versions_file(tmp_path, "later.jsonl", respaced, other, other), {"acme-widgets"})
    assert (result.accepted, result.duplicate, result.conflict, result.rejected) == (0, 2, 1, 0)
    (message,) = result.conflicts
    assert message.startswith("later.jsonl:2: trace id 'p1' is taken by other content: version 'p1' (accepted, from t.jsonl:1)")
    first, conflict = store.trace_versions("p1")
    assert conflict.status == "conflict" and conflict.raw == other and first.status == "accepted"
    # A conflict is never corrected: only the first version goes to the teacher.
    teacher = QueueTeacher([Judgement(1, ESCALATE, "outside the window")] * 2)
    assert correct_traces(store, teacher, packs, agreements=2).corrected == 1 and teacher.queue == []
    assert [e.trace_id for e in store.episodes(run_kind="production")] == ["p1"]
    # Later versions of a corrected trace conflict too, and the counts say so.
    out = CliRunner().invoke(main, ["ingest", str(versions_file(tmp_path, "x.jsonl", openai_line("p1", failure_note="third"))),
                                    "--set", "packs=tests/data/acme", "--db", str(tmp_path / "p.db"), "--json"])
    parsed = json.loads(out.output)
    assert parsed["conflict"] == 1 and parsed["accepted"] == 0 and "version 'p1' (corrected" in parsed["conflicts"][0]
    assert [t.id for t in store.trace_versions("p1")] == ["p1", "p1#2", "p1#3"]


def test_a_line_rejected_for_an_unknown_company_is_accepted_once_the_pack_exists(tmp_path):
    store, _ = ingested(tmp_path)
    path = versions_file(tmp_path, "a.jsonl", openai_line("g1", company="globex"))
    assert ingest_file(store, path, {"acme-widgets"}).rejected == 1
    assert ingest_file(store, path, {"acme-widgets"}).duplicate == 1  # identical and still invalid: a no-op
    store.upsert_companies([CompanyRow(id="globex", name="Globex", domain="saas", split="train")])
    assert ingest_file(store, path, {"acme-widgets", "globex"}).fixed == 1


def test_a_file_is_ingested_whole_or_not_at_all(tmp_path, monkeypatch):
    from loop import ingest
    from loop.ingest import file_digest, ingested_before

    store, _ = ingested(tmp_path)
    path = versions_file(tmp_path, "a.jsonl", openai_line("a1"), openai_line("a2"), openai_line("a3"))
    real, calls = ingest.store_version, []

    def crash_on_the_third(store, row, where=""):
        calls.append(row.id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies mid-file
        return real(store, row, where)

    monkeypatch.setattr(ingest, "store_version", crash_on_the_third)
    try:
        ingest_file(store, path, {"acme-widgets"})
    except KeyboardInterrupt:
        pass
    assert store.count("traces") == 0 and not ingested_before(store, file_digest(path))
    monkeypatch.setattr(ingest, "store_version", real)
    assert ingest_file(store, path, {"acme-widgets"}).accepted == 3 and ingested_before(store, file_digest(path))


def test_the_migration_keeps_old_traces_as_first_versions(tmp_path):
    from store import migrations
    from store.db import connect

    db = connect(tmp_path / "old.db")
    migrations.MIGRATIONS, saved = migrations.MIGRATIONS[:1], migrations.MIGRATIONS
    try:
        migrations.migrate(db)
        db["traces"].insert({"id": "old-1", "format": "native", "raw": "{}", "status": "accepted", "source_file": "x",
                             "created_at": "2026-01-01", "updated_at": "2026-01-01"})
    finally:
        migrations.MIGRATIONS = saved
    db.close()
    store = Store.open(tmp_path / "old.db")
    assert [(t.id, t.trace_id) for t in store.trace_versions("old-1")] == [("old-1", "old-1")]

"""Ingest: both formats, duplicates, every kind of bad line; nothing good is lost."""

import json

from click.testing import CliRunner

from environments.actions import Action
from loop.ingest import MAX_LINE_BYTES, ingest_file, parse_trace
from ops.cli import main
from store import Store

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
    assert ok.exit_code == 0 and "accepted 1, duplicate 0, rejected 1" in ok.output and "good.jsonl:2: not valid JSON" in ok.output
    nothing = CliRunner().invoke(main, ["ingest", str(bad), *args])
    assert nothing.exit_code == 1

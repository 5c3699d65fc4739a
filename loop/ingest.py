"""Production traces in: one JSONL line per trace, validated on its own, raw payload always kept.

Two formats per line:
- OpenAI chat-completions style: {"id", "company", "messages": [...], "failure_note"?}; assistant
  turns carry the action JSON as content, or `tool_calls` whose function names are actions;
- native: {"id", "company", "opening", "steps": [{"action": {...}, "observation": "..."}], "failure_note"?}.

A bad line is stored with status `rejected` and an error naming its line; the good lines go on.
The same trace id twice is stored once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from environments.actions import ACTIONS, Action
from environments.episode import Entry
from policies.protocol import parse_action
from store import Store, TraceRow

MAX_LINE_BYTES = 256_000
_TOOL_ACTIONS = ("search_kb", "create_ticket", "update_ticket")


class TraceError(ValueError):
    pass


@dataclass(frozen=True)
class Trace:
    id: str
    company_id: str
    format: str
    transcript: tuple[Entry, ...]
    actions: tuple[Action, ...]
    failure_note: str | None


@dataclass
class IngestSummary:
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    readable: int = 0  # lines that parsed as a trace, duplicates included
    errors: list[str] = field(default_factory=list)


def _action_from_tool_call(call: dict, content: str) -> Action:
    function = call.get("function") or {}
    name = function.get("name")
    if name not in ACTIONS:
        raise TraceError(f"unknown action {name!r} in tool_calls (expected one of {', '.join(ACTIONS)})")
    arguments = function.get("arguments") or "{}"
    args = json.loads(arguments) if isinstance(arguments, str) else dict(arguments)
    message = args.pop("message", content or "")
    thought = args.pop("thought", "")
    return Action(thought=thought, action=name, args=args, message=message)


def parse_openai_messages(messages: list[dict]) -> tuple[list[Entry], list[Action]]:
    """The transcript and the agent's actions of OpenAI-style messages (system messages are skipped)."""
    transcript, actions = [], []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        if role == "user":
            transcript.append(Entry("customer", content))
        elif role == "tool":
            transcript.append(Entry("tool", content))
        elif role == "assistant":
            try:
                if m.get("tool_calls"):
                    action = _action_from_tool_call(m["tool_calls"][0], content)
                else:
                    parsed = parse_action(content)
                    if parsed.action is None:
                        raise TraceError(f"messages[{i}]: assistant content is not an action: {parsed.error}")
                    action = parsed.action
            except (ValidationError, json.JSONDecodeError) as e:
                raise TraceError(f"messages[{i}]: invalid action: {str(e).splitlines()[0]}") from None
            actions.append(action)
            transcript.append(Entry("agent", action.to_json()))
    return transcript, actions


def _parse_native(obj: dict) -> tuple[list[Entry], list[Action]]:
    transcript, actions = [Entry("customer", str(obj.get("opening", "")))], []
    for i, step in enumerate(obj["steps"]):
        try:
            action = Action.model_validate(step.get("action"))
        except ValidationError as e:
            raise TraceError(f"steps[{i}]: invalid action: {e.errors()[0]['msg']}") from None
        actions.append(action)
        transcript.append(Entry("agent", action.to_json()))
        if step.get("observation"):
            transcript.append(Entry("tool" if action.action in _TOOL_ACTIONS else "customer", str(step["observation"])))
    return transcript, actions


def parse_trace(line: str, companies: set[str]) -> Trace:
    """One trace from one JSONL line, or a TraceError saying what is wrong with it."""
    if len(line.encode()) > MAX_LINE_BYTES:
        raise TraceError(f"line is {len(line.encode())} bytes, over the {MAX_LINE_BYTES}-byte limit")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise TraceError("a trace must be a JSON object")
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        raise TraceError("missing the trace 'id'")
    if obj.get("company") not in companies:
        raise TraceError(f"unknown company {obj.get('company')!r} (known: {', '.join(sorted(companies))})")
    if isinstance(obj.get("messages"), list):
        fmt, (transcript, actions) = "openai", parse_openai_messages(obj["messages"])
    elif isinstance(obj.get("steps"), list):
        fmt, (transcript, actions) = "native", _parse_native(obj)
    else:
        raise TraceError("neither 'messages' (OpenAI format) nor 'steps' (native format)")
    if not actions:
        raise TraceError("no assistant turn: nothing to correct")
    return Trace(obj["id"], obj["company"], fmt, tuple(transcript), tuple(actions), obj.get("failure_note"))


def _peek_id(line: str) -> str:
    """The line's own id when it has one, else a content hash (a bad line twice is stored once)."""
    try:
        obj = json.loads(line)
        if isinstance(obj, dict) and isinstance(obj.get("id"), str) and obj["id"]:
            return obj["id"]
    except json.JSONDecodeError:
        pass
    return "rejected-" + hashlib.sha256(line.encode()).hexdigest()[:16]


def ingest_file(store: Store, path: Path, companies: set[str]) -> IngestSummary:
    """Store every line of `path` (raw kept); count accepted, duplicate and rejected lines."""
    summary = IngestSummary()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                trace = parse_trace(line, companies)
                row = TraceRow(id=trace.id, company_id=trace.company_id, format=trace.format, raw=line, status="accepted",
                               failure_note=trace.failure_note, source_file=str(path), line_no=line_no)
                summary.readable += 1
            except TraceError as e:
                error = f"{path.name}:{line_no}: {e}"
                row = TraceRow(id=_peek_id(line), format="unknown", raw=line, status="rejected", error=error,
                               source_file=str(path), line_no=line_no)
            if not store.add_trace(row):
                summary.duplicate += 1
            elif row.status == "accepted":
                summary.accepted += 1
            else:
                summary.rejected += 1
                summary.errors.append(row.error or "")
    return summary

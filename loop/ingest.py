"""Production traces in: one JSONL line per trace, validated on its own, raw payload always kept.

Two formats per line:
- OpenAI chat-completions style: {"id", "company", "messages": [...], "failure_note"?}; assistant
  turns carry the action JSON as content, or `tool_calls` whose function names are actions;
- native: {"id", "company", "opening", "steps": [{"action": {...}, "observation": "..."}], "failure_note"?}.

A bad line is stored with status `rejected` and an error naming its line; the good lines go on.
Every version of a trace id is kept: the same content twice is stored once; a valid line whose id
was only ever rejected is accepted (its fix); a valid line whose id is already accepted with other
content is stored as a `conflict`, reported and never used.
"""

from __future__ import annotations

import hashlib
import json
import dataclasses
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
    accepted: int = 0  # new traces, fixes included
    fixed: int = 0  # of the accepted: ids that had only rejected versions before (those stay, for the audit)
    duplicate: int = 0  # content some version of the id already has: nothing stored
    conflict: int = 0  # valid content under an id already accepted with other content: stored, never used
    rejected: int = 0
    readable: int = 0  # lines that parsed as a trace, duplicates and conflicts included
    errors: list[str] = field(default_factory=list)  # one per rejected line
    conflicts: list[str] = field(default_factory=list)  # one per conflict

    def counts(self) -> dict[str, int]:
        return {"accepted": self.accepted, "fixed": self.fixed, "duplicate": self.duplicate, "conflict": self.conflict,
                "rejected": self.rejected}

    def add(self, other: IngestSummary) -> None:
        for name in (*self.counts(), "readable"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors += other.errors
        self.conflicts += other.conflicts


def _action_from_tool_call(call: object, content: str) -> Action:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise TraceError("tool_calls[0] has no 'function' object")
    name = function.get("name")
    if name not in ACTIONS:
        raise TraceError(f"unknown action {name!r} in tool_calls (expected one of {', '.join(ACTIONS)})")
    arguments = function.get("arguments") or "{}"
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    if not isinstance(args, dict):
        raise TraceError(f"the arguments of tool call {name!r} are not a JSON object")
    args = dict(args)
    message = args.pop("message", content or "")
    thought = args.pop("thought", "")
    return Action(thought=thought, action=name, args=args, message=message)


def _text(content: object, where: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise TraceError(f"{where}.content is neither a string nor a list of text parts")


def parse_openai_messages(messages: list) -> tuple[list[Entry], list[Action]]:
    """The transcript and the agent's actions of OpenAI-style messages (system messages are skipped)."""
    transcript, actions = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TraceError(f"messages[{i}] is not an object")
        role, content = m.get("role"), _text(m.get("content"), f"messages[{i}]")
        if role == "user":
            transcript.append(Entry("customer", content))
        elif role == "tool":
            transcript.append(Entry("tool", content))
        elif role == "assistant":
            try:
                calls = m.get("tool_calls")
                if calls:
                    if not isinstance(calls, list):
                        raise TraceError(f"messages[{i}].tool_calls is not a list")
                    action = _action_from_tool_call(calls[0], content)
                else:
                    parsed = parse_action(content)
                    if parsed.action is None:
                        raise TraceError(f"messages[{i}]: assistant content is not an action: {parsed.error}")
                    action = parsed.action
            except (ValidationError, json.JSONDecodeError) as e:
                raise TraceError(f"messages[{i}]: invalid action: {str(e).splitlines()[0]}") from None
            except RecursionError:
                raise TraceError(f"messages[{i}]: the action is nested too deeply") from None
            actions.append(action)
            transcript.append(Entry("agent", action.to_json()))
    return transcript, actions


def _parse_native(obj: dict) -> tuple[list[Entry], list[Action]]:
    transcript, actions = [Entry("customer", str(obj.get("opening", "")))], []
    for i, step in enumerate(obj["steps"]):
        if not isinstance(step, dict):
            raise TraceError(f"steps[{i}] is not an object")
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
    except RecursionError:
        raise TraceError("JSON nested too deeply") from None
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
    except (json.JSONDecodeError, RecursionError):
        pass
    return "rejected-" + hashlib.sha256(line.encode()).hexdigest()[:16]


def _canonical(line: str) -> str:
    """The content a line stands for: the same JSON with other spacing or key order is the same."""
    try:
        return json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False)
    except (json.JSONDecodeError, RecursionError):
        return line


def store_version(store: Store, row: TraceRow, where: str = "") -> tuple[str, TraceRow | None]:
    """Store one ingested line as a version of its trace id (call inside a transaction).

    Returns what happened and the stored row: 'duplicate' (a version has this content; nothing
    stored), 'accepted', 'fixed' (accepted where only rejected versions were), 'conflict' (valid,
    but the id is already accepted with other content: kept, never corrected or trained on) or
    'rejected'. A valid line identical to a rejected version (its company was unknown then) is a fix.
    """
    trace_id = row.trace_id or row.id
    versions = store.trace_versions(trace_id)
    content = _canonical(row.raw)
    same = [v for v in versions if _canonical(v.raw) == content]
    if same and (row.status == "rejected" or any(v.status != "rejected" for v in same)):
        return "duplicate", None
    outcome = row.status
    live = [v for v in versions if v.status not in ("rejected", "conflict")]
    if row.status == "accepted" and live:
        first = live[0]
        origin = f"{Path(first.source_file).name}:{first.line_no}" if first.line_no else first.source_file
        row = dataclasses.replace(row, status="conflict", error=(
            f"{where}trace id {trace_id!r} is taken by other content: version {first.id!r} ({first.status}, from {origin}); "
            "this one is kept as a conflict, never corrected or trained on"))
        outcome = "conflict"
    elif row.status == "accepted" and versions:
        outcome = "fixed"
    n = len(versions) + 1
    key = trace_id if n == 1 else f"{trace_id}#{n}"
    while store.trace(key) is not None:  # another trace's own id may look like a version key
        n += 1
        key = f"{trace_id}#{n}"
    row = dataclasses.replace(row, id=key, trace_id=trace_id)
    store.add_trace(row)
    return outcome, row


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ingested_before(store: Store, digest: str) -> bool:
    """Whether a file with exactly these bytes was ingested already (the `ingested` events)."""
    return any(e.payload.get("sha256") == digest for e in store.events(kind="ingested"))


def ingest_file(store: Store, path: Path, companies: set[str]) -> IngestSummary:
    """Store every line of `path` (raw kept) as a version of its trace; count what happened.

    The whole file is one transaction, recorded by an `ingested` event with the file's digest:
    a crash leaves it either ingested entirely or not at all."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    summary = IngestSummary()
    with store.transaction():
        for line_no, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_no}: "
            try:
                trace = parse_trace(line, companies)
                row = TraceRow(id=trace.id, company_id=trace.company_id, format=trace.format, raw=line, status="accepted",
                               failure_note=trace.failure_note, source_file=str(path), line_no=line_no)
                summary.readable += 1
            except TraceError as e:
                row = TraceRow(id=_peek_id(line), format="unknown", raw=line, status="rejected", error=f"{where}{e}",
                               source_file=str(path), line_no=line_no)
            outcome, stored = store_version(store, row, where)
            summary.accepted += outcome in ("accepted", "fixed")
            summary.fixed += outcome == "fixed"
            summary.duplicate += outcome == "duplicate"
            summary.conflict += outcome == "conflict"
            summary.rejected += outcome == "rejected"
            if outcome in ("rejected", "conflict"):
                (summary.errors if outcome == "rejected" else summary.conflicts).append(stored.error or "")  # type: ignore[union-attr]
        store.log_event("ingested", file=str(path), sha256=hashlib.sha256(data).hexdigest(), **summary.counts())
    return summary

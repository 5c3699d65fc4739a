"""Typed rows: one frozen dataclass per table, and their conversion to and from SQLite records.

Fields map one-to-one onto columns. The field's type decides the column encoding: `dict`/`list`
fields are JSON text, `bool` fields are 0/1 integers, `Literal` fields are checked on write.
Fields documented "set by the store" (ids, counts) are filled in when the row is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from typing import Any, Literal, TypeVar

Split = Literal["train", "heldout"]
ExampleSource = Literal["simulation", "production", "demonstration"]
CorrectionStatus = Literal["accepted", "rejected", "review"]
AdapterStatus = Literal[
    "training",  # being trained now
    "failed",  # training was interrupted or crashed; the daemon redoes it
    "candidate",  # trained, not yet gated
    "rejected_by_gate",
    "awaiting_approval",  # passed the gate, waits for an operator
    "promoted",  # the one the promoted pointer names
    "rejected",  # an operator said no
    "retired",  # was promoted, replaced since
]


def utc_now() -> str:
    """ISO-8601 UTC with a fixed width, so text order is time order."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True, kw_only=True)
class CompanyRow:
    id: str
    name: str
    domain: str
    split: Split


@dataclass(frozen=True, kw_only=True)
class TicketRow:
    company_id: str
    id: str
    opening: str
    truth: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class EpisodeRow:
    run_kind: str  # 'rollout' | 'eval' | 'correction' | 'demonstration' | 'production'
    policy: str  # who acted: 'student', 'oracle', a teacher model name
    adapter_version: str | None = None  # None: the base model (or no student at all)
    company_id: str
    ticket_id: str | None  # None for a production trace (no ticket in the store)
    trace_id: str | None = None  # the production trace this episode replays
    round: int | None = None
    outcome: str  # the checker's terminal verdict, free text
    resolved: bool | None  # None where there is no truth (production)
    escalated: bool
    escalation_reason: str | None = None
    should_escalate: bool | None  # None where there is no truth (production)
    n_steps: int = 0  # set by the store from the steps
    n_valid: int = 0  # set by the store from the steps
    id: int | None = None  # set by the store
    created_at: str = field(default_factory=utc_now)


@dataclass(frozen=True, kw_only=True)
class StepRow:
    idx: int
    actor: str = "student"  # 'student' | 'teacher' | 'oracle': SCoRe trajectories mix them
    raw: str  # the model's text as generated, kept even when it does not parse
    action: dict[str, Any] | None  # the validated action; None for an invalid step
    valid: bool
    acceptable: bool | None  # in the checker's acceptable set; None where there is no truth
    verdict: str  # why (not) acceptable, or the validation error
    observation: str  # what came back to the agent
    p_escalate: float | None = None  # the policy's p(escalate) at this state, when it reported one
    escalation_ok: bool | None = None  # escalating was in the acceptable set here; None where there is no truth
    episode_id: int | None = None  # set by the store


@dataclass(frozen=True, kw_only=True)
class CorrectionRow:
    episode_id: int
    step_idx: int  # the first wrong step
    student_raw: str
    student_action: dict[str, Any] | None  # None when the student's step did not parse
    teacher: str
    teacher_action: dict[str, Any]
    rationale: str = ""
    verified: bool  # the environment accepted the teacher's step (False where there is no truth)
    status: CorrectionStatus
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    round: int | None = None
    id: int | None = None  # set by the store
    created_at: str = field(default_factory=utc_now)


@dataclass(frozen=True, kw_only=True)
class ExampleRow:
    source: ExampleSource
    company_id: str
    ticket_id: str | None = None
    episode_id: int | None = None
    correction_id: int | None = None
    messages: list[dict[str, Any]]  # chat messages, e.g. {"role": "assistant", "content": "..."}
    has_escalation: bool
    weight: float = 1.0
    round: int | None = None
    id: int | None = None  # set by the store
    created_at: str = field(default_factory=utc_now)

    @property
    def content_hash(self) -> str:
        """Identity for dedupe: the same messages are the same training example."""
        canonical = json.dumps(self.messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class TraceRow:
    id: str  # this version's key: the trace id for its first version, '<trace id>#2', '#3'... after
    company_id: str | None = None  # None when the line did not name one we could read
    format: str  # 'openai' | 'native' | 'unknown'
    raw: str  # the line as ingested, always kept
    # 'accepted' | 'rejected' (see error) | 'conflict' (its id names other content, see error) |
    # 'served' | 'corrected' | 'no_error' | 'review' | 'review_rejected'
    status: str
    error: str | None = None
    failure_note: str | None = None
    source_file: str = ""
    line_no: int | None = None
    created_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    trace_id: str | None = None  # the id its versions share; the store sets it to `id` when None


@dataclass(frozen=True, kw_only=True)
class AdapterRow:
    version: str  # 'v0001', see Store.next_adapter_version
    parent: str | None  # the adapter it was trained from; None: the base model
    path: str
    base_model: str
    status: AdapterStatus
    data_hash: str = ""  # hash of the training set it saw
    config: dict[str, Any] = field(default_factory=dict)
    train_metrics: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # evaluation summary
    gate_reason: str | None = None
    created_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)


@dataclass(frozen=True, kw_only=True)
class EvaluationRow:
    adapter_version: str  # an adapter version, or 'base'
    company_id: str
    ticket_id: str
    episode_id: int
    escalated: bool
    should_escalate: bool
    reason_correct: bool | None  # None unless it escalated a should-escalate ticket
    first_action_ok: bool
    resolved: bool
    n_steps: int
    n_acceptable: int
    n_outputs: int
    n_valid: int
    scores: list[list] | None = None  # [p(escalate), escalating was acceptable] at each scored state
    created_at: str = field(default_factory=utc_now)


@dataclass(frozen=True, kw_only=True)
class DecisionRow:
    adapter_version: str | None  # None: back to the base model
    action: str  # 'approve' | 'reject' | 'rollback' | 'gate' | 'review_accept' | ...
    by: str
    note: str = ""
    id: int | None = None  # set by the store
    created_at: str = field(default_factory=utc_now)


@dataclass(frozen=True, kw_only=True)
class EventRow:
    kind: str
    payload: dict[str, Any]
    id: int | None = None  # set by the store
    created_at: str = field(default_factory=utc_now)


Row = TypeVar("Row")


@cache
def _encodings(cls: type) -> dict[str, tuple[str, tuple[Any, ...]]]:
    """field name -> ("json" | "bool" | "literal" | "plain", allowed literal values)."""
    encodings = {}
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        origin = typing.get_origin(hint) or hint
        if origin in (dict, list):
            encodings[name] = ("json", ())
        elif hint is bool:
            encodings[name] = ("bool", ())
        elif origin is Literal:
            encodings[name] = ("literal", typing.get_args(hint))
        else:
            encodings[name] = ("plain", ())
    return encodings


def to_record(row: Any) -> dict[str, Any]:
    """A row as the column -> SQLite value dict that sqlite-utils writes."""
    record = {}
    for f in dataclasses.fields(row):
        value = getattr(row, f.name)
        kind, allowed = _encodings(type(row))[f.name]
        if value is None:
            pass
        elif kind == "json":
            value = json.dumps(value, ensure_ascii=False)
        elif kind == "bool":
            value = int(value)
        elif kind == "literal" and value not in allowed:
            raise ValueError(f"{type(row).__name__}.{f.name} = {value!r}, expected one of {allowed}")
        record[f.name] = value
    return record


def from_record(cls: type[Row], record: dict[str, Any]) -> Row:
    """The typed row for a record read back; columns that are not fields (content_hash) are skipped."""
    values = {}
    for name, (kind, _) in _encodings(cls).items():
        value = record[name]
        if value is not None and kind == "json":
            value = json.loads(value)
        elif value is not None and kind == "bool":
            value = bool(value)
        values[name] = value
    return cls(**values)

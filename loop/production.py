"""Learning from production failures: the teacher finds the first wrong step of each accepted
trace and writes one replacement. There is no ground truth, so a correction is trusted only when
`agreements` independent judgements agree on the step, the action and the reason; otherwise it
waits for an operator in the review queue. A trusted correction becomes one training row:
prefix + replacement, nothing after (the customer's real reaction to it is unknown).
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from environments.actions import Action
from environments.pack import Pack
from loop.ingest import parse_trace
from policies.protocol import render_messages
from policies.teacher import Judgement, Teacher, TeacherContext, Trajectory, Usage
from store import CorrectionRow, DecisionRow, EpisodeRow, ExampleRow, StepRow, Store


class ReviewError(ValueError):
    pass


@dataclass
class ProductionSummary:
    corrected: int = 0
    no_error: int = 0
    review: int = 0
    usage: Usage = Usage()


def _key(j: Judgement) -> tuple:
    r = j.replacement
    return (j.first_error, r.action if r else None, r.reason if r else None)


def _example_messages(pack: Pack, trace, first_error: int, replacement: Action) -> list[dict[str, str]]:
    """The conversation up to the wrong step, then the teacher's step as the last assistant turn."""
    agent_seen, prefix = 0, []
    for entry in trace.transcript:
        if entry.role == "agent":
            if agent_seen == first_error:
                break
            agent_seen += 1
        prefix.append(entry)
    return render_messages(pack.company, prefix) + [{"role": "assistant", "content": replacement.to_json()}]


def correct_traces(store: Store, teacher: Teacher, packs: list[Pack], *, agreements: int = 2, weight: float = 1.0,
                   only: str | None = None, progress: bool = False) -> ProductionSummary:
    """Judge every accepted trace (or just the trace `only`); store corrections, training rows and review items."""
    by_id = {p.id: p for p in packs}
    summary = ProductionSummary()
    rows = [row for row in store.traces(status="accepted") if only is None or row.id == only]
    for row in tqdm(rows, desc="production corrections", unit="trace", disable=not progress, leave=False):
        pack = by_id[row.company_id]
        trace = parse_trace(row.raw, set(by_id))
        trajectory = Trajectory(trace.actions, trace.transcript)
        judgements = [teacher.judge(trajectory, TeacherContext(pack, None)) for _ in range(agreements)]
        first = judgements[0]
        usage = sum((j.usage for j in judgements[1:]), first.usage)
        summary.usage += usage
        with store.transaction():
            store.log_event("production_judged", trace_id=row.id, teacher_calls=usage.calls,
                            teacher_tokens=usage.prompt_tokens + usage.completion_tokens, teacher_cost_usd=usage.cost_usd)
            episode_id = store.add_episode(
                EpisodeRow(run_kind="production", policy="production", company_id=pack.id, ticket_id=None, trace_id=row.id,
                           outcome="failure_reported" if row.failure_note else "ingested", resolved=None,
                           escalated=any(a.action == "escalate" for a in trace.actions), should_escalate=None),
                [StepRow(idx=i, raw=a.to_json(), action=a.model_dump(), valid=True, acceptable=None, verdict="", observation="")
                 for i, a in enumerate(trace.actions)],
            )
            if first.first_error is None and all(j.first_error is None for j in judgements):
                store.set_trace_status(row.id, "no_error")
                summary.no_error += 1
                continue
            agree = len({_key(j) for j in judgements}) == 1 and first.replacement is not None
            correction_id = store.add_correction(CorrectionRow(
                episode_id=episode_id, step_idx=first.first_error if first.first_error is not None else 0,
                student_raw=trace.actions[first.first_error or 0].to_json(),
                student_action=trace.actions[first.first_error or 0].model_dump(), teacher=teacher.name,
                teacher_action=(first.replacement or trace.actions[0]).model_dump(), rationale=first.rationale,
                verified=False, status="accepted" if agree else "review", prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens, cost_usd=usage.cost_usd,
            ))
            if agree:
                _add_example(store, pack, trace, first.first_error, first.replacement, episode_id, correction_id, weight)  # type: ignore[arg-type]
                store.set_trace_status(row.id, "corrected")
                summary.corrected += 1
            else:
                store.set_trace_status(row.id, "review")
                summary.review += 1
    return summary


def _add_example(store: Store, pack: Pack, trace, first_error: int, replacement: Action, episode_id: int, correction_id: int, weight: float) -> None:
    store.add_examples([ExampleRow(source="production", company_id=pack.id, episode_id=episode_id, correction_id=correction_id,
                                   messages=_example_messages(pack, trace, first_error, replacement),
                                   has_escalation=replacement.action == "escalate", weight=weight)])


def review_items(store: Store) -> list[CorrectionRow]:
    return store.corrections(status="review")


def decide_review(store: Store, packs: list[Pack], correction_id: int, *, accept: bool, by: str, note: str = "", weight: float = 1.0) -> None:
    """An operator's verdict on a correction the teachers disagreed on; logged in decisions."""
    item = next((c for c in store.corrections(status="review") if c.id == correction_id), None)
    if item is None:
        raise ReviewError(f"no correction {correction_id} waits for review (see `apprentice review`)")
    episode = store.episode(item.episode_id)
    by_id = {p.id: p for p in packs}
    trace_row = store.trace(episode.trace_id)  # type: ignore[union-attr, arg-type]
    with store.transaction():
        store.set_correction_status(correction_id, "accepted" if accept else "rejected")
        store.add_decision(DecisionRow(adapter_version=None, action="review_accept" if accept else "review_reject", by=by,
                                       note=f"correction {correction_id}: {note}".strip()))
        if accept:
            pack = by_id[trace_row.company_id]  # type: ignore[union-attr, index]
            trace = parse_trace(trace_row.raw, set(by_id))  # type: ignore[union-attr]
            _add_example(store, pack, trace, item.step_idx, Action.model_validate(item.teacher_action), item.episode_id, correction_id, weight)
        store.set_trace_status(trace_row.id, "corrected" if accept else "review_rejected")  # type: ignore[union-attr]

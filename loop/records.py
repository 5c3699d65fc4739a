"""Turning environment results into store rows (the loop is the only place that knows both)."""

from __future__ import annotations

from typing import Sequence

from environments.episode import EpisodeResult
from environments.pack import Pack
from loop.metrics import TicketOutcome
from store import CompanyRow, EpisodeRow, EvaluationRow, StepRow, Store, TicketRow


def register_packs(store: Store, packs: Sequence[Pack]) -> None:
    """Companies and tickets first: episodes and evaluations point at them."""
    with store.transaction():
        store.upsert_companies([CompanyRow(id=p.id, name=p.company.name, domain=p.company.domain, split=p.company.split) for p in packs])
        store.upsert_tickets([TicketRow(company_id=p.id, id=t.id, opening=t.opening, truth=t.truth.model_dump()) for p in packs for t in p.tickets])


def episode_rows(result: EpisodeResult, *, run_kind: str, policy: str, adapter_version: str | None = None,
                 round: int | None = None, teacher_steps: set[int] = frozenset()) -> tuple[EpisodeRow, list[StepRow]]:  # type: ignore[assignment]
    episode = EpisodeRow(
        run_kind=run_kind, policy=policy, adapter_version=adapter_version, company_id=result.company_id,
        ticket_id=result.ticket_id, round=round, outcome=result.outcome, resolved=result.resolved,
        escalated=result.escalated, escalation_reason=result.escalation_reason, should_escalate=result.should_escalate,
    )
    steps = [
        StepRow(idx=s.index, actor="teacher" if s.index in teacher_steps else "student", raw=s.raw,
                action=s.action.model_dump() if s.action else None, valid=s.action is not None,
                acceptable=s.acceptable, verdict=s.reason, observation=s.observation, p_escalate=s.p_escalate,
                escalation_ok=s.escalation_ok)
        for s in result.steps
    ]
    return episode, steps


def record_eval(store: Store, policy: str, packs: Sequence[Pack], results: Sequence[EpisodeResult], *,
                adapter_version: str | None = None, round: int | None = None) -> None:
    """Store every evaluation episode with its steps; for a student (adapter version or 'base'),
    also one evaluation row per ticket so any two versions compare paired."""
    register_packs(store, packs)
    with store.transaction():
        rows = []
        for r in results:
            episode_id = store.add_episode(*episode_rows(r, run_kind="eval", policy=policy, adapter_version=adapter_version, round=round))
            o = TicketOutcome.of(r)
            rows.append(EvaluationRow(
                adapter_version=adapter_version or "base", company_id=o.company_id, ticket_id=o.ticket_id, episode_id=episode_id,
                escalated=o.escalated, should_escalate=o.should_escalate, reason_correct=r.reason_correct,
                first_action_ok=o.first_action_ok, resolved=o.resolved, n_steps=o.n_steps, n_acceptable=o.n_acceptable,
                n_outputs=o.n_steps, n_valid=o.n_valid, scores=[[p, ok] for p, ok in o.scores],
            ))
        if policy == "student":
            store.add_evaluations(rows)


def outcomes_of(rows: Sequence[EvaluationRow]) -> list[TicketOutcome]:
    """Stored evaluation rows back as metric inputs (for paired comparisons across versions)."""
    return [
        TicketOutcome(r.company_id, r.ticket_id, r.should_escalate, r.escalated, bool(r.escalated and r.should_escalate),
                      bool(r.reason_correct), r.first_action_ok, r.resolved, r.n_steps, r.n_acceptable, r.n_valid,
                      tuple((float(p), bool(ok)) for p, ok in r.scores or ()))
        for r in rows
    ]

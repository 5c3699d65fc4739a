"""What operators look at: the daemon's health, and one adapter next to the promoted one."""

from __future__ import annotations

import fcntl
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from loop.metrics import Comparison, Report, compare, report
from loop.records import outcomes_of
from loop.round import examples_since_training
from store import Store

HEARTBEAT_KEY = "daemon_heartbeat"


@dataclass(frozen=True)
class Status:
    daemon_alive: bool
    daemon: str  # who holds the lock and when it last beat, or why it looks stopped
    promoted: str  # a version, or "base"
    awaiting_approval: list[str]
    examples: int
    examples_since_training: int
    teacher_calls_today: int
    teacher_tokens_today: int
    teacher_cost_today_usd: float
    traces: dict[str, int]  # production traces by status (served, accepted, corrected, review, rejected, ...)
    production_examples: int  # training rows from corrected production traces
    last_errors: list[str]
    last_selection: str = "none yet"  # how the last SCoRe collection picked its tickets (loop/selection.py)


def describe_pick(pick: dict) -> str:
    """One line for a "selected" event: the rule, and how near τ the picked tickets lay."""
    line = f"{pick['rule']}, {pick['tickets']} tickets (round {pick['round']})"
    if pick.get("mean_distance") is not None:
        line += (f"; mean |p(escalate) - τ| {pick['mean_distance']:.3f} picked vs {pick['pool_mean_distance']:.3f} over "
                 f"{pick['candidates']} candidates, τ {pick['tau']:.2f}")
    return line


def lock_held(db: str | Path) -> bool:
    path = Path(f"{db}.lock")
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def status(store: Store, db: str | Path) -> Status:
    beat = json.loads(store.meta(HEARTBEAT_KEY) or "{}")
    alive = lock_held(db)
    if alive:
        holder = Path(f"{db}.lock").read_text().strip()
        age = (datetime.now(timezone.utc) - datetime.fromisoformat(beat["at"])).total_seconds() if beat else None
        daemon = f"running ({holder})" + (f", last heartbeat {age:.0f} s ago" if age is not None else "")
    else:
        daemon = f"not running (last heartbeat {beat['at']})" if beat else "not running"
    today = datetime.now(timezone.utc).date().isoformat()
    spent = [e.payload for kind in ("collected", "production_judged") for e in store.events(kind=kind) if e.created_at.startswith(today)]
    errors = [f"{e.created_at[:19]} {e.payload.get('job', '')}: {e.payload.get('error', '')}" for e in store.events(kind="error")[-3:]]
    picks = store.events(kind="selected")
    return Status(
        last_selection=describe_pick(picks[-1].payload) if picks else "none yet",
        daemon_alive=alive, daemon=daemon, promoted=store.promoted_version() or "base",
        awaiting_approval=[a.version for a in store.adapters(status="awaiting_approval")],
        examples=store.count("examples"), examples_since_training=examples_since_training(store),
        teacher_calls_today=sum(p.get("teacher_calls", 0) for p in spent),
        teacher_tokens_today=sum(p.get("teacher_tokens", 0) for p in spent),
        teacher_cost_today_usd=round(sum(p.get("teacher_cost_usd", 0.0) for p in spent), 4),
        traces=dict(Counter(t.status for t in store.traces())), production_examples=len(store.examples(source="production")),
        last_errors=errors,
    )


@dataclass(frozen=True)
class ChangedTicket:
    company_id: str
    ticket_id: str
    baseline_resolved: bool
    candidate_resolved: bool
    baseline_transcript: list[str]
    candidate_transcript: list[str]
    baseline_episode_id: int
    candidate_episode_id: int


@dataclass(frozen=True)
class AdapterDetails:
    version: str
    baseline: str
    candidate: Report
    promoted: Report | None
    recall_by_reason: dict[str, tuple[float | None, float | None]]  # reason -> (candidate, baseline)
    deltas: dict[str, Comparison]  # 'overall' and each company -> candidate minus baseline, paired (empty without a baseline)
    changed: list[ChangedTicket]
    trained_on: dict[str, int]  # unique training examples by source (empty for the base model)
    operating_point: dict | None = None  # τ and its validation figures (loop/calibration.py); None for the base model
    calibration_plot: str | None = None  # adapters/<v>/calibration.png, when it exists


def _transcript(store: Store, episode_id: int) -> list[str]:
    lines = []
    for s in store.steps(episode_id):
        what = json.dumps(s.action) if s.action else f"(invalid) {s.raw[:200]!r}"
        lines.append(f"[{s.idx}] {'ok ' if s.acceptable else 'BAD'} {what}  -- {s.verdict}")
    return lines


def adapter_details(store: Store, version: str, baseline: str | None = None) -> AdapterDetails:
    """`version` next to `baseline` (default: the promoted version, or the base model when that is
    `version` itself), paired on the tickets both were evaluated on."""
    for v in (version, baseline):
        if v not in (None, "base") and store.adapter(v) is None:
            raise KeyError(f"no adapter {v!r}")
    if baseline is None:
        baseline = store.promoted_version() or "base"
        if baseline == version:
            baseline = "base"
    cand_rows, base_rows = store.evaluations(version), store.evaluations(baseline)
    if not cand_rows:
        raise KeyError(f"{version} has no evaluation yet")
    reasons: dict[tuple[str, str], set[str]] = {}
    for company in {r.company_id for r in cand_rows}:
        for t in store.tickets(company):
            turns = [t.truth, *(f["truth"] for f in t.truth.get("followups", []))]
            reasons[(company, t.id)] = {x["escalation_reason"] for x in turns if x.get("escalation_reason")}

    def recall(rows) -> dict[str, float]:
        hit, total = defaultdict(int), defaultdict(int)
        for r in rows:
            for reason in reasons.get((r.company_id, r.ticket_id), ()):
                total[reason] += 1
                hit[reason] += r.escalated
        return {k: hit[k] / total[k] for k in total}

    cand_recall, base_recall = recall(cand_rows), recall(base_rows)
    base_by_key = {(r.company_id, r.ticket_id): r for r in base_rows}
    changed = [
        ChangedTicket(r.company_id, r.ticket_id, b.resolved, r.resolved, _transcript(store, b.episode_id), _transcript(store, r.episode_id),
                      b.episode_id, r.episode_id)
        for r in cand_rows if (b := base_by_key.get((r.company_id, r.ticket_id))) is not None and b.resolved != r.resolved
    ]
    cand, base = outcomes_of(cand_rows), outcomes_of(base_rows)
    paired = sorted({r.company_id for r in cand_rows if (r.company_id, r.ticket_id) in base_by_key})
    deltas = {"overall": compare(cand, base)} if paired else {}
    for company in paired:
        deltas[company] = compare([o for o in cand if o.company_id == company], [o for o in base if o.company_id == company])
    adapter = store.adapter(version)
    plot = Path(adapter.path) / "calibration.png" if adapter else None
    return AdapterDetails(
        version=version, baseline=baseline, candidate=report(cand),
        promoted=report(base) if base else None,
        recall_by_reason={k: (cand_recall.get(k), base_recall.get(k)) for k in sorted(set(cand_recall) | set(base_recall))},
        deltas=deltas,
        changed=changed, trained_on=adapter.config.get("sources", {}) if adapter else {},
        operating_point=adapter.train_metrics.get("operating_point") if adapter else None,
        calibration_plot=str(plot) if plot and plot.is_file() else None,
    )

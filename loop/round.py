"""One round of apprentice: collect → correct → build dataset → train → calibrate → evaluate → gate.

    apprentice run --rounds 2          # runs this, twice, on the offline defaults

Everything a round produces goes to the store as it happens. The student is any `Student` (a Ray
pool of rollout actors in the daemon, an in-process `HFStudent` in loop/minimal.py); `train` is a
function (a Ray task in the daemon). Newcomers: read loop/minimal.py first, then this.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from environments.episode import SupportEpisode
from environments.pack import Pack, Ticket
from loop.calibration import STUDENT_STATES, States, fit_operating_point, plot_calibration, save_operating_point
from loop.correct import Corrected, score_correct
from loop.dataset import build_dataset, thoughts_first, with_replay
from loop.evaluate import evaluate, run_episodes, training_pool
from loop.gate import gate
from loop.metrics import TicketOutcome, report
from loop.promotion import record_gate
from loop.records import episode_rows, outcomes_of, record_eval, register_packs
from loop.selection import Pick, select_tickets
from loop.train import LoraSettings, TrainResult, same_shape
from policies.policy import StudentPolicy, TeacherPolicy
from policies.protocol import comparisons_first, render_messages
from policies.student import Student, operating_point
from policies.teacher import Teacher, Usage
from store import AdapterRow, CorrectionRow, ExampleRow, Store

TrainFn = Callable[[Path, list, Path, LoraSettings], TrainResult]


@dataclass(frozen=True)
class RoundSettings:
    method: str = "score"  # "score" | "offline"
    warm_start_tickets: int = 100
    rollout_tickets: int = 60
    max_repairs: int = 3
    keep_clean: float = 0.5
    escalation_share: float = 0.3
    decorate: float = 0.0  # share of training conversations with a reworded opening (loop/dataset.decorate_openings)
    inject: float = 0.0  # share of training conversations wrapped in a prompt injection (loop/dataset.inject_openings)
    eval_tickets: int = 30
    max_steps: int = 12
    min_valid_json: float = 0.99
    max_regression: float = 0.02
    auto_approve: bool = False
    collect_with: str = "promoted"  # "promoted" | "newest"
    continue_training: bool = True  # a new adapter starts from the collecting adapter's weights (same LoRA shape and base)
    replay: float = float("inf")  # ... on what is new since that one plus this many times as many older examples (inf: all)
    continued_learning_rate: float = 0.0  # ... at this peak learning rate (0: the LoRA settings' own)
    selection: str = "uniform"  # "uniform" | "uncertainty" | "mixed": loop/selection.py
    selection_pool: int = 3  # candidates scored per ticket picked
    calibration_tickets: int = 10  # validation tickets per training company that τ is fitted on (per policy draw)
    validation_companies: int = 2  # whole training companies left out of training, τ fitted on them (0: every company's validation split)
    max_over_escalation: float = 0.0  # > 0: τ gives the best recall within this over-escalation; 0: τ maximizes J
    calibration_states: States = STUDENT_STATES  # τ fitted on the student's own path through validation tickets, or the oracle's
    thought_first: bool = False  # the student writes its thought first (`thought_samples`): it trains on THOUGHT_FIRST steps
    thought_first_share: float = 0.0  # else this share of the training conversations is written thought first (loop/dataset.thoughts_first)
    comparisons_first: bool = False  # steps whose thought compares two numbers train thought first (protocol.comparisons_first)
    seed: int = 0


@dataclass
class Runtime:
    """What rounds share: the store, the packs, the student, the teacher and how to train."""

    store: Store
    packs: list[Pack]
    student: Student
    teacher: Teacher
    train: TrainFn
    model_dir: Path
    base_model: str
    adapters_dir: Path
    settings: RoundSettings
    lora: LoraSettings
    progress: bool = True

    @property
    def train_packs(self) -> list[Pack]:
        """The training companies trained on: every one but those left out for validation."""
        left_out = self.left_out
        return [p for p in self.packs if p.company.split == "train" and p.company.name not in left_out]

    @property
    def validation_packs(self) -> list[Pack]:
        """Where τ is fitted: the companies left out of training, or, with none left out, every
        training company (on its validation split)."""
        left_out = self.left_out
        return [p for p in self.packs if p.company.split == "train" and (not left_out or p.company.name in left_out)]

    @property
    def left_out(self) -> frozenset[str]:
        """Names of the `validation_companies` training companies left out of training (with their
        every policy draw), chosen by the seed; none when fewer than twice as many stay to train on."""
        names = sorted({p.company.name for p in self.packs if p.company.split == "train"})
        n = self.settings.validation_companies
        return frozenset(random.Random(self.settings.seed).sample(names, n)) if n and len(names) >= 3 * n else frozenset()

    @property
    def calibration_per_pack(self) -> int:
        """Validation tickets per validation pack that τ is fitted on: as many in all as
        `calibration_tickets` from every training company when whole companies are left out."""
        s = self.settings
        if not self.left_out:
            return s.calibration_tickets
        return s.calibration_tickets * len(self.train_packs + self.validation_packs) // len(self.validation_packs)

    @property
    def heldout_packs(self) -> list[Pack]:
        return [p for p in self.packs if p.company.split == "heldout"]


@dataclass
class RoundSummary:
    round: int
    collector: str  # who collected: an adapter version, 'base', or the teacher (demonstrations)
    examples_added: int = 0
    teacher_usage: Usage = Usage()
    repairs: int = 0
    rejected_corrections: int = 0
    train_loss: float | None = None
    train_tokens_per_s: float | None = None
    version: str | None = None
    tau: float | None = None  # the new adapter's operating point
    metrics: dict = field(default_factory=dict)  # held-out report, as JSON
    gate: str = ""
    gate_reason: str = ""
    trained_on: dict[str, int] = field(default_factory=dict)  # unique training examples by source
    seconds: dict[str, float] = field(default_factory=dict)
    selection: Pick | None = None  # how a SCoRe collection picked its tickets


def run_round(rt: Runtime, round_no: int) -> RoundSummary:
    """collect → correct → dataset → train → calibrate → evaluate → gate."""
    summary = collect(rt, round_no)
    return retrain(rt, round_no, summary)


def collect(rt: Runtime, round_no: int) -> RoundSummary:
    store, s = rt.store, rt.settings
    register_packs(store, rt.packs)
    ensure_base_evaluated(rt)
    collector = collecting_adapter(store, s.collect_with)
    clock = time.perf_counter()
    warm = s.method == "offline" or store.count("examples") == 0
    summary = RoundSummary(round_no, f"teacher:{rt.teacher.name}" if warm else (collector or "base"))

    # 1-2. collect and correct. The first round (and every round of the offline method) clones full
    # teacher demonstrations; later SCoRe rounds roll the student out and repair its first errors.
    n_tickets = s.warm_start_tickets if store.count("examples") == 0 else s.rollout_tickets
    seed = s.seed + store.count("episodes")  # new tickets each collection
    if warm:
        tickets = sample_tickets(rt.train_packs, n_tickets, seed=seed)
        summary.examples_added, summary.teacher_usage = collect_demonstrations(rt, tickets, round_no)
    else:
        path = rt.adapters_dir / collector if collector else None
        rt.student.load_adapter(path)
        summary.selection = pick = select_tickets(
            rt.student, training_pool(rt.train_packs), n_tickets, rule=s.selection, tau=operating_point(path) if path else None,
            rng=random.Random(seed), pool_factor=s.selection_pool, progress=rt.progress)
        store.log_event("selected", round=round_no, collector=collector, rule=pick.rule, tau=pick.tau, tickets=len(pick.tickets),
                        candidates=pick.candidates, mean_distance=pick.mean_distance, pool_mean_distance=pick.pool_mean_distance)
        collect_and_correct(rt, pick.tickets, round_no, collector, summary)
    summary.seconds["collect"] = time.perf_counter() - clock
    u = summary.teacher_usage
    store.log_event("collected", round=round_no, collector=summary.collector, examples_added=summary.examples_added,
                    repairs=summary.repairs, teacher_calls=u.calls, teacher_tokens=u.prompt_tokens + u.completion_tokens,
                    teacher_cost_usd=u.cost_usd)
    return summary


def retrain(rt: Runtime, round_no: int, summary: RoundSummary) -> RoundSummary:
    """Train an adapter on what was collected so far, evaluate it, and gate it."""
    store, s = rt.store, rt.settings
    collector = collecting_adapter(store, s.collect_with)

    # 3. dataset: the accepted examples of every round, held-out companies refused, and those of the
    #    companies left out for τ, but for corrected production traces (what the production loop is for).
    #    An adapter that starts from the weights of the one that collected (whose own errors the
    #    corrections repair) trains on what is new since that one and a replayed sample of the rest.
    heldout = {p.id for p in rt.heldout_packs}
    left_out = {p.id for p in rt.validation_packs} if rt.left_out else set()
    examples = [e for e in store.examples(exclude_companies=tuple(heldout)) if e.company_id not in left_out or e.source == "production"]
    parent = store.adapter(collector) if collector and s.continue_training else None
    start = parent.path if parent and parent.base_model == rt.base_model and same_shape(parent.path, rt.lora) else ""
    trained = with_replay(examples, since=parent.config.get("examples_through", 0), ratio=s.replay, seed=s.seed + round_no) \
        if start else examples
    dataset = build_dataset(trained, heldout=heldout, escalation_share=s.escalation_share, decorate=s.decorate,
                            inject=s.inject, seed=s.seed + round_no)

    # 4. train a new adapter version on it, from the collector's weights or fresh.
    clock = time.perf_counter()
    version = store.next_adapter_version()
    path = rt.adapters_dir / version
    lora = replace(rt.lora, start_from=start)
    if start and s.continued_learning_rate:
        lora = replace(lora, learning_rate=s.continued_learning_rate)
    store.add_adapter(AdapterRow(version=version, parent=collector, path=str(path), base_model=rt.base_model, status="training",
                                 data_hash=dataset.data_hash, config={**asdict(lora), "round": round_no, "method": s.method,
                                 "examples": dataset.n_unique, "sources": dataset.sources, "examples_through": max((e.id or 0 for e in examples), default=0),
                                 "conversations": len(dataset.conversations),
                                 "escalation_share": round(dataset.escalation_share, 4)}))
    store.log_event("training_started", version=version, round=round_no, examples=dataset.n_unique, sources=dataset.sources,
                    start_from=parent.version if start else None)
    try:
        conversations = thoughts_first(dataset.conversations, 1.0 if s.thought_first else s.thought_first_share, seed=s.seed + round_no)
        if s.comparisons_first:
            conversations = [comparisons_first(c) for c in conversations]
        result = rt.train(rt.model_dir, conversations, path, lora)
    except BaseException:
        store.set_adapter_status(version, "failed")
        raise
    summary.version, summary.train_loss, summary.train_tokens_per_s = version, result.train_loss, result.tokens_per_s
    summary.trained_on = dataset.sources
    summary.seconds["train"] = time.perf_counter() - clock

    # 5. operating point: τ on p(escalate), fitted on training companies left out of training (as
    #    many tickets in all as `calibration_tickets` from every company), never on held-out ones; the
    #    student applies it from its next load (here, the evaluation's) wherever it acts.
    clock = time.perf_counter()
    rt.student.load_adapter(path)
    try:
        point = fit_operating_point(rt.student, rt.validation_packs, max_over_escalation=s.max_over_escalation or None,
                                    per_company=rt.calibration_per_pack, states=s.calibration_states, progress=rt.progress)
        save_operating_point(point, path)
        summary.tau = point.tau
    except ValueError as e:  # e.g. validation tickets of one kind only: the adapter decodes by argmax
        point = None
        store.log_event("no_operating_point", version=version, reason=str(e))
    store.set_adapter_status(version, "candidate",
                             train_metrics={**asdict(result), "operating_point": asdict(point) if point else None})
    summary.seconds["calibrate"] = time.perf_counter() - clock

    # 6. evaluate on the held-out companies' fixed tickets, every ticket stored against the version.
    clock = time.perf_counter()
    rt.student.load_adapter(path)
    results = evaluate(StudentPolicy(rt.student), rt.heldout_packs, limit=s.eval_tickets, max_steps=s.max_steps, progress=rt.progress)
    record_eval(store, "student", rt.heldout_packs, results, adapter_version=version, round=round_no)
    summary.seconds["evaluate"] = time.perf_counter() - clock

    plot_calibration([TicketOutcome.of(r) for r in results], summary.tau, path / "calibration.png",
                     title=f"{version} on {', '.join(p.id for p in rt.heldout_packs)}")

    # 7. gate: paired against the promoted adapter (or the base model) on the same tickets.
    baseline = store.promoted_version() or "base"
    verdict = gate(outcomes_of(store.evaluations(version)), outcomes_of(store.evaluations(baseline)),
                   min_valid_json=s.min_valid_json, max_regression=s.max_regression, seed=s.seed)
    metrics = report(outcomes_of(store.evaluations(version)), seed=s.seed).as_json()
    metrics["delta_vs"] = baseline
    metrics["delta_calibration_j"] = [verdict.comparison.delta["calibration_j"].value, verdict.comparison.delta["calibration_j"].low,
                                      verdict.comparison.delta["calibration_j"].high]
    status = record_gate(store, version, verdict, baseline=baseline, metrics=metrics, auto_approve=s.auto_approve)
    summary.metrics, summary.gate, summary.gate_reason = metrics, status, verdict.reason
    return summary


# --- the steps --------------------------------------------------------------------------------


def examples_since_training(store: Store) -> int:
    """Accepted examples newer than what the last successfully trained adapter saw."""
    trained = [a for a in store.adapters() if a.status not in ("training", "failed")]
    through = trained[-1].config.get("examples_through", 0) if trained else 0
    return sum((e.id or 0) > through for e in store.examples())


def collecting_adapter(store: Store, collect_with: str = "promoted") -> str | None:
    """The adapter that collects (None = the base model).

    promoted: the promoted one (DESIGN.md; an operator's approval is what the workers switch on).
    newest: the newest trained adapter whatever the gate said, unless an operator rejected or
    retired it: SCoRe corrects the learner's own mistakes, which a base model that writes no
    valid action does not make."""
    if collect_with == "newest":
        trained = [a for a in store.adapters() if a.status in ("candidate", "rejected_by_gate", "awaiting_approval", "promoted")]
        return trained[-1].version if trained else None
    return store.promoted_version()


def sample_tickets(packs: list[Pack], n: int, *, seed: int) -> list[tuple[Pack, Ticket]]:
    """`n` training tickets drawn at random, never from the validation split."""
    pool = training_pool(packs)
    return random.Random(seed).sample(pool, min(n, len(pool)))


def ensure_base_evaluated(rt: Runtime) -> None:
    """The base model's held-out results, once: the first gate compares against them."""
    if rt.store.evaluations("base"):
        return
    rt.student.load_adapter(None)
    results = evaluate(StudentPolicy(rt.student), rt.heldout_packs, limit=rt.settings.eval_tickets,
                       max_steps=rt.settings.max_steps, progress=rt.progress)
    record_eval(rt.store, "student", rt.heldout_packs, results, adapter_version=None)


def training_messages(episode: SupportEpisode) -> list[dict[str, str]]:
    """The episode as a chat conversation that ends on the agent's last step."""
    messages = render_messages(episode.pack.company, episode.transcript)
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages


def _has_escalation(episode: SupportEpisode) -> bool:
    return any(s.action is not None and s.action.action == "escalate" for s in episode.steps)


def collect_demonstrations(rt: Runtime, tickets: list[tuple[Pack, Ticket]], round_no: int) -> tuple[int, Usage]:
    """Behaviour cloning data: the teacher plays every step, seeing the ticket's truth."""
    policy = TeacherPolicy(rt.teacher, privileged=True)
    episodes = run_episodes(policy, tickets, max_steps=rt.settings.max_steps, progress=rt.progress)
    added = 0
    with rt.store.transaction():
        for e in episodes:
            episode_id = rt.store.add_episode(*episode_rows(e.result(), run_kind="demonstration", policy=policy.name, round=round_no,
                                                            teacher_steps=set(range(len(e.steps)))))
            if e.result().resolved:
                added += rt.store.add_examples([ExampleRow(source="demonstration", company_id=e.pack.id, ticket_id=e.ticket.id,
                                                           episode_id=episode_id, messages=training_messages(e),
                                                           has_escalation=_has_escalation(e), round=round_no)])
    return added, policy.usage


def collect_and_correct(rt: Runtime, tickets: list[tuple[Pack, Ticket]], round_no: int, collector: str | None,
                        summary: RoundSummary) -> None:
    """Roll the student out, SCoRe-correct every trajectory, store everything, keep the verified."""
    s = rt.settings
    student = StudentPolicy(rt.student)
    clock = time.perf_counter()
    rollouts = run_episodes(student, tickets, max_steps=s.max_steps, progress=rt.progress)
    summary.seconds["rollout"] = time.perf_counter() - clock
    corrected = score_correct(student, rt.teacher, rollouts, max_repairs=s.max_repairs, keep_clean=s.keep_clean,
                              rng=random.Random(s.seed + round_no), progress=rt.progress)
    summary.seconds["correct"] = time.perf_counter() - clock - summary.seconds["rollout"]
    for item in corrected:
        summary.examples_added += store_corrected(rt.store, rt.teacher.name, item, round_no, collector)
        summary.teacher_usage += item.usage
        summary.repairs += len(item.repairs)
        summary.rejected_corrections += sum(not r.verified for r in item.repairs)


def store_corrected(store: Store, teacher: str, item: Corrected, round_no: int, collector: str | None) -> int:
    """One rollout, its corrections, and (when kept) the corrected trajectory and its example: one transaction."""
    with store.transaction():
        rollout_id = store.add_episode(*episode_rows(item.original.result(), run_kind="rollout", policy="student",
                                                     adapter_version=collector, round=round_no))
        for r in item.repairs:
            store.add_correction(CorrectionRow(
                episode_id=rollout_id, step_idx=r.step_idx, student_raw=r.student_raw,
                student_action=r.student_action.model_dump() if r.student_action else None, teacher=teacher,
                teacher_action=r.teacher_action.model_dump(), rationale=r.rationale, verified=r.verified,
                status="accepted" if r.verified else "rejected", prompt_tokens=r.usage.prompt_tokens,
                completion_tokens=r.usage.completion_tokens, cost_usd=r.usage.cost_usd, round=round_no,
            ))
        if item.fate == "teacher_failed":
            store.log_event("teacher_failed", episode_id=rollout_id, round=round_no, error=item.teacher_error)
        if not item.kept:
            return 0
        final = item.current
        episode_id = rollout_id
        if item.repairs:
            episode_id = store.add_episode(*episode_rows(final.result(), run_kind="correction", policy="student+teacher",
                                                         adapter_version=collector, round=round_no, teacher_steps=item.teacher_steps))
        return store.add_examples([ExampleRow(source="simulation", company_id=final.pack.id, ticket_id=final.ticket.id,
                                              episode_id=episode_id, messages=training_messages(final),
                                              has_escalation=_has_escalation(final), round=round_no)])

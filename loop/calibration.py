"""The escalation operating point: a threshold τ on p(escalate), fitted on validation tickets of
training companies (never trained on; held-out companies are never used), stored with the adapter
and applied wherever the student acts (policies/hf.py), plus the plot a person chooses by.

    point = fit_operating_point(student, train_packs)          # the adapter is loaded, τ not yet applied
    save_operating_point(point, adapter_dir)                   # the student applies it from its next load
    plot_calibration(outcomes, point.tau, "calibration.png")   # reliability diagram + ROC, τ marked

The states are those the oracle passes through on each validation ticket (the states a correct
agent reaches; `states="oracle"`), or those the student reaches itself, playing the ticket with
escalation barred (`states="student"`: until its p(escalate) reaches τ it goes where the student at
τ goes, so its own earlier steps, right or wrong, are what it reads). A ticket escalates at τ when
p(escalate) ≥ τ at any of its states up to the first where escalating is right, so τ maximizes the
same J the gate measures, recall − over-escalation, or gives the highest recall whose
over-escalation stays within `max_over_escalation`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from environments.episode import SupportEpisode
from environments.pack import Pack, Ticket
from loop.evaluate import apply_output, validation_tickets
from loop.metrics import TicketOutcome
from policies.policy import Output
from policies.protocol import render_messages
from policies.student import OPERATING_POINT_FILE, Generation, Message


class ScoringStudent(Protocol):
    def escalation_probabilities(self, prompts: list[list[Message]]) -> list[float | None]: ...

    def without_escalating(self, prompts: list[list[Message]]) -> list[Generation]: ...  # for STUDENT_STATES


SCORE_CHUNK = 32  # prompts per call: the progress bar moves, batches stay full
States = Literal["oracle", "student"]  # whose path through a validation ticket τ is fitted on
ORACLE_STATES, STUDENT_STATES = "oracle", "student"


@dataclass(frozen=True)
class OperatingPoint:
    tau: float
    recall: float  # on the validation tickets, at τ
    over_escalation: float
    j: float
    n_tickets: int
    max_over_escalation: float | None  # the limit it was fitted under; None = maximize J
    states: States = ORACLE_STATES  # whose path through the tickets it was fitted on


def ticket_scores(student: ScoringStudent, work: Sequence[tuple[Pack, Ticket]], *, progress: bool = False) -> list[tuple[float, bool]]:
    """(score, should escalate) per ticket: the highest p(escalate) over the oracle's states up to
    the first where escalating is right (all of them on a ticket that never escalates)."""
    prompts, owner = [], []
    for index, (pack, ticket) in enumerate(work):
        episode = SupportEpisode(pack, ticket)
        while not episode.done:
            prompts.append(render_messages(pack.company, episode.transcript))
            owner.append(index)
            if episode.escalation_acceptable():
                break
            episode.step(episode.reference_action())
    scores = [0.0] * len(work)
    for i, p in zip(owner, p_escalate(student, prompts, progress=progress, desc="p(escalate) on validation states")):
        scores[i] = max(scores[i], p)
    return [(score, ticket.should_escalate) for score, (_, ticket) in zip(scores, work)]


def own_path_scores(student: ScoringStudent, work: Sequence[tuple[Pack, Ticket]], *, progress: bool = False) -> list[tuple[float, bool]]:
    """(score, should escalate) per ticket on the student's own path: it plays each ticket with
    `escalate` barred, its p(escalate) read at every state, so until its p reaches a τ it goes exactly
    where the student at τ goes. The score is the highest p up to the first state where escalating is
    right (every state it reaches on a ticket that never escalates)."""
    episodes = [SupportEpisode(pack, ticket) for pack, ticket in work]
    scores = [0.0] * len(work)
    live = list(range(len(work)))
    with tqdm(total=len(work), desc="p(escalate) on the student's own path", unit="ticket", disable=not progress, leave=False) as bar:
        while live:
            going = []
            for start in range(0, len(live), SCORE_CHUNK):
                chunk = live[start : start + SCORE_CHUNK]
                steps = student.without_escalating([render_messages(episodes[i].pack.company, episodes[i].transcript) for i in chunk])
                for i, step in zip(chunk, steps):
                    scores[i] = max(scores[i], step.p_escalate or 0.0)
                    if episodes[i].escalation_acceptable():
                        continue  # decided: escalating here is right
                    apply_output(episodes[i], Output(step.text, step.p_escalate))
                    if not episodes[i].done:
                        going.append(i)
            bar.update(len(live) - len(going))
            live = going
    return [(score, ticket.should_escalate) for score, (_, ticket) in zip(scores, work)]


def p_escalate(student: ScoringStudent, prompts: list[list[Message]], *, progress: bool = False, desc: str = "p(escalate)") -> list[float]:
    """The student's p(escalate) at each prompt's state, in chunks behind a progress bar; 0 where
    it reached no action field (it did not choose escalate)."""
    probabilities: list[float] = []
    with tqdm(total=len(prompts), desc=desc, unit="state", disable=not progress, leave=False) as bar:
        for start in range(0, len(prompts), SCORE_CHUNK):
            chunk = prompts[start : start + SCORE_CHUNK]
            probabilities += [p if p is not None else 0.0 for p in student.escalation_probabilities(chunk)]
            bar.update(len(chunk))
    return probabilities


def fit_threshold(scored: Sequence[tuple[float, bool]], *, max_over_escalation: float | None = None) -> tuple[float, float, float]:
    """(τ, recall, over-escalation) at the best threshold: max recall − over-escalation, or max recall
    with over-escalation ≤ the limit (ties: the higher τ). τ lies halfway between two observed scores."""
    s = np.array([x for x, _ in scored], dtype=float)
    y = np.array([e for _, e in scored], dtype=bool)
    if not y.any() or y.all():
        raise ValueError("fitting τ needs validation tickets that should escalate and tickets that should not")
    values = np.unique(s)
    candidates = np.concatenate([[values[0] / 2], (values[:-1] + values[1:]) / 2, [(values[-1] + 1) / 2]])
    best = None
    for tau in candidates[::-1]:  # from the highest τ: on ties the most conservative wins
        recall, over = (s[y] >= tau).mean(), (s[~y] >= tau).mean()
        if max_over_escalation is not None and over > max_over_escalation:
            continue
        key = recall if max_over_escalation is not None else recall - over
        if best is None or key > best[0]:
            best = (key, float(tau), float(recall), float(over))
    if best is None:
        raise ValueError(f"no threshold keeps over-escalation within {max_over_escalation}")
    return best[1], best[2], best[3]


def fit_operating_point(student: ScoringStudent, packs: Sequence[Pack], *, max_over_escalation: float | None = None,
                        per_company: int | None = None, states: States = ORACLE_STATES, progress: bool = False) -> OperatingPoint:
    """τ for the student's live adapter, on the validation tickets of `packs` (training companies
    only), scored on the oracle's states (`ticket_scores`) or on the student's own (`own_path_scores`)."""
    work = [(p, t) for p in packs for t in validation_tickets(p, per_company)]  # a held-out pack raises: it is never used
    scored = (own_path_scores if states == STUDENT_STATES else ticket_scores)(student, work, progress=progress)
    tau, recall, over = fit_threshold(scored, max_over_escalation=max_over_escalation)
    # τ exactly as fitted: it lies between two observed scores that may differ in the 6th decimal, so
    # rounding it could move it past one of them (a τ rounded to 0 escalates everything).
    return OperatingPoint(tau, recall, over, recall - over, len(scored), max_over_escalation, states)


def save_operating_point(point: OperatingPoint, adapter_dir: str | Path) -> Path:
    path = Path(adapter_dir) / OPERATING_POINT_FILE
    path.write_text(json.dumps(asdict(point), indent=2))
    return path


def plot_calibration(outcomes: Sequence[TicketOutcome], tau: float | None, path: str | Path, *, title: str = "") -> Path:
    """A reliability diagram (10 equal-mass bins) and an ROC curve of p(escalate) over every scored
    decision state of `outcomes`, the operating point τ marked on both. One PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = np.array([s for o in outcomes for s, _ in o.scores], dtype=float)
    y = np.array([ok for o in outcomes for _, ok in o.scores], dtype=float)
    fig, (rel, roc) = plt.subplots(1, 2, figsize=(8, 3.6), dpi=100)
    rel.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    if len(p):
        order = np.argsort(p, kind="stable")
        for chunk in np.array_split(order, min(10, len(p))):
            rel.plot(p[chunk].mean(), y[chunk].mean(), "o", color="C0")
        thresholds = np.concatenate([[np.inf], np.unique(p)[::-1]])
        tpr = [(p[y == 1] >= t).mean() if (y == 1).any() else np.nan for t in thresholds]
        fpr = [(p[y == 0] >= t).mean() if (y == 0).any() else np.nan for t in thresholds]
        roc.plot(fpr, tpr, color="C0")
        if tau is not None:
            rel.axvline(tau, color="C3", lw=1, label=f"τ = {tau:.2g}")
            at_tau = ((p[y == 0] >= tau).mean() if (y == 0).any() else np.nan, (p[y == 1] >= tau).mean() if (y == 1).any() else np.nan)
            roc.plot(*at_tau, "o", color="C3", label=f"τ = {tau:.2g}")
            rel.legend(loc="upper left")
            roc.legend(loc="lower right")
    rel.set(xlim=(0, 1), ylim=(0, 1), xlabel="p(escalate), mean per bin", ylabel="escalating was right, share",
            title="reliability (10 equal-mass bins)")
    roc.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate (states)", ylabel="true positive rate (states)", title="ROC")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path

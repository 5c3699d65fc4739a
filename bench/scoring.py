"""Scoring p(escalate) under comparisons first: in one pass, or decided first and thoughts after?

    .venv/bin/python bench/scoring.py --adapter /tmp/run/adapters/v0002 --per-company 10

Under `comparisons_first` an adapter writes a step thought first where a number decides it and action
first elsewhere. Fitting τ needs only p(escalate) at each state's action name, and a batch stops
when every row has reached it, so in one pass a batch with one thinking row decodes a whole thought
for all of its rows. `HFStudent` therefore scores in two passes (policies/hf.py
`_decided_then_thought`): `DECISION_TOKENS` for every row, then only the rows that began a thought,
batched together. This scores the oracle's states on the validation tickets of every built-in
training company (what loop/calibration.py fits τ on; `--per-company` each) with the real
SmolLM2-135M and the given adapter, both ways one after the other in one process, and prints a table
(seconds, the ratio, τ fitted from each and J there; then the largest difference in p(escalate) and
in a ticket's score) to bench/reports/<name>.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from environments.builtin import build_packs
from loop.calibration import fit_threshold, ticket_scores
from loop.evaluate import validation_tickets
from policies.hf import DECISION_TOKENS, HFStudent
from policies.models import resolve_model
from policies.protocol import comparisons_first
from policies.student import Message
from report import publish  # bench/report.py: the script's folder is on sys.path


class Recorded:
    """The student's p(escalate) as `escalation_probabilities` gives it (two passes), each kept."""

    def __init__(self, student: HFStudent):
        self.student, self.p = student, []

    def escalation_probabilities(self, prompts: list[list[Message]]) -> list[float | None]:
        self.p += self.student.escalation_probabilities(prompts)
        return self.p[-len(prompts):]


class OnePass(Recorded):
    """Every batch decoded until each of its rows has reached its action name."""

    def escalation_probabilities(self, prompts: list[list[Message]]) -> list[float | None]:
        s = self.student
        ids = [s._render(comparisons_first(m)) for m in prompts]
        self.p += [g.p_escalate for g, _ in s._batched(ids, stop_at_action=True)]
        return self.p[-len(prompts):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="an adapter trained with comparisons_first (e.g. adapters/v0002 of a run)")
    parser.add_argument("--per-company", type=int, default=10, help="validation tickets per training company")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per generation batch (apprentice.toml's batch_size)")
    parser.add_argument("--seed", type=int, default=0, help="the built-in packs' seed")
    parser.add_argument("--name", default="scoring", help="report name under bench/reports/")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = [(p, t) for p in build_packs(args.seed) if p.company.split == "train" for t in validation_tickets(p, args.per_company)]
    student = HFStudent(resolve_model("smollm2-135m"), adapter=Path(args.adapter), json_mode=True, comparisons_first=True,
                        batch_size=args.batch_size, use_threshold=False)
    runs = {}
    for label, scorer in (("two passes", Recorded(student)), ("one pass", OnePass(student))):
        clock = time.perf_counter()
        scored = ticket_scores(scorer, work, progress=True)
        runs[label] = (time.perf_counter() - clock, scored, scorer.p)
        print(f"{label}: {runs[label][0]:.0f} s", flush=True)

    (two_s, two, two_p), (one_s, one, one_p) = runs["two passes"], runs["one pass"]
    dp = max(abs((a or 0.0) - (b or 0.0)) for a, b in zip(two_p, one_p))
    dscore = max(abs(a - b) for (a, _), (b, _) in zip(two, one))
    lines = [
        "# Scoring p(escalate) under comparisons first: one pass or two",
        "",
        f"`bench/scoring.py --adapter {args.adapter} --per-company {args.per_company} --batch-size {args.batch_size}`: real "
        f"SmolLM2-135M with the adapter, json_mode, comparisons first; the oracle's states on {len(work)} validation tickets of the "
        f"built-in training companies ({len(two_p)} states), p(escalate) as τ fitting reads it, {torch.get_num_threads()} threads; "
        f"both ways one after the other in one process (two passes first). Pass 1 decodes {DECISION_TOKENS} tokens per row.",
        "",
        "| scoring | seconds | against one pass | τ (max J) | val J at τ |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, (seconds, scored, _) in runs.items():
        tau, recall, over = fit_threshold(scored)
        lines.append(f"| {label} | {seconds:.0f} | {seconds / one_s:.2f}x | {tau:.4f} | {recall - over:.3f} |")
    lines += ["", f"Largest difference between the two in a state's p(escalate): {dp:.2e}; in a ticket's score: {dscore:.2e} "
                  "(batches of other rows: the same model, other padding)."]
    publish(args.name, lines)


if __name__ == "__main__":
    main()

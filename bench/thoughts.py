"""p(escalate) over sampled thoughts: does averaging over k rationales rank escalations better than the greedy one?

    .venv/bin/python bench/learning.py --variants rationale-redraw --val-domains 2 --keep /tmp/keep ...
    .venv/bin/python bench/thoughts.py --adapter /tmp/keep/rationale-redraw --val-domains 2 --settings 0,0.5:4,1:4
    .venv/bin/python bench/thoughts.py --adapter /tmp/keep/rationale-redraw --val-domains 2 --settings 1:16 --splits 4

A student that writes its rationale first decides in the thought ("45 is more than 35: escalate"), and
p(escalate), read at the action that follows, only repeats it: near 0 or 1, nothing between for a
threshold τ to trade (bench/reports/learning-numbers.md). This scores one kept adapter (bench/learning.py
`--keep`) on the same tickets as learning.py with the same flags, once per setting `T:k`:

- `0`: the greedy thought, then p(escalate) at the action (what learning.py scores);
- `T:k`: k thoughts sampled at temperature T for every state, and the mean of the k p(escalate) that
  follow them: the student's own probability of escalating, marginalised over what it might think.
  With `--splits n` the same draws are also scored as 2 and n disjoint groups (k/2, k/n each, no
  model run): how much a smaller k moves from one draw to the next.

A ticket's score is the highest over the oracle's states (loop/calibration.py); τ is fitted on the
validation tickets (training companies, never trained on) at max J and at the gate's corner
(over-escalation ≤ 0.02, what a candidate may add to the base's 0), and only applied to the held-out pair.
Every k sampled rows of a state form one batch, so the state's whole prompt is computed once and shared
(policies/hf.py's prefix cache). Prints a line per setting, writes bench/reports/<name>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from environments.builtin import build_packs
from loop.calibration import fit_threshold, ticket_scores
from loop.evaluate import eval_tickets
from policies.hf import HFStudent
from policies.models import resolve_model
from policies.student import Message
from learning import GATE_OVER_ESCALATION, VARIANTS, as_variant, at, auroc, rates, validation  # bench/learning.py
from report import publish

Scored = list[tuple[float, bool]]


class Sampled:
    """A scoring student whose p(escalate) at a state is the mean over k sampled thoughts; keeps every
    state's k draws, in the order scored, for `Replay`."""

    def __init__(self, student, k: int):
        self.student, self.k, self.draws = student, k, []

    def escalation_probabilities(self, prompts: list[list[Message]]) -> list[float]:
        ps = [p or 0.0 for p in self.student.escalation_probabilities([p for p in prompts for _ in range(self.k)])]
        self.draws += [ps[i * self.k : (i + 1) * self.k] for i in range(len(prompts))]
        return [sum(d) / self.k for d in self.draws[-len(prompts):]]


class Replay:
    """The mean over a slice of each state's recorded draws: a smaller k, scored again without the model
    (ticket_scores visits the states in the same order every time)."""

    def __init__(self, draws: list[list[float]], part: slice):
        self.draws, self.part, self.next = draws, part, 0

    def escalation_probabilities(self, prompts: list[list[Message]]) -> list[float]:
        chunk = self.draws[self.next : self.next + len(prompts)]
        self.next += len(prompts)
        return [float(np.mean(d[self.part])) for d in chunk]


def interval(held: Scored, stat, *, resamples: int = 1000, seed: int = 0) -> str:
    """`stat` of the held-out tickets with its 95% bootstrap interval over tickets."""
    def value(scored: Scored) -> float:
        try:
            return stat(scored)
        except ZeroDivisionError:  # a resample without an escalation ticket, or without a self-serve one
            return float("nan")

    rng = np.random.default_rng(seed)
    draws = [value([held[i] for i in rng.integers(0, len(held), len(held))]) for _ in range(resamples)]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return f"{value(held):.2f} [{low:.2f}, {high:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="an adapter folder kept by bench/learning.py --keep")
    parser.add_argument("--variant", default="rationale-redraw", choices=sorted(VARIANTS),
                        help="the learning.py variant it was trained as (its key order)")
    parser.add_argument("--settings", default="0,0.5:4,1:4",
                        help="comma-separated: 0 for the greedy thought, T:k for k thoughts sampled at temperature T")
    parser.add_argument("--seed", type=int, default=0, help="learning.py's --seed (which companies it left out) and the sampling seed")
    parser.add_argument("--val-seed", type=int, default=1000, help="learning.py's --val-seed")
    parser.add_argument("--val-domains", type=int, default=0, help="learning.py's --val-domains (must match the adapter's training run)")
    parser.add_argument("--val-tickets", type=int, default=10, help="learning.py's --val-tickets")
    parser.add_argument("--curve-tickets", type=int, default=30, help="held-out tickets per company")
    parser.add_argument("--sampling-seed", type=int, default=None, help="the seed of the sampled thoughts (default: --seed)")
    parser.add_argument("--splits", type=int, default=1,
                        help="also score each sampled setting's k draws as this many disjoint groups of k/splits "
                             "(and k/2 when it is 4 or more), to see how steady a smaller k is")
    parser.add_argument("--draws", default="", help="write each sampled setting's draws (every state's k p(escalate)) to this "
                                                    "JSON file, '{setting}' in the name replaced by it, e.g. /tmp/draws-{setting}.json")
    parser.add_argument("--name", default="thoughts", help="report name under bench/reports/")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    clock = time.perf_counter()

    left_out, val_work = validation(args.seed, args.val_seed, args.val_domains, args.val_tickets)
    heldout = [p for p in build_packs(args.seed) if p.company.split == "heldout"]
    held_work = [(p, t) for p in heldout for t in eval_tickets(p, args.curve_tickets)]
    hf = HFStudent(resolve_model("smollm2-135m"), max_new_tokens=128, adapter=Path(args.adapter), use_threshold=False)
    rows = []

    def score(label: str, val: Scored, held: Scored, minutes: float | None) -> None:
        tau = fit_threshold(val)[0]
        strict = fit_threshold(val, max_over_escalation=GATE_OVER_ESCALATION)[0]
        rows.append(Row(label, minutes, len({round(x, 4) for x, _ in val}), tau, auroc(val), rates(val, tau), interval(held, auroc),
                        interval(held, lambda s: at(s, tau)), strict, rates(val, strict),
                        interval(held, lambda s: rates(s, strict)[0]), interval(held, lambda s: rates(s, strict)[1])))
        r = rows[-1]
        print(f"{label}: τ {tau:.3g}, val AUROC {r.val_auroc:.2f} J {at(val, tau):.2f}; held-out AUROC {r.held_auroc}, "
              f"J@τ {r.held_j}; gate's corner τ {strict:.3g}: held-out recall {r.held_recall_corner}, over-esc {r.held_over_corner}"
              + (f" ({minutes:.1f} min)" if minutes is not None else ""), flush=True)
        write(args, rows, left_out, val_work, held_work, heldout, (time.perf_counter() - clock) / 60)

    for setting in args.settings.split(","):
        temperature, k = (float(setting.split(":")[0]), int(setting.split(":")[1])) if ":" in setting else (0.0, 1)
        if temperature == 0 and k != 1:
            raise SystemExit(f"{setting}: greedy decoding gives k identical thoughts; write 0")
        hf.temperature, hf.batch_size = temperature, k if k > 1 else 8  # k > 1: one state per batch, its prompt shared
        torch.manual_seed(args.seed if args.sampling_seed is None else args.sampling_seed)
        student = as_variant(hf, VARIANTS[args.variant])
        scorer = Sampled(student, k) if k > 1 else student
        started = time.perf_counter()
        val = ticket_scores(scorer, val_work)
        validation_states = len(scorer.draws) if k > 1 else 0
        held = ticket_scores(scorer, held_work)
        if args.draws and k > 1:  # every state's k p(escalate), in the order ticket_scores visits them
            Path(args.draws.format(setting=setting.replace(":", "-"))).write_text(json.dumps(
                {"setting": setting, "validation": scorer.draws[:validation_states], "heldout": scorer.draws[validation_states:]}))
        label = "greedy thought" if k == 1 else f"T {temperature:g}, k {k}"
        score(label, val, held, (time.perf_counter() - started) / 60)
        if k == 1:
            continue
        for parts in sorted({n for n in (2, args.splits) if 1 < n and k // n >= 2}):
            size = k // parts
            for i in range(parts):
                part = slice(i * size, (i + 1) * size)
                replay = Replay(scorer.draws, part)
                score(f"T {temperature:g}, k {size} (draws {part.start + 1}–{part.stop} of the k {k})",
                      ticket_scores(replay, val_work), ticket_scores(replay, held_work), None)

class Row(NamedTuple):
    label: str
    minutes: float | None  # None: scored again from a larger k's draws, no model run
    distinct: int  # distinct validation scores: how graded p(escalate) is
    tau: float
    val_auroc: float
    val_at_tau: tuple[float, float]  # (recall, over-escalation)
    held_auroc: str  # "value [low, high]"
    held_j: str
    corner: float
    val_at_corner: tuple[float, float]
    held_recall_corner: str
    held_over_corner: str


def write(args, rows: list[Row], left_out: set[str], val_work, held_work, heldout, minutes: float) -> None:
    """bench/reports/<name>.md with every setting scored so far (rewritten after each)."""
    command = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    lines = [
        "# p(escalate) over sampled thoughts",
        "",
        f"`bench/thoughts.py {command}`",
        "",
        f"Real SmolLM2-135M with the adapter `{Path(args.adapter).name}` ({args.variant}), {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPU cores. Whole run: {minutes:.0f} min.",
        f"Validation: {len(val_work)} tickets of " + (f"{', '.join(sorted(left_out))}, left out of training" if left_out else
                                                      "every training company's validation split") +
        f" (policy numbers drawn with seed {args.val_seed}); τ is fitted there. Held out: {len(held_work)} tickets of "
        f"{', '.join(p.id for p in heldout)}, never trained on nor fitted on; 95% bootstrap intervals over tickets.",
        "",
        "A ticket's score is the highest p(escalate) over the oracle's states up to the first where escalating is right.",
        f"τ: the validation J's best; the gate's corner: the best validation recall with over-escalation ≤ {GATE_OVER_ESCALATION}.",
        "",
        "| thought | minutes (both splits) | distinct val. scores | τ | val. AUROC | val. recall, over-esc. at τ | held-out AUROC | "
        "held-out J at τ | corner τ | val. recall, over-esc. at corner | held-out recall at corner | held-out over-esc. at corner |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r.label} | {'—' if r.minutes is None else f'{r.minutes:.1f}'} | {r.distinct} | {r.tau:.3g} | {r.val_auroc:.2f} | {r.val_at_tau[0]:.2f}, {r.val_at_tau[1]:.2f} | "
              f"{r.held_auroc} | {r.held_j} | {r.corner:.3g} | {r.val_at_corner[0]:.2f}, {r.val_at_corner[1]:.2f} | "
              f"{r.held_recall_corner} | {r.held_over_corner} |" for r in rows]
    publish(args.name, lines)


if __name__ == "__main__":
    main()

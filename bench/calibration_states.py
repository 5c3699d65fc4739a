"""Fit τ on the oracle's states or on the student's own path? Cross-fitted on validation tickets.

    .venv/bin/python bench/calibration_states.py --run /tmp/run --versions v0001,v0002
    .venv/bin/python bench/calibration_states.py --run /tmp/run --fit-on own --limits 0.02,0.001

τ is fitted on validation tickets of training companies (loop/calibration.py). On the oracle's
states the student reads the oracle's earlier steps, thoughts included; played for real it reads
its own. This scores each adapter of a finished `apprentice run` (its folder: apprentice.toml and
adapters/) on the same validation tickets that run fitted τ on, both ways (`ticket_scores`,
`own_path_scores`; real SmolLM2-135M, json_mode and comparisons first as the run had them), and
cross-fits: the tickets split in two by their order, τ fitted on one half (over-escalation within
the run's `max_over_escalation`, as the round does) is judged on the other half by the student's
own path, which is where it will act. Each ticket is judged once, by the τ of the half it is not
in. With --limits, each way is cross-fitted within each over-escalation limit. Prints a table
(recall, over-escalation, J for each way and limit; scoring minutes) and writes
bench/reports/<name>.md. Held-out companies are not touched.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from loop.calibration import fit_threshold, own_path_scores, ticket_scores
from loop.evaluate import validation_tickets
from loop.round import Runtime
from ops.config import load_config
from ops.run import build_packs, lora_settings, round_settings
from policies.hf import HFStudent
from policies.models import resolve_model
from report import publish  # bench/report.py: the script's folder is on sys.path

Scored = list[tuple[float, bool]]
WAYS = {"oracle": "the oracle's states", "own": "its own path"}


def cross_fitted(fit_on: Scored, judge_on: Scored, limit: float | None) -> tuple[float, float, int, int]:
    """(recall, over-escalation, escalations, self-serve tickets) of every ticket judged on `judge_on`
    at the τ fitted on `fit_on` over the other half (halves: even and odd positions)."""
    caught = needless = escalations = self_serve = 0
    for half in (0, 1):
        fit = [s for i, s in enumerate(fit_on) if i % 2 != half]
        tau = fit_threshold(fit, max_over_escalation=limit)[0]
        for score, should in (s for i, s in enumerate(judge_on) if i % 2 == half):
            escalations += should
            self_serve += not should
            caught += should and score >= tau
            needless += (not should) and score >= tau
    return caught / escalations, needless / self_serve, escalations, self_serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a finished `apprentice run` folder (apprentice.toml, adapters/)")
    parser.add_argument("--versions", default="v0001,v0002", help="comma-separated adapter versions under adapters/")
    parser.add_argument("--name", default="calibration-states", help="report name under bench/reports/")
    parser.add_argument("--fit-on", default="oracle,own", help="comma-separated: oracle (the oracle's states), own (the student's own path)")
    parser.add_argument("--limits", default="", help="comma-separated over-escalation limits τ is fitted within (0: max J); "
                                                     "default: the run's max_over_escalation")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(args.run / "apprentice.toml")
    # What the round fits τ on: its validation packs and tickets per pack (no store, student or teacher needed).
    rt = Runtime(store=None, packs=build_packs(cfg), student=None, teacher=None, train=None, model_dir=None, base_model=cfg.model,
                 adapters_dir=None, settings=round_settings(cfg), lora=lora_settings(cfg), progress=False)
    work = [(p, t) for p in rt.validation_packs for t in validation_tickets(p, rt.calibration_per_pack)]
    limits = [float(x) for x in args.limits.split(",")] if args.limits else [cfg.max_over_escalation]
    ways = args.fit_on.split(",")
    student = HFStudent(resolve_model(cfg.model), json_mode=cfg.json_mode, comparisons_first=cfg.comparisons_first,
                        batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, use_threshold=False)
    rows = []
    for version in args.versions.split(","):
        student.load_adapter(args.run / "adapters" / version)
        scored = {}
        for way, score in (("oracle", ticket_scores), ("own", own_path_scores)):
            if way in ways or way == "own":  # every ticket is judged on its own path
                clock = time.perf_counter()
                scored[way] = score(student, work, progress=True), (time.perf_counter() - clock) / 60
        own = scored["own"][0]
        for way in ways:
            fit_on, minutes = scored[way]
            for limit in limits:
                recall, over, n_esc, n_self = cross_fitted(fit_on, own, limit or None)
                rows.append(f"| {version} | {WAYS[way]} | {limit:g} | {fit_threshold(fit_on, max_over_escalation=limit or None)[0]:.3f} | "
                            f"{recall:.2f} | {over:.3f} ({round(over * n_self)} of {n_self}) | **{recall - over:.2f}** | {minutes:.1f} |")
                print(rows[-1], flush=True)
    publish(args.name, [
        "# τ fitted on the oracle's states or on the student's own path",
        "",
        f"`bench/calibration_states.py --run {args.run} --versions {args.versions} --fit-on {args.fit_on}"
        f"{f' --limits {args.limits}' if args.limits else ''}`: real SmolLM2-135M with each adapter "
        f"(json_mode {cfg.json_mode}, comparisons first {cfg.comparisons_first}); the {len(work)} validation tickets its run fitted "
        f"τ on ({', '.join(sorted({p.company.name for p in rt.validation_packs}))}, every policy draw; {sum(t.should_escalate for _, t in work)} should escalate), "
        f"each scored on {' and on '.join(WAYS[w] for w in scored)} (a path of its own is played with escalation barred). Cross-fitted: τ fitted on one half "
        f"of the tickets (even or odd positions; over-escalation within the limit, 0: max J), every ticket of the other half judged "
        f"on its own path. {torch.get_num_threads()} threads, one process, nothing else running.",
        "",
        "| adapter | τ fitted on | over-escalation limit | τ on all tickets | recall (own path) | over-escalation (own path) | J (own path) | scoring minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ])


if __name__ == "__main__":
    main()

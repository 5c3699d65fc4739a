"""Rollout actors × threads: one actor of two threads, or two actors of one thread each?

    .venv/bin/python bench/workers.py --adapter /tmp/run/adapters/v0002 [--per-company 4] [--configs 2x0,2x1] [--phases 'one prompt']

Everything a round generates goes through `RayStudentPool`, which splits each call across its actors.
On a 2-core machine one actor of two threads leaves a core idle whenever its Python runs (the
generate loop, the escalation gate, the grammar's token masks), while two actors of one thread
overlap it. This times, with the real SmolLM2-135M and the given adapter (json_mode, comparisons
first, as the main command decodes), on the validation tickets of every built-in training company
(`--per-company` each), the four kinds of work a round does: p(escalate) on the oracle's states,
the student's own path with escalation barred (what τ is fitted on), whole episodes (rollouts,
evaluation), and episodes one at a time, each call one prompt (the first `--single` tickets; SCoRe's
continuations run so). THREADS 0, the default, shares the cores among the actors a call uses, so a
one-prompt call gets them all. Each configuration is a fresh pool in one Ray instance, one after
the other in the order given; the table gives seconds and the ratio to the first configuration,
then how far the outputs differ (batches of other rows: the same model, other padding). Writes
bench/reports/<name>.md.
"""

from __future__ import annotations

import argparse
import time

from loop.workers import RayStudentPool, StudentOptions, start_ray  # first: it states Ray's auth mode before Ray reads it

from environments.builtin import build_packs
from loop.calibration import own_path_scores, ticket_scores
from loop.evaluate import run_episodes, validation_tickets
from policies.models import DEFAULT_MODEL, resolve_model
from policies.policy import StudentPolicy
from report import publish  # bench/report.py: the script's folder is on sys.path

PHASES = ("oracle's states", "own path", "episodes", "one prompt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter folder (e.g. a main run's adapters/v0002)")
    parser.add_argument("--per-company", type=int, default=4, help="validation tickets per training company")
    parser.add_argument("--configs", default="2x0,1x2", help="comma-separated ACTORSxTHREADS (0: shared per call), the first is the reference")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of: {', '.join(PHASES)}")
    parser.add_argument("--single", type=int, default=8, help="tickets of the one-prompt phase")
    parser.add_argument("--seed", type=int, default=0, help="the built-in packs' seed")
    parser.add_argument("--name", default="workers", help="report name under bench/reports/")
    args = parser.parse_args()
    configs = [tuple(map(int, c.split("x"))) for c in args.configs.split(",")]
    phases = args.phases.split(",")
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")
    work = [(p, t) for p in build_packs(args.seed) if p.company.split == "train" for t in validation_tickets(p, args.per_company)]
    options = StudentOptions(batch_size=8, max_new_tokens=128, json_mode=True, comparisons_first=True)
    start_ray()
    runs = {}
    for actors, threads in configs:
        pool = RayStudentPool(resolve_model(DEFAULT_MODEL), options, n=actors, threads=threads)
        pool.load_adapter(args.adapter)
        work_of = {
            "oracle's states": lambda: ticket_scores(pool, work),
            "own path": lambda: own_path_scores(pool, work),
            "episodes": lambda: [e.result().escalated for e in run_episodes(StudentPolicy(pool), work, progress=False)],
            "one prompt": lambda: [e.result().escalated for item in work[: args.single]
                                   for e in run_episodes(StudentPolicy(pool), [item], progress=False)],
        }
        seconds, outputs = [], {}
        for phase in phases:
            clock = time.perf_counter()
            outputs[phase] = work_of[phase]()
            seconds.append(time.perf_counter() - clock)
        pool.shutdown()
        label = f"{actors}x{threads}"
        while label in runs:  # a configuration repeated (to see the noise) keeps both rows
            label += "'"
        runs[label] = (seconds, outputs)
        print(f"{actors} actors x {threads} threads: " + ", ".join(f"{p} {s:.0f} s" for p, s in zip(phases, seconds)), flush=True)

    first, (ref_seconds, ref) = next(iter(runs.items()))
    lines = [
        "# Rollout actors × threads",
        "",
        f"`bench/workers.py --adapter {args.adapter} --per-company {args.per_company} --configs {args.configs} --phases '{args.phases}' "
        f"--single {args.single}`: real SmolLM2-135M with the adapter, json_mode, comparisons first, batches of 8; {len(work)} "
        f"validation tickets of the built-in training companies (the one-prompt phase: the first {args.single}, one episode at a "
        "time); each configuration a fresh pool in one Ray instance, one after the other in the order given; threads 0: the "
        "cores shared among the actors a call uses.",
        "",
        "| actors × threads | " + " | ".join(f"{p} s" for p in phases) + " | " + " | ".join(f"{p}: time ÷ {first}'s" for p in phases) + " |",
        "| --- " * (1 + 2 * len(phases)) + "|",
    ]
    for label, (seconds, _) in runs.items():
        lines.append(f"| {label} | " + " | ".join(f"{s:.0f}" for s in seconds) + " | "
                     + " | ".join(f"{s / r:.2f}" for r, s in zip(ref_seconds, seconds)) + " |")
    lines.append("")
    for label, (_, outputs) in list(runs.items())[1:]:
        said = []
        for phase in ("oracle's states", "own path"):
            if phase in outputs:
                said.append(f"largest difference in a ticket's score on the {phase} "
                            f"{max(abs(a - b) for (a, _), (b, _) in zip(ref[phase], outputs[phase])):.1e}")
        for phase in ("episodes", "one prompt"):
            if phase in outputs:
                said.append(f"the same escalations in every episode ({phase}): {outputs[phase] == ref[phase]}")
        lines.append(f"{label} against {first}: " + "; ".join(said) + ".")
    publish(args.name, lines)


if __name__ == "__main__":
    main()

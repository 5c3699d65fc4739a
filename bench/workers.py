"""Rollout actors × threads: one actor of two threads, or two actors of one thread each?

    .venv/bin/python bench/workers.py --adapter /tmp/run/adapters/v0002 [--per-company 4] [--configs 2x1,1x2]

Everything a round generates goes through `RayStudentPool`, which splits each call across its actors.
On a 2-core machine one actor of two threads leaves a core idle whenever its Python runs (the
generate loop, the escalation gate, the grammar's token masks), while two actors of one thread
overlap it. This times, with the real SmolLM2-135M and the given adapter (json_mode, comparisons
first, as the main command decodes), on the validation tickets of every built-in training company
(`--per-company` each), the three kinds of work a round does: p(escalate) on the oracle's states,
the student's own path with escalation barred (what τ is fitted on) and whole episodes (rollouts,
evaluation). Each configuration is a fresh pool in one Ray instance, one after the other in the
order given; the table gives seconds and the ratio to the first configuration, then how far the
outputs differ (batches of other rows: the same model, other padding). Writes
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

PHASES = ("oracle's states", "own path", "episodes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter folder (e.g. a main run's adapters/v0002)")
    parser.add_argument("--per-company", type=int, default=4, help="validation tickets per training company")
    parser.add_argument("--configs", default="2x1,1x2", help="comma-separated ACTORSxTHREADS, the first is the reference")
    parser.add_argument("--seed", type=int, default=0, help="the built-in packs' seed")
    parser.add_argument("--name", default="workers", help="report name under bench/reports/")
    args = parser.parse_args()
    configs = [tuple(map(int, c.split("x"))) for c in args.configs.split(",")]
    work = [(p, t) for p in build_packs(args.seed) if p.company.split == "train" for t in validation_tickets(p, args.per_company)]
    options = StudentOptions(batch_size=8, max_new_tokens=128, json_mode=True, comparisons_first=True)
    start_ray()
    runs = {}
    for actors, threads in configs:
        pool = RayStudentPool(resolve_model(DEFAULT_MODEL), options, n=actors, threads=threads)
        pool.load_adapter(args.adapter)
        seconds, outputs = [], []
        for phase in (lambda: ticket_scores(pool, work), lambda: own_path_scores(pool, work),
                      lambda: [e.result().escalated for e in run_episodes(StudentPolicy(pool), work, progress=False)]):
            clock = time.perf_counter()
            outputs.append(phase())
            seconds.append(time.perf_counter() - clock)
        pool.shutdown()
        runs[f"{actors}x{threads}"] = (seconds, outputs)
        print(f"{actors} actors x {threads} threads: " + ", ".join(f"{p} {s:.0f} s" for p, s in zip(PHASES, seconds)), flush=True)

    first, (ref_seconds, ref) = next(iter(runs.items()))
    lines = [
        "# Rollout actors × threads",
        "",
        f"`bench/workers.py --adapter {args.adapter} --per-company {args.per_company} --configs {args.configs}`: real SmolLM2-135M "
        f"with the adapter, json_mode, comparisons first, batches of 8; {len(work)} validation tickets of the built-in training "
        "companies; each configuration a fresh pool in one Ray instance, one after the other in the order given.",
        "",
        "| actors × threads | " + " | ".join(f"{p} s" for p in PHASES) + " | " + " | ".join(f"{p}: time ÷ {first}'s" for p in PHASES) + " |",
        "| --- " * (1 + 2 * len(PHASES)) + "|",
    ]
    for label, (seconds, _) in runs.items():
        lines.append(f"| {label} | " + " | ".join(f"{s:.0f}" for s in seconds) + " | "
                     + " | ".join(f"{s / r:.2f}" for r, s in zip(ref_seconds, seconds)) + " |")
    lines.append("")
    for label, (_, (oracle, own, escalated)) in list(runs.items())[1:]:
        d_oracle = max(abs(a - b) for (a, _), (b, _) in zip(ref[0], oracle))
        d_own = max(abs(a - b) for (a, _), (b, _) in zip(ref[1], own))
        lines.append(f"{label} against {first}: largest difference in a ticket's score {d_oracle:.1e} (oracle's states), "
                     f"{d_own:.1e} (own path); the same escalations in every episode: {escalated == ref[2]}.")
    publish(args.name, lines)


if __name__ == "__main__":
    main()

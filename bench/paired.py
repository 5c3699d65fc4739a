"""Two adapters, each from its own store, compared on the held-out tickets both were evaluated on.

    .venv/bin/python bench/paired.py score/apprentice.db:v0002 offline/apprentice.db:v0002 --name score-offline-main

How the README compares SCoRe with offline distillation at equal teacher tokens inside the main
command: one store runs both rounds (`apprentice run --rounds 2`, SCoRe in round 2); a copy of it
taken after round 1 runs round 2 as `apprentice run --rounds 1 --method offline`, with as many
fresh tickets as spend about the teacher tokens SCoRe spent. Everything printed comes from the
stores: each store's teacher tokens and calls (its `collected` events), each adapter's stored
held-out evaluation with 95% bootstrap intervals, and second − first, paired over the same tickets.
The same on other packs: record each adapter's `apprentice eval --pack bench/packs --db FILE` in its
own file and compare those (their teacher columns read "—").
"""

from __future__ import annotations

import argparse

from loop.metrics import compare, report
from loop.records import outcomes_of
from store.store import Store
from report import publish  # bench/report.py: the script's folder is on sys.path

SHOWN = ("valid_json_rate", "escalation_recall", "over_escalation_rate", "calibration_j", "escalation_auroc")


def parse(spec: str) -> tuple[str, str]:
    db, sep, version = spec.rpartition(":")
    if not sep or not db or not version:
        raise SystemExit(f"expected STORE:VERSION, got {spec!r}")
    return db, version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first", help="STORE:VERSION, the baseline (e.g. the SCoRe run's v0002)")
    parser.add_argument("second", help="STORE:VERSION, compared with the first")
    parser.add_argument("--labels", default="first,second", help="two comma-separated names for the table")
    parser.add_argument("--name", default="paired", help="report name: bench/reports/<name>.md")
    args = parser.parse_args()
    labels = args.labels.split(",")
    if len(labels) != 2:
        raise SystemExit("--labels takes two names")

    rows, outcomes = [], []
    for label, spec in zip(labels, (args.first, args.second)):
        db, version = parse(spec)
        store = Store.open(db)
        evaluated = outcomes_of(store.evaluations(version))
        if not evaluated:
            raise SystemExit(f"{db} has no stored evaluation of {version}")
        collected = [e.payload for e in store.events(kind="collected")]
        tokens, calls = (f"{sum(c['teacher_tokens'] for c in collected):,}", str(sum(c["teacher_calls"] for c in collected))) \
            if collected else ("—", "—")  # a store that only recorded `apprentice eval --db` collected nothing
        metrics = report(evaluated).metrics
        rows.append(f"| {label} | {version} | {tokens} | {calls} | {len(evaluated)} | "
                    + " | ".join(str(metrics[m]) for m in SHOWN) + " |")
        outcomes.append(evaluated)
    delta = compare(outcomes[1], outcomes[0])

    publish(args.name, [
        f"# {labels[1]} against {labels[0]}, paired over the same tickets", "",
        f"`bench/paired.py {args.first} {args.second} --labels {args.labels} --name {args.name}`", "",
        "Teacher tokens and calls: every `collected` event of the adapter's store (all rounds). Metrics: the adapter's",
        "stored evaluation, 95% bootstrap intervals over tickets.", "",
        "| run | adapter | teacher tokens | teacher calls | tickets | " + " | ".join(SHOWN) + " |",
        "| --- " * (5 + len(SHOWN)) + "|",
        *rows, "",
        f"{labels[1]} − {labels[0]} over {delta.n_tickets} paired tickets: "
        + ", ".join(f"Δ{m} {delta.delta[m]}" for m in ("calibration_j", "valid_json_rate", "escalation_recall", "over_escalation_rate")),
    ])


if __name__ == "__main__":
    main()

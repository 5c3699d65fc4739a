"""Fresh validation packs: tickets of the companies a run left out of training that τ never saw.

    .venv/bin/python bench/fresh_validation.py --run /tmp/run --out /tmp/fresh
    .venv/bin/apprentice eval --policy student --adapter /tmp/run/adapters/v0002 --pack /tmp/fresh --db fresh.db --json
    .venv/bin/python bench/paired.py old-fresh.db:v0002 fresh.db:v0002 --labels old,new --name fresh

A run's validation J is read on the ~100 tickets its τ was fitted on, so it is both optimistic and
noisy (one ticket moves it by 0.02–0.03). Held-out tickets choose nothing. These tickets can: for
each training company the run left out of training (its first draw of policy numbers), tickets
`--skip` to `--skip + --tickets` of its fixed evaluation order, written as pack folders that
`apprentice eval` reads. They are never trained on and are not among the tickets τ was fitted on
(under another draw of the numbers the same ticket id can be, never with the same text: the check
below says how many). The README's "One wording for every search" compared two runs on them.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from environments.pack import save_pack
from loop.evaluate import eval_tickets, validation_tickets
from loop.round import Runtime
from ops.config import load_config
from ops.run import build_packs, lora_settings, round_settings


def _first_draw(pack_id: str) -> str:
    """The company id of a redrawn built-in pack (`ledgerly-r3` -> `ledgerly`)."""
    company, sep, k = pack_id.rpartition("-r")
    return company if sep and k.isdigit() else pack_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `apprentice run` folder (its apprentice.toml)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pack folders (must not exist)")
    parser.add_argument("--skip", type=int, default=50, help="tickets of each evaluation order to pass over first")
    parser.add_argument("--tickets", type=int, default=60, help="tickets per company")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: give a new folder")
    cfg = load_config(args.run / "apprentice.toml")
    rt = Runtime(store=None, packs=build_packs(cfg), student=None, teacher=None, train=None, model_dir=None, base_model=cfg.model,
                 adapters_dir=None, settings=round_settings(cfg), lora=lora_settings(cfg), progress=False)
    if not rt.left_out:
        raise SystemExit("this run left no company out of training: its validation tickets are every company's split")
    fitted = [(p, t) for p in rt.validation_packs for t in validation_tickets(p, rt.calibration_per_pack)]
    fitted_texts, fitted_ids = {t.opening for _, t in fitted}, {(_first_draw(p.id), t.id) for p, t in fitted}
    for pack in rt.validation_packs:  # the left-out companies, every draw of their numbers
        if _first_draw(pack.id) != pack.id:
            continue
        tickets = tuple(eval_tickets(pack, None)[args.skip:args.skip + args.tickets])
        if fitted_texts & {t.opening for t in tickets}:
            raise SystemExit(f"{pack.id}: some of these tickets were fitted on: raise --skip")
        shared = sum((pack.id, t.id) in fitted_ids for t in tickets)
        path = save_pack(replace(pack, tickets=tickets), args.out / pack.id)
        n_escalate = sum(t.truth.resolution == "escalate" for t in tickets)
        print(f"{path}: {len(tickets)} tickets ({n_escalate} open with an escalation); "
              f"{shared} share an id, never the text, with a τ ticket under another draw")


if __name__ == "__main__":
    main()

"""Training throughput on this machine: apprentice's trainer against TRL's defaults, side by side.

    .venv/bin/python bench/train.py [--demos 12] [--epochs 1]

Both variants train a fresh LoRA adapter (r 16, all linear layers, batch 4) on the same oracle
demonstrations of built-in training tickets, with the real SmolLM2-135M, one after the other in
this process: "TRL defaults" is SFTTrainer's own loss (log-probs at every position), gradient
checkpointing on and LoRA dropout 0.05, as apprentice trained before; "apprentice" projects onto
the vocabulary only the positions that predict a trained token, without checkpointing or dropout.
Prints a table and writes bench/reports/train.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import torch

from environments.builtin import build_packs
from loop.evaluate import run_episodes
from loop.round import sample_tickets, training_messages
from loop.train import LoraSettings, train_adapter
from policies.models import resolve_model
from policies.policy import TeacherPolicy
from policies.teacher import OracleTeacher
from report import publish  # bench/report.py: the script's folder is on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demos", type=int, default=12, help="oracle demonstrations to train on")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over them")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    packs = [p for p in build_packs(0) if p.company.split == "train"]
    episodes = run_episodes(TeacherPolicy(OracleTeacher(), privileged=True), sample_tickets(packs, args.demos, seed=0),
                            max_steps=12, progress=False)
    conversations = [training_messages(e) for e in episodes if e.result().resolved]
    model_dir = resolve_model("smollm2-135m")
    base = LoraSettings(epochs=args.epochs, batch_size=4)
    variants = [("TRL defaults", dataclasses.replace(base, dropout=0.05), True), ("apprentice", base, False)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings, trl in variants:
            r = train_adapter(model_dir, conversations, f"{tmp}/{len(rows)}", settings, progress=False, trl_defaults=trl)
            rows.append((name, r))
    reference = rows[0][1].tokens_per_s
    lines = [
        "# Training throughput: apprentice's trainer vs TRL's defaults",
        "",
        f"{len(conversations)} oracle demonstrations of built-in training tickets, {args.epochs:g} epoch(s), batch 4, LoRA r 16 on all",
        f"linear layers, real SmolLM2-135M in float32, {torch.get_num_threads()} torch threads, CPU: {os.cpu_count()} cores.",
        "Both variants ran one after the other in one process on the same conversations.",
        "",
        "| variant | steps | tokens | seconds | tokens/s | speed-up | train loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {r.steps} | {r.tokens} | {r.seconds:.1f} | {r.tokens_per_s:.1f} | {r.tokens_per_s / reference:.2f}x | {r.train_loss:.3f} |"
              for name, r in rows]
    publish("train", lines)


if __name__ == "__main__":
    main()

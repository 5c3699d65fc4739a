"""One training step, three ways, on the same batches: is apprentice's unshared loss slower than TRL's?

    .venv/bin/python bench/step.py --batches 2 --batch 4

bench/train.py found apprentice's unshared trainer 1.6x slower than the previous TRL trainer at the
same batch size. This isolates the step: the same right-padded batches of oracle demonstrations
(real SmolLM2-135M, fresh LoRA r 16 on all linear layers, train mode), forward and backward of

- "apprentice": loop/train.py's `shared_prefix_loss(share=False)` (no attention mask, only the
  hidden states that predict a trained token reach the LM head);
- "apprentice + mask": the same with a padding attention mask;
- "TRL-style": the model's own forward with the mask and `logits_to_keep` on the union of trained
  positions, as bench/train.py's "before" trainer computes it.

Each is warmed up on the first batch, then timed over all of them; the CPU ops that cost most in one
step of each are profiled. Prints a table and writes bench/reports/step.md.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict

import torch
from peft import get_peft_model
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from environments.builtin import build_packs
from loop import train
from loop.evaluate import run_episodes
from loop.round import sample_tickets, training_messages
from loop.train import LoraSettings, collate, encode, lora_config, shared_prefix_loss
from policies.models import resolve_model, training_template
from policies.policy import OraclePolicy
from report import publish  # bench/report.py: the script's folder is on sys.path


def padding_mask(batch: dict) -> torch.Tensor:
    T = batch["input_ids"].shape[1]
    return (torch.arange(T)[None] < batch["lengths"][:, None]).long()


def op_cost(event) -> str:
    return f"{event.key.removeprefix('aten::')[:40]} {event.self_cpu_time_total / 1e6:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=2, help="batches timed per variant")
    parser.add_argument("--batch", type=int, default=4, help="conversations per batch")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    packs = [p for p in build_packs(0) if p.company.split == "train"]
    n = args.batches * args.batch
    conversations = [training_messages(e) for e in run_episodes(OraclePolicy(), sample_tickets(packs, n, seed=0), progress=False)][:n]
    model_dir = resolve_model("smollm2-135m")
    tokenizer = train.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = training_template(tokenizer)
    encoded = [asdict(encode(tokenizer, c, max_length=1024)) for c in conversations]
    batches = [collate(encoded[i : i + args.batch]) for i in range(0, n, args.batch)]
    base = train.load_base(model_dir, load_in_4bit=False, device="cpu")
    model = get_peft_model(base, lora_config(LoraSettings(), base.config.num_hidden_layers)).train()
    decoder, head = train._decoder_and_head(model)

    def masked(batch):
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=padding_mask(batch)).last_hidden_state
        targets = batch["labels"][:, 1:]
        trained = targets != -100
        return F.cross_entropy(head(hidden[:, :-1][trained]).float(), targets[trained])

    def trl_style(batch):
        targets = batch["labels"][:, 1:]
        keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
        out = model(input_ids=batch["input_ids"], attention_mask=padding_mask(batch), logits_to_keep=keep)
        return F.cross_entropy(out.logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=-100)

    variants = {"apprentice": lambda b: shared_prefix_loss(model, b, share=False), "apprentice + mask": masked, "TRL-style": trl_style}
    rows, tops = [], {}
    for name, loss_fn in variants.items():
        loss_fn(batches[0]).backward()
        model.zero_grad()
        start = time.perf_counter()
        for batch in batches:
            loss_fn(batch).backward()
            model.zero_grad()
        rows.append((name, (time.perf_counter() - start) / len(batches)))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss_fn(batches[0]).backward()
            model.zero_grad()
        tops[name] = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
        print(f"{name}: {rows[-1][1]:.2f} s/step", flush=True)

    reference = rows[-1][1]
    lines = [
        "# One training step, three ways, on the same batches",
        "",
        f"`bench/step.py --batches {args.batches} --batch {args.batch}`: real SmolLM2-135M, fresh LoRA r 16, "
        f"{torch.get_num_threads()} threads; batches of {args.batch} oracle demonstrations, lengths "
        f"{', '.join(str(b['lengths'].tolist()) for b in batches)} tokens, forward and backward.",
        "",
        "| variant | seconds per step | against TRL-style | costliest CPU ops in one step (self seconds) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {s:.2f} | {s / reference:.2f}x | {', '.join(op_cost(e) for e in tops[name])} |" for name, s in rows]
    publish("step", lines)


if __name__ == "__main__":
    main()

"""One training step, several ways, on the same batches: where does a step's time go?

    .venv/bin/python bench/step.py --batches 2 --batch 8

The same batches of one training company's oracle demonstrations (as the trainer groups them: one
company per batch; real SmolLM2-135M, fresh LoRA r 16 on all linear layers, train mode), forward
and backward of

- "shared prefix": loop/train.py's `shared_prefix_loss`, the company's system message once per batch;
- "unshared": the same loss with `share=False` (no attention mask, only the hidden states that
  predict a trained token reach the LM head);
- "TRL-style": the model's own forward with a padding mask and `logits_to_keep` on the union of
  trained positions, as bench/train.py's "before" trainer computes it;

each in float32 and in bf16 autocast (what `train_precision = "auto"` does on a CPU with AMX or
AVX-512 BF16). Each is warmed up on the first batch, then timed over all of them; the CPU ops that
cost most in one step of each are profiled. Prints a table and writes bench/reports/step.md.
"""

from __future__ import annotations

import argparse
import contextlib
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
from loop.train import LoraSettings, collate, encode, lora_config, shared_prefix_len, shared_prefix_loss
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
    parser.add_argument("--batch", type=int, default=8, help="conversations per batch")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    company = [p for p in build_packs(0) if p.company.split == "train"][:1]
    n = args.batches * args.batch
    conversations = [training_messages(e) for e in run_episodes(OraclePolicy(), sample_tickets(company, n, seed=0), progress=False)][:n]
    model_dir = resolve_model("smollm2-135m")
    tokenizer = train.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = training_template(tokenizer)
    encoded = [asdict(encode(tokenizer, c, max_length=1024)) for c in conversations]
    batches = [collate(encoded[i : i + args.batch]) for i in range(0, n, args.batch)]
    base = train.load_base(model_dir, load_in_4bit=False, device="cpu")
    model = get_peft_model(base, lora_config(LoraSettings(), base.config.num_hidden_layers)).train()

    def trl_style(batch):
        targets = batch["labels"][:, 1:]
        keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
        out = model(input_ids=batch["input_ids"], attention_mask=padding_mask(batch), logits_to_keep=keep)
        return F.cross_entropy(out.logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=-100)

    losses = {"shared prefix": lambda b: shared_prefix_loss(model, b), "unshared": lambda b: shared_prefix_loss(model, b, share=False),
              "TRL-style": trl_style}
    rows, tops = [], {}
    for precision in ("fp32", "bf16"):
        for name, loss_fn in losses.items():
            def step(batch):
                with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
                    loss = loss_fn(batch)
                loss.backward()
                model.zero_grad()

            step(batches[0])
            start = time.perf_counter()
            for batch in batches:
                step(batch)
            rows.append((f"{name}, {precision}", (time.perf_counter() - start) / len(batches)))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(batches[0])
            tops[rows[-1][0]] = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
            print(f"{rows[-1][0]}: {rows[-1][1]:.2f} s/step", flush=True)

    reference = dict(rows)["TRL-style, fp32"]
    lines = [
        "# One training step, several ways, on the same batches",
        "",
        f"`bench/step.py --batches {args.batches} --batch {args.batch}`: real SmolLM2-135M, fresh LoRA r 16, "
        f"{torch.get_num_threads()} threads; batches of {args.batch} oracle demonstrations of {company[0].id}, lengths "
        f"{', '.join(str(b['lengths'].tolist()) for b in batches)} tokens, shared prefix "
        f"{', '.join(str(shared_prefix_len(b['input_ids'], b['labels'])) for b in batches)} tokens; forward and backward, "
        "bf16 as torch.autocast on the CPU (float32 weights).",
        "",
        "| variant | seconds per step | against TRL-style fp32 | costliest CPU ops in one step (self seconds) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {s:.2f} | {s / reference:.2f}x | {', '.join(op_cost(e) for e in tops[name])} |" for name, s in rows]
    publish("step", lines)


if __name__ == "__main__":
    main()

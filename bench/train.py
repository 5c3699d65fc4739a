"""Training throughput: shared-prefix batches against the trainer apprentice had before, side by side.

    .venv/bin/python bench/train.py [--demos 64] [--epochs 1] [--batch 8] [--variants default,top,top-bounded] [--name train]

Every variant trains a fresh LoRA adapter (r 16, every layer unless it says) with the real SmolLM2-135M on
the same oracle demonstrations of built-in training tickets (drawn as a round draws them), one
after the other, each in a fresh process (so that its peak memory is its own):

- "before": the trainer of the previous release, kept here as the reference: TRL's collator
  (random batches, a padding mask), the loss on the union of trained positions; batch 4 with 2
  accumulation steps (the same effective batch of 8; at 8 it needs ~24 GB);
- "unshared": apprentice's loss (no padding mask, only trained tokens reach the LM head), batch 8,
  its rows through backward in chunks of 512 tokens (at once, a batch of 8 needs ~24 GB);
- "shared prefix, rows all at once": the same, one company per batch and its common prefix computed once,
  batch 8, one backward per batch (the default, `chunk_tokens = 0`);
- "shared prefix, rows in chunks of 512": the rows through backward in chunks of 512 tokens past the prefix
  (`chunk_tokens = 512`): what bounding a step's memory costs;
- "shared prefix, chunks, its forward twice" (also `recompute_prefix`): the prefix's forward without gradients
  first and again with them at the end, so its activations and a chunk's are never held together;
- "shared prefix, each layer recomputed" (`recompute_layers`): every decoder layer of the rows' pass under
  `checkpoint`, keeping its input for backward and computing its activations again there;
- "shared prefix, chunks, its forward twice, each layer recomputed": all three memory bounds at once;
- "shared prefix, LoRA on the top 15 layers" (`lora_layers = 15`; as good as every layer for a fresh adapter in
  bench/learning.py and in the main command of 2026-12-06): the lower half frozen, so backward stops halfway;
- the same with each layer recomputed (apprentice's default since 2026-12-06: "top-layers"), with chunks and
  each layer recomputed, and with all three memory bounds.

A key ending in "+unpadded" runs its variant with the token counts as they are, not rounded up to a
few matrix shapes (`loop.train.ROWS_MULTIPLE`), as the trainer took them before 2026-12-06, its oneDNN
kernel caches growing with every new shape; one ending in "+uncapped", with oneDNN's own 1,024 kernels
per cache, as before 2026-12-06 07:00 (`loop.train.KERNEL_CACHE`); one ending in "+mmap", with glibc's mmap
threshold fixed at 1 MiB.

Every variant autocasts to bfloat16 where `train_precision = "auto"` does (a CPU with AMX or AVX-512 BF16):
TRL's SFTConfig turns bf16 on by default, so "before" always ran that way (bench/step.py compares
float32 and bf16 steps).

Prints conversations/s, tokens/s counted as if unshared, the final loss and the peak resident
memory of each, then the shared-prefix speed-up over "before". Writes bench/reports/train.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.nn import functional as F

from environments.builtin import build_packs
from loop import train
from loop.evaluate import run_episodes
from loop.round import sample_tickets, training_messages
from loop.train import LoraSettings, peak_rss_gb, reset_peak_rss, train_adapter
from policies.models import resolve_model, training_template
from policies.policy import OraclePolicy
from report import publish  # bench/report.py: the script's folder is on sys.path


DEFAULT = "shared prefix, rows all at once"
CHUNK = 512  # tokens past the prefix per backward pass, in the variants that bound a step's memory
MMAP_THRESHOLD = 1 << 20  # bytes: "+mmap" variants map every allocation from this size up on its own
TOP_LAYERS = 15  # of SmolLM2-135M's 30: backward stops at the lowest layer with LoRA weights


class BeforeTrainer(train.SFTTrainer):
    """The previous release's trainer: TRL's own data pipeline, the loss on the union of trained positions."""

    loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets_B_T = inputs["labels"][:, 1:]
        keep_K = (targets_B_T != -100).any(dim=0).nonzero().squeeze(-1)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), logits_to_keep=keep_K)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets_B_T[:, keep_K].flatten(), ignore_index=-100)
        return (loss, out) if return_outputs else loss


def train_before(model_dir: Path, conversations: list, settings: LoraSettings) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = training_template(tokenizer)
    reset_peak_rss()
    model = train.load_base(model_dir, load_in_4bit=False, device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        config = train.SFTConfig(
            output_dir=scratch, assistant_only_loss=True, max_length=settings.max_length, per_device_train_batch_size=4,
            gradient_accumulation_steps=settings.batch_size // 4, num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
            lr_scheduler_type="cosine", save_strategy="no", report_to=[], seed=settings.seed, use_cpu=True, disable_tqdm=True,
            activation_checkpointing=False,  # as the previous release set it (TRL defaults to on)
            bf16=train.use_bf16(settings.precision, "cpu"),  # TRL's default (on), where the CPU computes bf16 natively
        )
        trainer = BeforeTrainer(model=model, args=config, train_dataset=Dataset.from_list([{"messages": c} for c in conversations]),
                                processing_class=tokenizer, peft_config=train.lora_config(settings, model.config.num_hidden_layers))
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "loss": output.training_loss, "steps": output.global_step, "peak": peak_rss_gb()}


def _start_process(threads: int, mmap_threshold: int, unpadded: bool, uncapped: bool) -> None:
    torch.set_num_threads(threads)
    if uncapped:  # oneDNN's own default: 1,024 kernels in each of its two caches
        os.environ["LRU_CACHE_CAPACITY"] = os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "1024"
    if mmap_threshold:
        train.fix_mmap_threshold(mmap_threshold)
    if unpadded:  # every packed length as it is: a new matrix shape for oneDNN at almost every step
        train.ROWS_MULTIPLE = train.ROW_MULTIPLE = 1


def in_fresh_process(fn, *args, mmap_threshold: int = 0, unpadded: bool = False, uncapped: bool = False, **kwargs):
    """`fn(*args, **kwargs)` in a new Python process with this one's torch threads, so that each
    variant's peak memory is its own (a process never hands all its freed heap back); with
    `mmap_threshold`, that process's allocations from that size up are mapped on their own (glibc);
    `unpadded`, its token counts are not rounded up for oneDNN (`loop.train.ROWS_MULTIPLE`); `uncapped`,
    oneDNN keeps 1,024 kernels per cache (`loop.train.KERNEL_CACHE`)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_process,
                             initargs=(torch.get_num_threads(), mmap_threshold, unpadded, uncapped)) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def variants(base: LoraSettings) -> dict[str, tuple[str, LoraSettings | None]]:
    """Key -> (the report's name, the settings; None for "before")."""
    chunks = dataclasses.replace(base, chunk_tokens=CHUNK)
    twice = dataclasses.replace(chunks, recompute_prefix=True)
    bounded = dataclasses.replace(twice, recompute_layers=True)
    return {
        "before": ("before (batch 4 x 2 accumulation)", None),
        "unshared": ("unshared", dataclasses.replace(chunks, share_prefix=False)),
        "default": (DEFAULT, base),
        "chunks": (f"shared prefix, rows in chunks of {CHUNK}", chunks),
        "twice": ("shared prefix, chunks, its forward twice", twice),
        "layers": ("shared prefix, each layer recomputed", dataclasses.replace(base, recompute_layers=True)),
        "bounded": ("shared prefix, chunks, its forward twice, each layer recomputed", bounded),
        "top": (f"shared prefix, LoRA on the top {TOP_LAYERS} layers", dataclasses.replace(base, lora_layers=TOP_LAYERS)),
        "top-layers": (f"shared prefix, LoRA on the top {TOP_LAYERS} layers, each layer recomputed",
                       dataclasses.replace(base, lora_layers=TOP_LAYERS, recompute_layers=True)),
        "top-chunked": (f"shared prefix, LoRA on the top {TOP_LAYERS} layers, chunks, each layer recomputed",
                        dataclasses.replace(chunks, lora_layers=TOP_LAYERS, recompute_layers=True)),
        "top-bounded": (f"shared prefix, LoRA on the top {TOP_LAYERS} layers, chunks, its forward twice, each layer recomputed",
                        dataclasses.replace(bounded, lora_layers=TOP_LAYERS)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demos", type=int, default=64, help="oracle demonstrations to train on")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over them")
    parser.add_argument("--batch", type=int, default=8, help="conversations per optimizer step")
    known = list(variants(LoraSettings()))
    parser.add_argument("--variants", default=",".join(known),
                        help=f"comma-separated, of {', '.join(known)} (default: all); a key ending in +mmap runs with"
                             f" glibc's mmap threshold fixed at {MMAP_THRESHOLD >> 10} KiB, one ending in +unpadded"
                             " without rounding token counts up to a few matrix shapes, one ending in +uncapped with"
                             " oneDNN's 1,024 kernels per cache")
    parser.add_argument("--name", default="train", help="report name under bench/reports/")
    args = parser.parse_args()
    keys = args.variants.split(",")
    if unknown := {k.split("+")[0] for k in keys} - set(known):
        parser.error(f"unknown variant(s) {sorted(unknown)}")
    torch.set_num_threads(os.cpu_count() or 1)

    packs = [p for p in build_packs(0) if p.company.split == "train"]
    episodes = run_episodes(OraclePolicy(), sample_tickets(packs, args.demos, seed=0), progress=False)
    conversations = [training_messages(e) for e in episodes]
    model_dir = resolve_model("smollm2-135m")
    tokenizer = train.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = training_template(tokenizer)
    tokens = round(sum(len(train.encode(tokenizer, c, max_length=1024).input_ids) for c in conversations) * args.epochs)
    n = len(conversations) * args.epochs
    base = LoraSettings(epochs=args.epochs, batch_size=args.batch, learning_rate=1e-3)

    rows = []  # (key, name, steps, seconds, loss, peak GB)
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            name, settings = variants(base)[key.split("+")[0]]
            mmap = MMAP_THRESHOLD if "+mmap" in key else 0
            unpadded, uncapped = "+unpadded" in key, "+uncapped" in key
            name += f", mmap threshold {MMAP_THRESHOLD >> 10} KiB" if mmap else ""
            name += ", token counts as they are (not rounded up)" if unpadded else ""
            name += ", 1,024 kernels per oneDNN cache" if uncapped else ""
            if settings is None:
                r = in_fresh_process(train_before, model_dir, conversations, base, mmap_threshold=mmap, unpadded=unpadded,
                                     uncapped=uncapped)
                rows.append((key, name, r["steps"], r["seconds"], r["loss"], r["peak"]))
            else:
                r = in_fresh_process(train_adapter, model_dir, conversations, Path(tmp) / key, settings, progress=False,
                                     mmap_threshold=mmap, unpadded=unpadded, uncapped=uncapped)
                rows.append((key, name, r.steps, r.seconds, r.train_loss, r.peak_memory_gb))
    seconds = {key: s for key, _, _, s, _, _ in rows}
    reference_key = next((k for k in ("before", "default") if k in seconds), rows[0][0])
    reference = seconds[reference_key]
    lines = [
        "# Training throughput: shared-prefix batches vs the previous trainer",
        "",
        f"{len(conversations)} oracle demonstrations of built-in training tickets ({tokens:,} tokens per epoch counted unshared),",
        f"{args.epochs:g} epoch(s), {args.batch} conversations per optimizer step, LoRA r 16 (every layer unless a variant says),"
        " learning rate 1e-3,",
        f"real SmolLM2-135M, float32 weights, {'bf16 autocast' if train.use_bf16('auto', 'cpu') else 'no bf16 units: float32'}, "
        f"{torch.get_num_threads()} torch threads, CPU: {os.cpu_count()} cores.",
        f"Variants ran one after the other, each in a fresh process, on the same conversations (`bench/train.py --demos {args.demos}"
        f" --variants {args.variants}`). Speed-up: against {next(n for k, n, *_ in rows if k == reference_key)}.",
        "",
        "| variant | steps | seconds | conversations/s | tokens/s (as if unshared) | train loss | peak memory | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {steps} | {s:.0f} | {n / s:.3f} | {tokens / s:.0f} | {loss:.3f} | {peak:.1f} GB | {reference / s:.2f}x |"
              for _, name, steps, s, loss, peak in rows]
    if "before" in seconds and "default" in seconds:
        lines += ["", f"shared-prefix speed-up: {seconds['before'] / seconds['default']:.2f}x"]
    publish(args.name, lines)


if __name__ == "__main__":
    main()

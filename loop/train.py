"""LoRA / QLoRA training of an adapter on the aggregate training set (TRL SFTTrainer + PEFT).

    result = train_adapter(model_dir, conversations, Path("adapters/v0003"), LoraSettings())

A new adapter starts fresh (PEFT's init: B = 0), or from an earlier adapter's weights of the same
shape (`LoraSettings.start_from`): a later round then adds its pass to what the last one learned.

Loss is on assistant turns only: the tokenizer gets SmolLM2's ChatML template with
`{% generation %}` markers, so one multi-turn trajectory trains in one forward pass.

**Shared-prefix batches.** Every conversation of a company starts with the same ~550-token system
message, out of ~700. The trainer puts one company's conversations in a batch (`CompanyBatches`),
runs the batch's common token prefix once (batch size 1, gradients on) and then the rows' suffixes,
without padding, as one packed sequence against its KV cache, each row attending to the prefix and
causally to itself (`shared_prefix_loss`); autograd sums the prefix's gradients over the rows. Loss
and every LoRA gradient equal the unshared computation (tests/test_train.py). A batch without a long
common prefix takes the plain path.

**Memory.** What a step keeps for backward is the activations of every token with gradients. The
shared prefix and the packing cut those tokens about 3x at batch 8; `loss_backward` can then take
the rows through backward in chunks of `chunk_tokens` past the prefix, against the prefix's keys
and values held as leaves, and run the prefix's backward once at the end, so a step holds the
prefix's activations and one chunk's, whatever the batch. `recompute_layers` goes further: each
decoder layer, the prefix's and the rows', runs under `checkpoint` and keeps only its input, its
activations computed again in backward (one more forward); the prefix's keys and values reach the
rows' replay through a read-only `PrefixCache`, and the prefix's own replay through a
`_ReplayableCache`, so a replay attends to the same. Only the hidden states that predict a trained
token reach the LM head (49k-wide), `HEAD_CHUNK` of them at a time, their logits computed again in
backward. A step's token counts are rounded up to a few shapes (`ROWS_MULTIPLE`, `ROW_MULTIPLE`):
oneDNN compiles kernels for every new matrix shape and keeps them, which grew a run's memory step
after step by gigabytes; `cap_kernel_caches` keeps each of its two caches to `KERNEL_CACHE` kernels.
In float32, attention runs in SDPA's fused kernels,
which keep no T×T tensor; under bf16 autocast the suffixes' attention is written in matmuls, which
bf16 speeds up where the fused CPU kernel gains nothing (`_prefix_keys_once`), and recomputed in
backward rather than keeping its attention weights (~40% of what a step kept). Under bf16 the
frozen linear weights are held in bf16 for the run (`hold_frozen_linears`), so a pass keeps no
autocast copy of them. All of these leave every number as it was (tested).

TRL hosts all of it: `AssistantLossTrainer` is an `SFTTrainer` with its own collator, batch
sampler and `training_step` (forward and backward by `loss_backward`); the Trainer keeps the
optimizer, schedule, accumulation, and bf16 autocast (on CUDA, and on a CPU with native bf16 units:
`use_bf16`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Sampler
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DynamicCache, TrainerCallback
from trl import SFTConfig, SFTTrainer

from policies.hf import mean_logprobs
from policies.models import training_template

PROBE_FILE = "probe.json"
# Fixed texts whose log-probs identify an adapter: a worker that swapped adapters checks that it
# computes the same values the trainer saved (a stale adapter gives different ones).
PROBE_TEXTS = (
    '{"action": "search_kb", "args": {"query": "refund policy"}, "thought": "Check the KB first.", "message": ""}',
    '{"action": "escalate", "args": {"reason": "billing_exception"}, "thought": "Policy says escalate.", "message": "A colleague will help."}',
)
MIN_SHARED_PREFIX = 32  # shorter common prefixes are not worth a separate forward pass
# Token counts a step's matmuls see are rounded up to multiples of these (`_padded`): oneDNN compiles
# and keeps kernels for every new matrix shape (~1-2.5 MB each, in two caches of 1,024), so a
# trainer that fed it every packed length grew by gigabytes over a run (bench/train.py --variants).
ROWS_MULTIPLE = 64  # the packed suffix tokens of a chunk, and the trained tokens reaching the LM head
ROW_MULTIPLE = 32  # one row's own block in `_prefix_keys_once`
# And each cache holds this many kernels, not 1,024: a step reuses its few shapes in every layer,
# while the shared prefix's length differs per company and policy draw, each a new set of kernels.
KERNEL_CACHE = 64
HEAD_CHUNK = 256  # trained tokens per pass through the LM head (`_head_loss`)
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The tokens that carry the decision inside an assistant step: the action's name and the reason code.
_DECISION = re.compile(r'"(?:action|reason)":\s*"([a-z_]+)"')


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    epochs: float = 2.0
    learning_rate: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    load_in_4bit: bool = False
    seed: int = 0
    decision_weight: float = 1.0  # loss weight of the action-name and reason-code tokens (1 = plain mean)
    lora_layers: int = 0  # LoRA on the top N decoder layers only; 0 = every layer
    share_prefix: bool = True  # one company's conversations per batch, its common prefix computed once
    chunk_tokens: int = 0  # a batch's rows go through backward in chunks of this many tokens past the shared prefix (0: all at once)
    recompute_prefix: bool = False  # the shared prefix's forward twice, so its activations and a chunk's are never held together
    recompute_layers: bool = False  # the suffixes' decoder layers recomputed in backward: a layer keeps its input, not its activations
    precision: str = "auto"  # "bf16": bfloat16 autocast (float32 weights); "fp32"; "auto": bf16 where the hardware computes it natively
    start_from: str = ""  # an adapter folder of the same LoRA shape whose weights this one starts from ("": fresh)


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str
    train_loss: float
    steps: int
    tokens: int  # tokens of the conversations trained on, counted as if unshared (all epochs)
    seconds: float
    tokens_per_s: float
    probe_logprobs: list[float]
    conversations_per_s: float = 0.0
    peak_memory_gb: float = 0.0  # peak resident memory of the training process


@dataclass(frozen=True)
class Encoded:
    """One conversation as the trainer sees it."""

    input_ids: list[int]
    labels: list[int]  # the token where it is trained, -100 elsewhere
    weights: list[float]  # per-token loss weight (decision tokens may weigh more)


def encode(tokenizer, conversation: list[dict[str, str]], *, max_length: int, decision_weight: float = 1.0) -> Encoded:
    """Tokenize with the training template; labels on assistant tokens; the decision tokens weighted.

    `tokenizer.chat_template` must be the training template (with generation markers)."""
    out = tokenizer.apply_chat_template(conversation, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"][:max_length], out["assistant_masks"][:max_length]
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    weights = [1.0] * len(ids)
    if decision_weight != 1.0:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        spans = [m.span(1) for m in _DECISION.finditer(text)]
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][:max_length]
        for i, (start, end) in enumerate(offsets):
            if labels[i] != -100 and any(start < b and end > a for a, b in spans):
                weights[i] = decision_weight
    return Encoded(ids, labels, weights)


class CompanyBatches(Sampler[list[int]]):
    """Batches of one group (a company's system message) each, so a batch shares a long prefix.
    Every pass shuffles each group, cuts it into batches and shuffles the batches."""

    def __init__(self, groups: Sequence[str], batch_size: int, *, seed: int = 0):
        self.by_group: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            self.by_group.setdefault(g, []).append(i)
        self.batch_size, self.seed, self.passes = batch_size, seed, 0

    def __len__(self) -> int:
        return sum(-(-len(ix) // self.batch_size) for ix in self.by_group.values())

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}:{self.passes}")
        self.passes += 1
        batches = []
        for group in sorted(self.by_group):
            ix = rng.sample(self.by_group[group], len(self.by_group[group]))
            batches += [ix[b : b + self.batch_size] for b in range(0, len(ix), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded tensors and each row's length. No attention mask: with right padding no real
    token attends to a pad, so plain causal attention is exact (fused SDPA, no mask tensor)."""
    T = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value, dtype) -> torch.Tensor:
        return torch.tensor([e[key] + [value] * (T - len(e[key])) for e in examples], dtype=dtype)

    return {"input_ids": pad("input_ids", 0, torch.long), "labels": pad("labels", -100, torch.long),
            "weights": pad("weights", 0.0, torch.float32), "lengths": torch.tensor([len(e["input_ids"]) for e in examples])}


def shared_prefix_len(input_ids_B_T: torch.Tensor, labels_B_T: torch.Tensor) -> int:
    """Length of the batch's common token prefix, ending before the first position whose logits
    are trained (those are computed with the suffixes); 0 when not worth sharing."""
    if input_ids_B_T.shape[0] < 2:
        return 0
    same_T = (input_ids_B_T == input_ids_B_T[:1]).all(dim=0)
    common = int(same_T.long().cumprod(0).sum())
    first_target = int((labels_B_T != -100).long().argmax(dim=1).min()) - 1  # logits at t predict t + 1
    P = min(common, first_target)
    return P if P >= MIN_SHARED_PREFIX else 0


def _decoder_and_head(peft_model):
    """The decoder stack and the LM head under a PEFT model (LoRA layers injected in place)."""
    causal_lm = peft_model.get_base_model()
    return causal_lm.base_model, causal_lm.get_output_embeddings()


def _suffix_rows_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *, suffix_rows=(), **kwargs):
    """Attention for packed suffixes behind a shared prefix: `query` [1, H, N, D] holds the rows'
    suffixes back to back, `key`/`value` [1, Hkv, P + N, D] the cached prefix and then the same
    suffixes. Each row attends to the prefix and causally to itself. In float32, one fused SDPA call
    per row, so no row pays for another's keys (a packed mask would make the kernel compute them all);
    under bf16 or fp16 autocast, `_prefix_keys_once` in that dtype (the rotary embedding hands
    attention float32 queries and keys even then), recomputed in backward: its attention weights
    are ~1.5 GB of a batch of 8 on SmolLM2-135M, the recompute one more attention forward."""
    rows, scale = list(suffix_rows), query.shape[-1] ** -0.5 if scaling is None else scaling
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    if dtype in (torch.float32, torch.float64):
        out = _rows_one_by_one(query, key, value, rows, scale)
    else:
        args = (query.to(dtype), key.to(dtype), value.to(dtype), rows, scale)
        out = checkpoint(_prefix_keys_once, *args, use_reentrant=False) if torch.is_grad_enabled() else _prefix_keys_once(*args)
    return out.transpose(1, 2).contiguous(), None


def _rows_one_by_one(query, key, value, rows: list[int], scale: float) -> torch.Tensor:
    P = key.shape[2] - query.shape[2]
    # split/cat, not per-row slicing: their backward writes each gradient once, not into a zeroed full-size copy per row
    k_prefix, v_prefix = key[:, :, :P], value[:, :, :P]
    outputs = []
    for q, k, v in zip(query.split(rows, dim=2), key[:, :, P:].split(rows, dim=2), value[:, :, P:].split(rows, dim=2)):
        S = q.shape[2]
        mask_S_PS = torch.ones(S, P + S, dtype=torch.bool, device=q.device)
        mask_S_PS[:, P:] = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        outputs.append(F.scaled_dot_product_attention(q, torch.cat([k_prefix, k], dim=2), torch.cat([v_prefix, v], dim=2),
                                                      attn_mask=mask_S_PS, scale=scale, enable_gqa=q.shape[1] != k.shape[1]))
    return torch.cat(outputs, dim=2)


def _prefix_keys_once(query, key, value, rows: list[int], scale: float) -> torch.Tensor:
    """The same attention written out in matmuls: every row's queries meet the prefix keys in one
    matmul per key head (its query heads stacked), and their own row's keys row by row; one softmax
    per row over both. SDPA's CPU kernel gains nothing from bf16 (bench/step.py); these matmuls do.
    Autograd would keep each layer's attention weights (H × N × (P + row) values) for backward, so
    the trainer runs this under `checkpoint`, which recomputes them there instead."""
    _, H, N, D = query.shape
    Hkv, P = key.shape[1], key.shape[2] - N
    G = H // Hkv  # query heads per key head; head h reads key head h // G, as transformers' repeat_kv

    def by_key_head(x_H_n_E):  # [1, H, n, E] -> [1, Hkv, G * n, E]
        return x_H_n_E.reshape(1, Hkv, G * x_H_n_E.shape[2], x_H_n_E.shape[3])

    def by_head(x_Hkv_Gn_E, n: int):  # the inverse
        return x_Hkv_Gn_E.reshape(1, H, n, x_Hkv_Gn_E.shape[3])

    q_H_N_D = query * scale
    scores_H_N_P = by_head(by_key_head(q_H_N_D) @ key[:, :, :P].transpose(2, 3), N)
    weights_prefix, outputs_own = [], []
    for q, s_prefix, k, v in zip(q_H_N_D.split(rows, dim=2), scores_H_N_P.split(rows, dim=2),
                                 key[:, :, P:].split(rows, dim=2), value[:, :, P:].split(rows, dim=2)):
        S = q.shape[2]
        # The row's block rounded up with zeros (`ROW_MULTIPLE`): the causal mask hides the filler
        # keys from the row's queries, and the filler queries' outputs are cut off.
        q, s_prefix, k, v = (_padded(x, ROW_MULTIPLE, dim=2) for x in (q, s_prefix, k, v))
        n = q.shape[2]
        s_own = by_head(by_key_head(q) @ k.transpose(2, 3), n)
        s_own = s_own.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        w_prefix, w_own = torch.softmax(torch.cat([s_prefix, s_own], dim=3), dim=3).to(v.dtype).split([P, n], dim=3)
        weights_prefix.append(w_prefix[:, :, :S])
        outputs_own.append(by_head(by_key_head(w_own) @ v, n)[:, :, :S])
    return by_head(by_key_head(torch.cat(weights_prefix, dim=2)) @ value[:, :, :P], N) + torch.cat(outputs_own, dim=2)


SUFFIX_ROWS_ATTENTION = "apprentice_suffix_rows"
AttentionInterface.register(SUFFIX_ROWS_ATTENTION, _suffix_rows_attention)


@contextlib.contextmanager
def _suffix_attention(decoder):
    """The decoder's attention is `_suffix_rows_attention` while inside (it reads the config per call)."""
    config, implementation = decoder.config, decoder.config._attn_implementation
    config._attn_implementation = SUFFIX_ROWS_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = implementation


def shared_prefix_loss(model, batch: dict[str, torch.Tensor], *, share: bool = True) -> torch.Tensor:
    """Weighted mean next-token loss over the labelled tokens of a right-padded batch (`collate`), in
    one graph (`loss_backward` computes the same in bounded memory).

    With `share` and a long common prefix, the prefix runs once (batch 1) and the rows' suffixes,
    without padding, run as one packed sequence against its KV cache, each suffix token at
    its own position, attending to the prefix and its own row (`_suffix_rows_attention`). Either
    way only the hidden states that predict a labelled token reach the LM head."""
    decoder, head = _decoder_and_head(model)
    P = shared_prefix_len(batch["input_ids"], batch["labels"]) if share else 0
    cache = decoder(input_ids=batch["input_ids"][:1, :P], use_cache=True).cache if P else None
    return _rows_loss_sum(decoder, head, batch, list(range(len(batch["lengths"]))), P, cache) / _trained_weight(batch)


def loss_backward(model, batch: dict[str, torch.Tensor], *, share: bool = True, chunk_tokens: int = 0, recompute_prefix: bool = False,
                  recompute_layers: bool = False, scale: float = 1.0, autocast=contextlib.nullcontext) -> float:
    """Forward and backward of `shared_prefix_loss` × `scale`, the rows in chunks of at most
    `chunk_tokens` tokens past the prefix (0: one chunk); returns the loss. Gradients equal the
    one-graph computation's; what a step keeps for backward is the prefix's activations and one
    chunk's, not every row's. The prefix runs once: each chunk reads its keys and values as leaves,
    which collect the chunks' gradients, and the prefix's own backward runs last, on their sum.
    `recompute_prefix` runs the prefix without gradients first and again with them at the end, so
    its activations and a chunk's are never held together (one more prefix forward per step).
    `recompute_layers` runs each decoder layer under `checkpoint`, the prefix's and the rows': it
    keeps its input for backward and computes its activations again there (one more forward).
    The forward passes run under `autocast()`, the backward passes outside it."""
    decoder, head = _decoder_and_head(model)
    P = shared_prefix_len(batch["input_ids"], batch["labels"]) if share else 0

    def prefix_cache():
        layers = _layers_recomputed(decoder) if recompute_layers and torch.is_grad_enabled() else contextlib.nullcontext()
        with autocast(), layers:
            return decoder(input_ids=batch["input_ids"][:1, :P], cache=_ReplayableCache(config=decoder.config), use_cache=True).cache

    cache, leaves = None, []
    if P:
        with torch.no_grad() if recompute_prefix else contextlib.nullcontext():
            cache = prefix_cache()
        leaves = [tuple(t.detach().requires_grad_(trained) for t in (layer.keys, layer.values))
                  for layer, trained in zip(cache.layers, _keys_trained(decoder))]
    weight, loss = _trained_weight(batch), 0.0
    for rows in _chunks([int(L) - P for L in batch["lengths"]], chunk_tokens):
        with autocast(), _layers_recomputed(decoder) if recompute_layers else contextlib.nullcontext():
            part = _rows_loss_sum(decoder, head, batch, rows, P, PrefixCache(leaves, config=decoder.config) if P else None) / weight
        with _suffix_attention(decoder) if P and recompute_layers else contextlib.nullcontext():  # the layers' replay attends so too
            (part * scale).backward()
        loss += part.item()
    if P:
        cache = prefix_cache() if recompute_prefix else cache
        prefix = [(t, leaf.grad) for layer, kv in zip(cache.layers, leaves) for t, leaf in zip((layer.keys, layer.values), kv)
                  if t.requires_grad and leaf.grad is not None]
        if prefix:  # empty only when no weight of the decoder trains
            torch.autograd.backward(*zip(*prefix))
    return loss


class _ReplayableCache(DynamicCache):
    """The prefix's cache, filled by one forward pass whose layers may run again in backward (under
    `checkpoint`): a layer's replay attends to its own keys and values, as the first pass did, and
    the cache keeps the first pass's."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.layers[layer_idx].is_initialized:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class PrefixCache(DynamicCache):
    """The shared prefix's keys and values, read only: a layer gets them with its new tokens'
    appended, and the cache keeps nothing new, so a layer recomputed in backward reads the same."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


@contextlib.contextmanager
def _layers_recomputed(decoder):
    """Each decoder layer's forward under `checkpoint` (non-reentrant) while inside."""
    for layer in decoder.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in decoder.layers:
            del layer.forward


def _keys_trained(decoder) -> list[bool]:
    """Per decoder layer: whether a trainable weight at or below it can move its keys and values
    (below LoRA's lowest layer, none: backward stops there)."""
    trained, out = any(p.requires_grad for p in decoder.get_input_embeddings().parameters()), []
    for layer in decoder.layers:
        trained = trained or any(p.requires_grad for p in layer.parameters())
        out.append(trained)
    return out


def _chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices of `sizes` grouped so that each group's sum stays within `budget` (0: no
    bound); a single larger size makes a group of its own."""
    groups, total = [[]], 0
    for i, size in enumerate(sizes):
        if budget and groups[-1] and total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def _trained_weight(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["weights"][:, 1:][batch["labels"][:, 1:] != -100].sum()


def _rows_loss_sum(decoder, head, batch: dict[str, torch.Tensor], rows: list[int], P: int, cache) -> torch.Tensor:
    """Weighted sum of the next-token losses of `rows` of the batch: after `cache`'s P prefix tokens,
    their suffixes packed (`_suffix_rows_attention`), or with P 0 the rows themselves, right-padded."""
    input_ids_B_T, labels_B_T, weights_B_T = batch["input_ids"][rows], batch["labels"][rows], batch["weights"][rows]
    lengths = [int(batch["lengths"][b]) for b in rows]
    if not P:
        T = max(lengths)
        hidden_B_T_D = decoder(input_ids=input_ids_B_T[:, :T]).last_hidden_state
        targets_B_T, w_B_T = labels_B_T[:, 1:T], weights_B_T[:, 1:T]
        trained_B_T = targets_B_T != -100
        hidden_N_D, targets_N, weights_N = hidden_B_T_D[:, :-1][trained_B_T], targets_B_T[trained_B_T], w_B_T[trained_B_T]
    else:
        ids_S = torch.cat([input_ids_B_T[b, P:L] for b, L in enumerate(lengths)])
        positions_S = torch.cat([torch.arange(P, L, device=ids_S.device) for L in lengths])
        suffix_rows = [L - P for L in lengths]
        if pad := -len(ids_S) % ROWS_MULTIPLE:  # a filler row of its own: no other row attends to it
            ids_S, positions_S = _padded(ids_S, ROWS_MULTIPLE), torch.cat([positions_S, torch.arange(P, P + pad, device=ids_S.device)])
            suffix_rows.append(pad)
        with _suffix_attention(decoder):
            hidden_S_D = decoder(input_ids=ids_S[None], position_ids=positions_S[None], cache=cache, use_cache=True,
                                 suffix_rows=suffix_rows).last_hidden_state[0]
        # Token s of row b predicts that row's next token; the row's last token predicts nothing.
        no_target = torch.tensor([-100], device=ids_S.device)
        targets_S = torch.cat([torch.cat([labels_B_T[b, P + 1 : L], no_target]) for b, L in enumerate(lengths)])
        w_S = torch.cat([torch.cat([weights_B_T[b, P + 1 : L], no_target.float()]) for b, L in enumerate(lengths)])
        targets_S, w_S = F.pad(targets_S, (0, pad), value=-100), F.pad(w_S, (0, pad))  # the filler row predicts nothing
        trained_S = targets_S != -100
        hidden_N_D, targets_N, weights_N = hidden_S_D[trained_S], targets_S[trained_S], w_S[trained_S]
        # Zero rows of weight 0 round the LM head's tokens up too: they add exactly nothing.
        hidden_N_D, targets_N, weights_N = (_padded(x, ROWS_MULTIPLE) for x in (hidden_N_D, targets_N, weights_N))
    return _head_loss(head, hidden_N_D, targets_N, weights_N)


def _head_loss(head, hidden_N_D: torch.Tensor, targets_N: torch.Tensor, weights_N: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the next-token losses of `hidden_N_D`, through the LM head `HEAD_CHUNK` tokens
    at a time, each chunk's logits computed again in backward: a step holds the 49k-wide logits
    (and their float32 log-softmax) of one chunk, not of every trained token of the batch."""

    def part(h_n_D, t_n, w_n):
        return (F.cross_entropy(head(h_n_D).float(), t_n, reduction="none") * w_n).sum()

    chunks = zip(*(x.split(HEAD_CHUNK) for x in (hidden_N_D, targets_N, weights_N)))
    if not torch.is_grad_enabled():
        return sum(part(*c) for c in chunks)
    return sum(checkpoint(part, *c, use_reentrant=False) for c in chunks)


def _padded(x: torch.Tensor, multiple: int, dim: int = 0) -> torch.Tensor:
    """`x` with zeros appended along `dim` up to a multiple of `multiple` of its length."""
    if not (pad := -x.shape[dim] % multiple):
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class AssistantLossTrainer(SFTTrainer):
    """SFTTrainer over pre-tokenized conversations: one company per batch, the shared prefix once,
    the rows' backward in chunks (`loss_backward`)."""

    def __init__(self, *args, groups: Sequence[str], lora: LoraSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups, self.lora = groups, lora

    def get_train_dataloader(self) -> DataLoader:
        batches = CompanyBatches(self.groups, self.args.per_device_train_batch_size, seed=self.args.seed)
        return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=batches, collate_fn=collate, num_workers=0))

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step (a per-micro-batch mean, divided by the accumulation steps), its backward
        done by `loss_backward` in chunks; the autocast is the accelerator's (bf16 where asked)."""
        model.train()
        scale = 1 / self.current_gradient_accumulation_steps
        loss = loss_backward(model, self._prepare_inputs(inputs), share=self.lora.share_prefix, chunk_tokens=self.lora.chunk_tokens,
                             recompute_prefix=self.lora.recompute_prefix, recompute_layers=self.lora.recompute_layers, scale=scale,
                             autocast=self.accelerator.autocast)
        return torch.tensor(loss * scale, device=self.args.device)


class _Snapshots(TrainerCallback):
    """Saves the adapter after the optimizer step that brings the conversations trained on to each
    of `at` (bench/learning.py evaluates a learning curve from one run)."""

    def __init__(self, at: Sequence[int], per_step: int, out_dir: Path, clock: float):
        self.at, self.per_step, self.out_dir, self.clock, self.saved = sorted(at), per_step, out_dir, clock, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        seen = state.global_step * self.per_step
        while self.at and seen >= self.at[0]:
            n = self.at.pop(0)
            path = self.out_dir.with_name(f"{self.out_dir.name}@{n}")
            model.save_pretrained(path)
            (path / "snapshot.json").write_text(json.dumps({"conversations": seen, "seconds": time.perf_counter() - self.clock}))
            self.saved.append(path)


def load_base(model_dir: Path, *, load_in_4bit: bool, device: str):
    if load_in_4bit:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": device})
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)


def hold_frozen_linears(model, dtype: torch.dtype) -> None:
    """Hold the frozen weights of the decoder's linear layers in `dtype` for a training run under
    `dtype` autocast. Autocast casts a weight that needs no gradient again at every call, and a
    step keeps each cast for backward (~0.2 GB per pass for SmolLM2-135M); held cast once, a pass
    keeps the weight itself. Same numbers (the cast is the same); the tied embeddings and LM head
    stay float32. A model treated so is for training only: its base is no longer the float32 one."""
    tied = model.get_output_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and module.weight is not tied:
            module.weight.data = module.weight.data.to(dtype)


def lora_config(settings: LoraSettings, n_layers: int) -> LoraConfig:
    """LoRA on the attention and MLP projections of the top `lora_layers` decoder layers (0, or at
    least the model's depth: every layer)."""
    layers = list(range(n_layers - settings.lora_layers, n_layers)) if 0 < settings.lora_layers < n_layers else None
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, task_type="CAUSAL_LM",
                      target_modules=LORA_MODULES, layers_to_transform=layers)


def same_shape(adapter_dir: str | Path, settings: LoraSettings) -> bool:
    """Whether the adapter in `adapter_dir` was trained with the LoRA shape `settings` asks for, so
    a new adapter can start from its weights."""
    try:
        was = json.loads((Path(adapter_dir) / PROBE_FILE).read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return False
    return all(was.get(k) == getattr(settings, k) for k in ("r", "alpha", "lora_layers"))


def load_lora_weights(model: PeftModel, adapter_dir: str | Path) -> None:
    """Load an earlier adapter's LoRA weights into the freshly wrapped `model` (same shape)."""
    weights = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # a rank that differs: size mismatches
        raise ValueError(f"{adapter_dir} does not fit this LoRA shape: {e}") from e
    if result.unexpected_keys:
        raise ValueError(f"{adapter_dir} does not fit this LoRA shape: {len(result.unexpected_keys)} weights have no place, "
                         f"e.g. {result.unexpected_keys[0]}")


def use_bf16(precision: str, device: str, *, load_in_4bit: bool = False) -> bool:
    """Whether training autocasts to bfloat16. "auto" does on CUDA and on a CPU with native bf16
    matrix units (AMX or AVX-512 BF16: bench/train.py measures what it buys), not for a 4-bit base on CPU."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if device == "cuda":
        return True
    return not load_in_4bit and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def train_adapter(model_dir: Path, conversations: list[list[dict[str, str]]], out_dir: Path, settings: LoraSettings, *,
                  progress: bool = True, snapshots: Sequence[int] = ()) -> TrainResult:
    """Train a LoRA adapter on `conversations` (fresh, or from `settings.start_from`), save it (and
    its probe values) to `out_dir`.

    snapshots: also save the adapter as `<out_dir>@N` once N conversations were trained on."""
    if not conversations:
        raise ValueError("no training conversations")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cap_kernel_caches()
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = training_template(tokenizer)
    encoded = [encode(tokenizer, c, max_length=settings.max_length, decision_weight=settings.decision_weight) for c in conversations]
    keep = [i for i, e in enumerate(encoded) if any(label != -100 for label in e.labels)]  # truncation may leave none
    dataset = Dataset.from_list([asdict(encoded[i]) for i in keep])
    groups = [conversations[i][0]["content"] if settings.share_prefix else "" for i in keep]
    reset_peak_rss()
    model = load_base(model_dir, load_in_4bit=settings.load_in_4bit, device=device)
    with tempfile.TemporaryDirectory() as scratch:
        config = SFTConfig(
            output_dir=scratch, per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
            num_train_epochs=settings.epochs, learning_rate=settings.learning_rate, lr_scheduler_type="cosine",
            warmup_steps=0, logging_steps=5, save_strategy="no", activation_checkpointing=False, report_to=[], seed=settings.seed,
            use_cpu=device == "cpu", bf16=use_bf16(settings.precision, device, load_in_4bit=settings.load_in_4bit),
            disable_tqdm=not progress, dataloader_num_workers=0,
            remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        )
        trainer = AssistantLossTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                       peft_config=lora_config(settings, model.config.num_hidden_layers), data_collator=collate,
                                       groups=groups, lora=settings)
        if settings.start_from:
            load_lora_weights(trainer.model, settings.start_from)
        if config.bf16 and not settings.load_in_4bit:
            hold_frozen_linears(trainer.model, torch.bfloat16)
        start = time.perf_counter()
        saver = _Snapshots(snapshots, settings.batch_size * settings.grad_accum, out_dir, start)
        trainer.add_callback(saver)
        output = trainer.train()
        seconds = time.perf_counter() - start
    # Written beside, then renamed: a crash never leaves a half-saved adapter under its version.
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    trainer.model.save_pretrained(partial)
    del trainer, model
    gc.collect()
    # On a fresh base, as a worker that loads the adapter computes them (the trained base's frozen
    # weights may be held in bf16, and accelerate's autocast wrapper stays on its forward).
    model = PeftModel.from_pretrained(load_base(model_dir, load_in_4bit=settings.load_in_4bit, device=device), partial).eval()
    with torch.no_grad():
        probes = [round(x, 5) for x in mean_logprobs(model, tokenizer, list(PROBE_TEXTS), model.device)]
    (partial / PROBE_FILE).write_text(json.dumps({"texts": list(PROBE_TEXTS), "logprobs": probes, "settings": asdict(settings)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    tokens = int(sum(len(encoded[i].input_ids) for i in keep) * settings.epochs)
    n_conversations = len(keep) * settings.epochs
    return TrainResult(str(out_dir), float(output.training_loss), int(output.global_step), tokens, seconds, tokens / max(seconds, 1e-9),
                       probes, n_conversations / max(seconds, 1e-9), peak_rss_gb())


def reset_peak_rss() -> None:
    """Start measuring the peak resident memory afresh (Linux; elsewhere nothing happens)."""
    gc.collect()
    try:  # hand the heap freed by earlier work back first, so the new peak starts from what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
    except OSError:
        pass


def cap_kernel_caches(size: int = KERNEL_CACHE) -> None:
    """Keep oneDNN's kernel caches (PyTorch's and oneDNN's own) to `size` kernels each in this process,
    unless the environment already says how many. Each reads its variable when first used, so this
    counts only before the process's first bf16 matmul; a training process comes here first."""
    for variable in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(variable, str(size))


def fix_mmap_threshold(size: int) -> bool:
    """Have glibc map every allocation of `size` bytes or more on its own, and unmap it when freed.

    By default glibc raises that threshold (up to 32 MB) each time a mapped block is freed, so a
    training step's activations soon come from the heap, where freed blocks between live ones are
    kept by the process. Returns whether it was set (False off glibc)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, size))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def peak_rss_gb() -> float:
    """Peak resident memory of this process since it started or `reset_peak_rss`, in GB (Linux: VmHWM)."""
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return 0.0

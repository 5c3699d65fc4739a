"""Training on the tiny model: the shared-prefix loss equals the unshared one (loss and every LoRA
gradient), adapter weights change and base weights do not, the mask and the weights are right."""

import contextlib
import functools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loop import train
from loop.train import (
    PROBE_FILE,
    CompanyBatches,
    LoraSettings,
    collate,
    encode,
    load_base,
    lora_config,
    same_shape,
    shared_prefix_len,
    shared_prefix_loss,
    train_adapter,
)
from policies.hf import mean_logprobs
from policies.models import resolve_model, training_template

train_prefix_keys_once = train._prefix_keys_once

SYSTEM = {"role": "system", "content": "You are the support agent of Acme. Policy: " + "refunds within 30 days self-serve; " * 8}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "Customer: Where is my order?"},
    {"role": "assistant", "content": '{"thought":"","action":"clarify","args":{},"message":"Your order id?"}'},
    {"role": "user", "content": "Customer: My order id is A-1."},
    {"role": "assistant", "content": '{"thought":"","action":"reply","args":{},"message":"It ships in 2 days."}'},
]


def conversations(n: int) -> list[list[dict[str, str]]]:
    """`n` different conversations of one company, of different lengths."""
    return [[SYSTEM, {"role": "user", "content": "Customer: " + "my parcel is late, " * (i + 1)},
             {"role": "assistant", "content": '{"thought":"Late parcel.","action":"escalate","args":{"reason":"likely_bug"},'
                                             f'"message":"{"Sorry. " * (1 + i % 3)}"}}'}] for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = training_template(tok)
    return tok


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer):
    e = encode(tokenizer, CONVERSATION, max_length=1024)
    trained = tokenizer.decode([t for t in e.labels if t != -100])
    assert trained == "".join(m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant")


def test_decision_weight_lands_on_the_action_and_reason_tokens(tokenizer):
    e = encode(tokenizer, conversations(1)[0], max_length=1024, decision_weight=4.0)
    heavy = tokenizer.decode([t for t, w in zip(e.input_ids, e.weights) if w == 4.0])
    assert heavy == "escalatelikely_bug"
    assert all(w == 1.0 for t, w in zip(e.labels, e.weights) if w != 4.0)
    assert all(label != -100 for label, w in zip(e.labels, e.weights) if w == 4.0)  # only trained tokens weigh more


def lora_model(model_dir, *, load_in_4bit=False, lora_layers=0):
    torch.manual_seed(0)
    base = load_base(model_dir, load_in_4bit=load_in_4bit, device="cpu")
    model = get_peft_model(base, lora_config(LoraSettings(r=4, alpha=8, lora_layers=lora_layers), base.config.num_hidden_layers))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; non-zero B makes every LoRA gradient non-trivial
            torch.nn.init.normal_(p, std=0.1)
    return model


def loss_and_grads(model, batch, share: bool, chunk_tokens: int | None = None, recompute_prefix: bool = False,
                   recompute_layers: bool = False):
    """With `chunk_tokens`, as the trainer computes them (`loss_backward`); without, in one graph."""
    model.zero_grad()
    if chunk_tokens is None:
        loss = shared_prefix_loss(model, batch, share=share)
        loss.backward()
        loss = loss.item()
    else:
        loss = train.loss_backward(model, batch, share=share, chunk_tokens=chunk_tokens, recompute_prefix=recompute_prefix,
                                   recompute_layers=recompute_layers)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("load_in_4bit,lora_layers", [(False, 0), (True, 0), (False, 1)])
def test_shared_prefix_loss_and_every_lora_gradient_equal_the_unshared(tiny_model_dir, tokenizer, load_in_4bit, lora_layers):
    model = lora_model(tiny_model_dir, load_in_4bit=load_in_4bit, lora_layers=lora_layers)
    batch = collate([vars(encode(tokenizer, c, max_length=1024, decision_weight=3.0)) for c in conversations(4)])
    P = shared_prefix_len(batch["input_ids"], batch["labels"])
    assert P > 32  # the system message is shared
    with torch.no_grad():  # bitsandbytes' 4-bit CPU matmul rounds differently (~1e-4) once it has run without gradients
        shared_prefix_loss(model, batch)
    loss, grads = loss_and_grads(model, batch, share=False)
    assert grads.keys() and all(g.abs().sum() > 0 for g in grads.values())
    # one graph; the trainer's way in one chunk, in chunks of one or two rows, recomputing the prefix, recomputing
    # every layer of the rows' pass (alone and with both others); unshared in chunks, and recomputing its layers
    suffixes = (batch["lengths"] - P).tolist()
    assert len(train._chunks(suffixes, max(suffixes) + min(suffixes))) in (2, 3)
    for share, chunk_tokens, recompute, layers in [(True, None, False, False), (True, 0, False, False),
                                                   (True, max(suffixes) + min(suffixes), False, False), (True, 1, False, False),
                                                   (True, 1, True, False), (True, 0, False, True), (True, 1, True, True),
                                                   (False, 1, False, False), (False, 0, False, True)]:
        other_loss, other_grads = loss_and_grads(model, batch, share=share, chunk_tokens=chunk_tokens, recompute_prefix=recompute,
                                                 recompute_layers=layers)
        assert abs(other_loss - loss) <= 1e-4 * abs(loss), (share, chunk_tokens, recompute, layers)
        assert other_grads.keys() == grads.keys()
        for name, g in grads.items():
            assert (other_grads[name] - g).norm() <= 1e-4 * g.norm(), (share, chunk_tokens, recompute, layers, name)


def test_chunks_keep_order_and_stay_within_the_budget():
    assert train._chunks([3, 4, 2, 9, 1], 7) == [[0, 1], [2], [3], [4]]
    assert train._chunks([3, 4, 2], 0) == [[0, 1, 2]]


def test_unshared_loss_is_the_causal_lm_loss(tiny_model_dir, tokenizer):
    model = lora_model(tiny_model_dir)
    encoded = [encode(tokenizer, c, max_length=1024) for c in conversations(3)]
    batch = collate([vars(e) for e in encoded])
    with torch.no_grad():
        ours = shared_prefix_loss(model, batch, share=False)
        mask = (torch.arange(batch["input_ids"].shape[1])[None] < batch["lengths"][:, None]).long()
        reference = model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"]).loss
    assert torch.allclose(ours, reference, atol=1e-5)


def test_bf16_suffix_attention_is_the_same_attention_as_sdpa_row_by_row():
    """The matmul form that bf16 steps take, against one SDPA call per row, in float64 (grouped key heads)."""
    rows, P, H, Hkv, D = [5, 9, 1, 7], 11, 6, 2, 8
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, H, sum(rows), D, generator=g, dtype=torch.float64),
              torch.randn(1, Hkv, P + sum(rows), D, generator=g, dtype=torch.float64),
              torch.randn(1, Hkv, P + sum(rows), D, generator=g, dtype=torch.float64)]
    results = []
    for attend in (train._rows_one_by_one, train._prefix_keys_once):
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        out = attend(q, k, v, rows, 0.3)
        (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()).sum().backward()
        results.append([out, q.grad, k.grad, v.grad])
    for by_row, once in zip(*results):
        assert torch.allclose(by_row, once, rtol=1e-10, atol=1e-12)


def test_shared_prefix_loss_under_bf16_autocast_stays_near_the_unshared(tiny_model_dir, tokenizer, monkeypatch):
    model = lora_model(tiny_model_dir)
    batch = collate([vars(encode(tokenizer, c, max_length=1024)) for c in conversations(4)])
    calls = []
    monkeypatch.setattr(train, "_prefix_keys_once", lambda *a: calls.append(a[0].dtype) or train_prefix_keys_once(*a))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        shared, unshared = (shared_prefix_loss(model, batch, share=s).item() for s in (True, False))
    assert calls and set(calls) == {torch.bfloat16}  # every layer's suffix attention took the bf16 form
    assert abs(shared - unshared) <= 2e-2 * abs(unshared)


def test_a_bf16_step_keeps_less_for_backward_and_computes_the_same(tiny_model_dir, tokenizer, monkeypatch):
    """Under bf16 autocast the trainer holds the frozen linears in bf16 and recomputes the suffixes'
    attention in backward: the same loss and LoRA gradients, bit for bit, as autocast's own casts and
    kept attention weights, with less kept for backward."""
    batch = collate([vars(encode(tokenizer, c, max_length=1024)) for c in conversations(4)])

    def step(model):
        kept = {}

        def pack(t):
            # What bf16 keeps, the LM head's cast aside (on the tiny model it outweighs the decoder's)
            if t.dtype == torch.bfloat16 and t.numel() != model.get_output_embeddings().weight.numel():
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = shared_prefix_loss(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, sum(kept.values())

    lean = lora_model(tiny_model_dir)
    train.hold_frozen_linears(lean, torch.bfloat16)
    held = {n: p.dtype for n, p in lean.named_parameters()}
    assert held["base_model.model.model.layers.0.mlp.down_proj.base_layer.weight"] == torch.bfloat16
    assert {d for n, d in held.items() if "lora_" in n or "embed" in n} == {torch.float32}
    loss, grads, kept = step(lean)
    monkeypatch.setattr(train, "checkpoint", lambda fn, *args, **kwargs: fn(*args))  # attention weights kept
    full_loss, full_grads, full_kept = step(lora_model(tiny_model_dir))
    assert loss == full_loss and grads.keys() == full_grads.keys()
    assert all(torch.equal(g, full_grads[n]) for n, g in grads.items())
    assert kept < 0.8 * full_kept, (kept, full_kept)


def test_recomputing_the_layers_under_bf16_computes_the_same(tiny_model_dir, tokenizer):
    """The trainer's bf16 step with every layer of the rows' pass recomputed in backward (the
    attention's own recompute nested inside): the same loss and LoRA gradients, bit for bit."""
    batch = collate([vars(encode(tokenizer, c, max_length=1024)) for c in conversations(4)])
    model = lora_model(tiny_model_dir)
    train.hold_frozen_linears(model, torch.bfloat16)
    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    results = []
    for layers in (False, True):
        model.zero_grad()
        loss = train.loss_backward(model, batch, chunk_tokens=0, recompute_layers=layers, autocast=bf16)
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (again, regrads) = results
    assert loss == again and all(torch.equal(g, regrads[n]) for n, g in grads.items())
    assert all("forward" not in vars(layer) for layer in train._decoder_and_head(model)[0].layers)  # unwrapped after the step


@pytest.mark.parametrize("bf16", [False, True])
def test_token_counts_rounded_up_to_few_shapes_add_nothing(tiny_model_dir, tokenizer, monkeypatch, bf16):
    """Every matrix a shared step multiplies has a token count rounded up to `ROWS_MULTIPLE` (filler
    rows and zero rows of weight 0), so oneDNN meets few shapes over a run; loss and gradients stay
    those of the exact counts."""
    batch = collate([vars(encode(tokenizer, c, max_length=1024)) for c in conversations(3)])
    P = shared_prefix_len(batch["input_ids"], batch["labels"])
    assert (sum(batch["lengths"]) - 3 * P) % train.ROWS_MULTIPLE  # the rows alone would not fill a multiple
    model = lora_model(tiny_model_dir)
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    seen, rounded = [], train.ROWS_MULTIPLE
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2]))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    results = []
    for multiples in ((train.ROWS_MULTIPLE, train.ROW_MULTIPLE), (1, 1)):
        monkeypatch.setattr(train, "ROWS_MULTIPLE", multiples[0])
        monkeypatch.setattr(train, "ROW_MULTIPLE", multiples[1])
        model.zero_grad()
        seen.clear()
        loss = train.loss_backward(model, batch, chunk_tokens=0, autocast=autocast)
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, set(seen)))
    for h in hooks:
        h.remove()
    (loss, grads, shapes), (exact_loss, exact_grads, exact_shapes) = results
    assert P in shapes and shapes - {P} and all(n % rounded == 0 for n in shapes - {P}), shapes
    assert any(n % rounded for n in exact_shapes - {P}), exact_shapes  # the comparison is not with itself
    tolerance = 1e-2 if bf16 else 1e-5  # other matrix shapes may block their sums otherwise
    assert abs(loss - exact_loss) <= tolerance * abs(exact_loss)
    assert all((g - exact_grads[n]).norm() <= tolerance * exact_grads[n].norm() for n, g in grads.items())


def test_the_lm_head_runs_in_chunks_and_keeps_no_logits_for_backward(tiny_model_dir, tokenizer, monkeypatch):
    batch = collate([vars(encode(tokenizer, c, max_length=1024)) for c in conversations(3)])
    model = lora_model(tiny_model_dir)
    vocab = model.get_output_embeddings().weight.shape[0]

    def step():
        logits = []
        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: logits.append(t.dim() > 0 and t.shape[-1] == vocab) or t, lambda t: t):
            loss = train.loss_backward(model, batch, chunk_tokens=0)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, any(logits)

    monkeypatch.setattr(train, "HEAD_CHUNK", 10**6)
    whole_loss, whole_grads, _ = step()
    monkeypatch.setattr(train, "HEAD_CHUNK", 8)
    loss, grads, kept = step()
    assert not kept  # what a chunk saves is its hidden states; its logits come again in backward
    assert abs(loss - whole_loss) <= 1e-5 * abs(whole_loss)
    assert all((g - whole_grads[n]).norm() <= 1e-5 * whole_grads[n].norm() for n, g in grads.items())
    monkeypatch.setattr(train, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    assert step()[2]  # without the recompute, the logits would be kept


def test_company_batches_hold_one_company_and_cover_every_conversation_each_pass():
    groups = ["a"] * 10 + ["b"] * 5 + ["c"]
    batches = CompanyBatches(groups, batch_size=4, seed=0)
    first, second = list(batches), list(batches)
    assert len(first) == len(batches) == 3 + 2 + 1
    for order in (first, second):
        assert sorted(i for b in order for i in b) == list(range(16))
        assert all(len({groups[i] for i in b}) == 1 and len(b) <= 4 for b in order)
    assert first != second  # reshuffled every pass


def test_training_changes_adapter_not_base(tiny_model_dir, tmp_path):
    base_before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()}
    settings = LoraSettings(r=4, alpha=8, epochs=2, batch_size=2, learning_rate=5e-3, max_length=256)
    result = train_adapter(tiny_model_dir, [CONVERSATION] * 4, tmp_path / "v0001", settings, progress=False, snapshots=[4])
    adapter = load_file(tmp_path / "v0001" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # PEFT initialises B to zero: training moved it
    base_after = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert result.steps == 4 and result.tokens > 0 and result.train_loss > 0
    probe = json.loads((tmp_path / "v0001" / PROBE_FILE).read_text())
    assert probe["logprobs"] == result.probe_logprobs and len(probe["texts"]) == 2
    assert not (tmp_path / "v0001.partial").exists()
    snapshot = tmp_path / "v0001@4"  # after 2 steps of 2 conversations: a different adapter than the final one
    assert json.loads((snapshot / "snapshot.json").read_text())["conversations"] == 4
    assert not torch.equal(load_file(snapshot / "adapter_model.safetensors")[next(k for k in adapter if "lora_B" in k)],
                           adapter[next(k for k in adapter if "lora_B" in k)])


@pytest.mark.parametrize("precision,autocast", [("bf16", True), ("fp32", False)])
def test_training_autocasts_the_loss_to_bf16_when_asked(tiny_model_dir, tmp_path, monkeypatch, precision, autocast):
    seen = []
    real = train._rows_loss_sum

    def spy(*args):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(*args)

    monkeypatch.setattr(train, "_rows_loss_sum", spy)
    settings = LoraSettings(r=4, alpha=8, epochs=1, batch_size=2, learning_rate=5e-3, max_length=256, precision=precision)
    result = train_adapter(tiny_model_dir, [CONVERSATION] * 2, tmp_path / precision, settings, progress=False)
    assert seen == [autocast] and result.train_loss > 0
    adapter = load_file(tmp_path / precision / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in adapter.values())  # the weights stay float32 either way
    # The probes were computed on the float32 base, as a worker loading the adapter computes them.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / precision).eval()
    assert mean_logprobs(fresh, tok, list(train.PROBE_TEXTS), "cpu") == pytest.approx(result.probe_logprobs, abs=1e-4)


def test_auto_precision_is_bf16_on_cuda_and_never_for_a_4bit_base_on_cpu():
    assert train.use_bf16("auto", "cuda") and not train.use_bf16("fp32", "cuda") and train.use_bf16("bf16", "cpu")
    assert not train.use_bf16("auto", "cpu", load_in_4bit=True)
    with pytest.raises(ValueError, match="precision"):
        train.use_bf16("half", "cpu")


def test_lora_on_the_top_layers_only(tiny_model_dir, tmp_path):
    settings = LoraSettings(r=4, alpha=8, epochs=1, batch_size=2, learning_rate=5e-3, lora_layers=1)
    train_adapter(tiny_model_dir, [CONVERSATION] * 2, tmp_path / "top", settings, progress=False)
    layers = {k.split("layers.")[1].split(".")[0] for k in load_file(tmp_path / "top" / "adapter_model.safetensors")}
    assert layers == {"1"}  # the tiny model has layers 0 and 1
    for deeper_than_the_model in (2, 15):
        assert lora_config(replace(settings, lora_layers=deeper_than_the_model), 2).layers_to_transform is None


def test_qlora_4bit_training_on_cpu(tiny_model_dir, tmp_path):
    settings = LoraSettings(r=4, alpha=8, epochs=1, batch_size=2, learning_rate=5e-3, max_length=256, load_in_4bit=True)
    result = train_adapter(tiny_model_dir, [CONVERSATION] * 2, tmp_path / "q", settings, progress=False)
    adapter = load_file(tmp_path / "q" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert result.steps == 1


@pytest.mark.slow
def test_shared_prefix_is_exact_on_the_real_model():
    """One batch of 4 built-in demonstrations of one company on the real SmolLM2-135M."""
    from environments.builtin import build_packs
    from loop.evaluate import run_episodes
    from loop.round import training_messages
    from policies.policy import OraclePolicy

    model_dir = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = training_template(tok)
    pack = next(p for p in build_packs(0) if p.company.split == "train")
    episodes = run_episodes(OraclePolicy(), [(pack, t) for t in pack.tickets[:4]], progress=False)
    batch = collate([vars(encode(tok, training_messages(e), max_length=1024)) for e in episodes])
    model = lora_model(model_dir)
    loss, grads = loss_and_grads(model, batch, share=False)
    for chunk_tokens in (None, 1):  # one graph; the trainer's way, a row per chunk
        shared_loss, shared_grads = loss_and_grads(model, batch, share=True, chunk_tokens=chunk_tokens)
        assert abs(shared_loss - loss) <= 1e-4 * abs(loss)
        worst = max(((shared_grads[n] - g).norm() / g.norm()).item() for n, g in grads.items())
        assert worst <= 1e-4, worst


def test_a_new_adapter_starts_from_an_earlier_one_of_the_same_shape(tiny_model_dir, tmp_path):
    settings = LoraSettings(r=4, alpha=8, epochs=1, batch_size=2, learning_rate=5e-3, max_length=256)
    train_adapter(tiny_model_dir, [CONVERSATION] * 2, tmp_path / "v1", settings, progress=False)
    earlier = load_file(tmp_path / "v1" / "adapter_model.safetensors")
    # At learning rate 0 the new adapter is exactly where it started: the earlier one, or PEFT's fresh init (B = 0).
    frozen = replace(settings, learning_rate=0.0)
    train_adapter(tiny_model_dir, [CONVERSATION] * 2, tmp_path / "v2", replace(frozen, start_from=str(tmp_path / "v1")), progress=False)
    continued = load_file(tmp_path / "v2" / "adapter_model.safetensors")
    assert continued.keys() == earlier.keys() and all(torch.equal(continued[k], earlier[k]) for k in earlier)
    train_adapter(tiny_model_dir, [CONVERSATION] * 2, tmp_path / "v3", frozen, progress=False)
    assert all(v.abs().sum() == 0 for k, v in load_file(tmp_path / "v3" / "adapter_model.safetensors").items() if "lora_B" in k)
    assert same_shape(tmp_path / "v1", settings) and not same_shape(tmp_path / "v1", replace(settings, r=8))
    with pytest.raises(ValueError, match="does not fit this LoRA shape"):
        train_adapter(tiny_model_dir, [CONVERSATION] * 2, tmp_path / "v4", replace(settings, r=8, start_from=str(tmp_path / "v1")),
                      progress=False)


def run_script(tmp_path, text: str, arg: str) -> float:
    """`text` run as a fresh Python process from the repo root with `arg`; the number it prints."""
    script = tmp_path / "script.py"
    script.write_text(text)
    return float(subprocess.run([sys.executable, str(script), arg], check=True, capture_output=True, text=True,
                                cwd=Path(train.__file__).parents[1]).stdout)


FRAGMENTING_STEP = """
import sys
if sys.argv[1] == "fixed":
    from loop.train import fix_mmap_threshold
    assert fix_mmap_threshold(1 << 20)
import torch  # the default case imports nothing else: what an import leaves on the heap moves glibc's threshold either way
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
start = rss_mb()
for step in range(3):  # a step's pattern: large activations freed while small tensors live on between them
    large, small = [], []
    for i in range(40):
        large.append(torch.ones(2_000_000 + 1000 * i))  # ~8 MB each
        small.append(torch.ones(1000))
    del large
print(rss_mb() - start)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc (Linux)")
def test_a_fixed_mmap_threshold_hands_freed_activations_back(tmp_path):
    """glibc raises its mmap threshold whenever a mapped block is freed, so a step's later
    activations come from the heap and, freed between live small tensors, stay with the process."""
    held = {how: run_script(tmp_path, FRAGMENTING_STEP, how) for how in ("default", "fixed")}
    assert held["default"] > 150  # MB of freed activations the process kept
    assert held["fixed"] < 30


SHAPE_AFTER_SHAPE = """
import sys
import torch
from loop.train import cap_kernel_caches
if sys.argv[1] == "capped":
    cap_kernel_caches()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
linear = torch.nn.Linear(576, 1536)
x = torch.randn(8, 576)
with torch.autocast("cpu", dtype=torch.bfloat16):
    linear(x).sum().backward()
start = rss_mb()
for n in range(64, 64 + 300):  # a token count oneDNN has not seen: new kernels, forward and backward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(torch.randn(n, 576)).sum().backward()
print(rss_mb() - start)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or not train.use_bf16("auto", "cpu"),
                    reason="reads resident memory from /proc (Linux); bf16 matmuls go through oneDNN on CPUs with bf16 units")
def test_capped_kernel_caches_keep_a_run_of_new_shapes_from_growing_the_process(tmp_path, monkeypatch):
    """oneDNN compiles kernels for every new matrix shape and, by default, keeps 1,024 per cache."""
    for variable in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.delenv(variable, raising=False)
    grown = {how: run_script(tmp_path, SHAPE_AFTER_SHAPE, how) for how in ("uncapped", "capped")}
    assert grown["capped"] < grown["uncapped"] / 2, grown


def test_kernel_caches_capped_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    train.cap_kernel_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == str(train.KERNEL_CACHE)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"

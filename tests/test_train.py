"""Training on the tiny model: adapter weights change, base weights do not; the mask is right."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loop.train import PROBE_FILE, LoraSettings, train_adapter, trained_token_loss
from policies.models import training_template

CONVERSATION = [
    {"role": "system", "content": "You are the support agent of Acme."},
    {"role": "user", "content": "Customer: Where is my order?"},
    {"role": "assistant", "content": '{"thought": "", "action": "clarify", "args": {}, "message": "Your order id?"}'},
    {"role": "user", "content": "Customer: My order id is A-1."},
    {"role": "assistant", "content": '{"thought": "", "action": "reply", "args": {}, "message": "It ships in 2 days."}'},
]


def test_assistant_mask_covers_exactly_the_assistant_turns(smollm2_tokenizer):
    out = smollm2_tokenizer.apply_chat_template(
        CONVERSATION, chat_template=training_template(smollm2_tokenizer), return_assistant_tokens_mask=True, return_dict=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = smollm2_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    expected = "".join(m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant")
    assert trained == expected


def test_trained_token_loss_equals_the_full_causal_lm_loss(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 24))
    mask = torch.ones_like(ids)
    mask[2, 18:] = 0  # right padding on one row
    labels = torch.full_like(ids, -100)
    labels[0, 5:9], labels[1, 12:20], labels[2, 3:6] = ids[0, 5:9], ids[1, 12:20], ids[2, 3:6]  # different spans per row
    with torch.no_grad():
        fast, _ = trained_token_loss(model, ids, mask, labels)
        full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(fast, full, atol=1e-5)


def test_training_changes_adapter_not_base(tiny_model_dir, tmp_path):
    base_before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()}
    settings = LoraSettings(r=4, alpha=8, epochs=2, batch_size=2, learning_rate=5e-3, max_length=256)
    result = train_adapter(tiny_model_dir, [CONVERSATION] * 4, tmp_path / "v0001", settings, progress=False)
    adapter = load_file(tmp_path / "v0001" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # PEFT initialises B to zero: training moved it
    base_after = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert result.steps == 4 and result.tokens > 0 and result.train_loss > 0
    probe = json.loads((tmp_path / "v0001" / PROBE_FILE).read_text())
    assert probe["logprobs"] == result.probe_logprobs and len(probe["texts"]) == 2
    assert not (tmp_path / "v0001.partial").exists()


def test_qlora_4bit_training_on_cpu(tiny_model_dir, tmp_path):
    settings = LoraSettings(r=4, alpha=8, epochs=1, batch_size=2, learning_rate=5e-3, max_length=256, load_in_4bit=True)
    result = train_adapter(tiny_model_dir, [CONVERSATION] * 2, tmp_path / "q", settings, progress=False)
    adapter = load_file(tmp_path / "q" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert result.steps == 1

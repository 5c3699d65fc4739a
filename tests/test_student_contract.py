"""One contract for every student backend. The vLLM run skips without vLLM and a CUDA GPU."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from policies.hf import HFStudent
from policies.vllm_student import VLLMStudent, vllm_available

PROMPTS = [
    [{"role": "system", "content": "You are a support agent."}, {"role": "user", "content": "Customer: where is my order?"}],
    [{"role": "user", "content": "Customer: I want a refund for my widget, it broke after two days."}],
]
PROBES = ['{"action": "search_kb", "args": {"query": "refunds"}}']


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    path = tmp_path_factory.mktemp("contract") / "v0007"
    model.save_pretrained(path)
    return path


def hf(model_dir):
    return HFStudent(model_dir, max_new_tokens=12)


def vllm(model_dir):
    return VLLMStudent(model_dir, max_new_tokens=12, gpu_memory_utilization=0.3)


BACKENDS = [
    pytest.param(hf, id="hf"),
    pytest.param(vllm, id="vllm", marks=[pytest.mark.gpu, pytest.mark.skipif(vllm_available() is not None, reason=str(vllm_available()))]),
]


@pytest.mark.parametrize("make", BACKENDS)
def test_student_contract(make, tiny_model_dir, adapter_dir):
    student = make(tiny_model_dir)
    base = student.act(PROMPTS)
    assert len(base) == 2 and all(isinstance(t, str) for t in base) and student.adapter_id is None
    base_probe = student.probe_logprobs(PROBES)

    student.load_adapter(adapter_dir)
    assert student.adapter_id == "v0007"
    assert student.probe_logprobs(PROBES) != pytest.approx(base_probe, abs=1e-3)  # the adapter is live
    assert student.act(PROMPTS) != base

    student.load_adapter(None)
    assert student.adapter_id is None and student.act(PROMPTS) == base
    assert student.probe_logprobs(PROBES) == pytest.approx(base_probe, abs=1e-4)


def test_vllm_missing_is_a_clear_error(tiny_model_dir):
    if vllm_available() is None:
        pytest.skip("vLLM and a GPU are here")
    with pytest.raises(RuntimeError, match="vLLM"):
        VLLMStudent(tiny_model_dir)

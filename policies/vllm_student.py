"""The `vllm` student backend (GPU; `pip install apprentice[vllm]`).

One `vllm.LLM(..., enable_lora=True)` engine; each adapter version is a `LoRARequest` with its own
integer id, so a swap never reloads the base. After a swap, `probe_logprobs` lets the caller check
that the adapter is live (silent stale-adapter sampling is the classic failure of such systems).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from policies.student import Message


def vllm_available() -> str | None:
    """None when vLLM and a CUDA GPU are both here; else why not."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed: pip install 'apprentice[vllm]' (needs a CUDA GPU)"
    import torch

    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and none is visible; use the hf backend on CPU"
    return None


class VLLMStudent:
    def __init__(self, model_dir: Path, adapter: Path | None = None, *, max_new_tokens: int = 160, temperature: float = 0.0,
                 seed: int = 0, max_lora_rank: int = 64, gpu_memory_utilization: float = 0.85):
        missing = vllm_available()
        if missing:
            raise RuntimeError(missing)
        from vllm import LLM, SamplingParams

        self._llm = LLM(model=str(model_dir), enable_lora=True, max_lora_rank=max_lora_rank, seed=seed,
                        gpu_memory_utilization=gpu_memory_utilization)
        self._sampling = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed)
        self._lora = None
        self._next_id = 1
        self.adapter_id: str | None = None
        if adapter is not None:
            self.load_adapter(adapter)

    def act(self, prompts: list[list[Message]]) -> list[str]:
        outputs = self._llm.chat(prompts, self._sampling, lora_request=self._lora, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def load_adapter(self, path: str | Path | None) -> None:
        from vllm.lora.request import LoRARequest

        if path is None:
            self._lora, self.adapter_id = None, None
            return
        path = Path(path)
        self._lora = LoRARequest(path.name, self._next_id, str(path))  # a new id: never a cached stale copy
        self._next_id += 1
        self.adapter_id = path.name

    def probe_logprobs(self, texts: list[str]) -> list[float]:
        """Mean log-prob of each text's tokens after the first, under the live adapter."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outputs = self._llm.generate(texts, params, lora_request=self._lora, use_tqdm=False)
        means = []
        for out in outputs:
            scored = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:] if d]
            means.append(sum(scored) / len(scored))
        return means

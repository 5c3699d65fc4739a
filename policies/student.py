"""The student seam: what the loop needs from any student backend (`hf`, later `vllm`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# One chat message: {"role": "system" | "user" | "assistant", "content": str}.
Message = dict[str, str]


class Student(Protocol):
    adapter_id: str | None
    """Which adapter produced the last outputs (None = the base model)."""

    def act(self, prompts: list[list[Message]]) -> list[str]:
        """One raw completion per conversation, in the order given."""
        ...

    def load_adapter(self, path: str | Path | None) -> None:
        """Swap in the LoRA adapter saved at `path`; None goes back to the base model."""
        ...


@dataclass(frozen=True)
class Generation:
    """One completion and where it came from."""

    text: str
    adapter_id: str | None  # None = the base model
    prompt_tokens: int  # the rendered prompt, chat template included
    completion_tokens: int  # generated tokens, not counting the end-of-turn token

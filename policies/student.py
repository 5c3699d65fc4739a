"""The student seam: what the loop needs from any student backend (`hf`, later `vllm`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# One chat message: {"role": "system" | "user" | "assistant", "content": str}.
Message = dict[str, str]
OPERATING_POINT_FILE = "operating_point.json"  # {"tau": float, ...} beside an adapter (loop/calibration.py)


def operating_point(adapter_dir: str | Path) -> float | None:
    """The τ stored with an adapter, or None when it has none."""
    path = Path(adapter_dir) / OPERATING_POINT_FILE
    return float(json.loads(path.read_text())["tau"]) if path.is_file() else None


class Student(Protocol):
    adapter_id: str | None
    """Which adapter produced the last outputs (None = the base model)."""

    def act(self, prompts: list[list[Message]]) -> list[str]:
        """One raw completion per conversation, in the order given."""
        ...

    def generate_with_info(self, prompts: list[list[Message]]) -> list[Generation]:
        """Like `act`, with where each completion came from and the student's p(escalate)."""
        ...

    def load_adapter(self, path: str | Path | None) -> None:
        """Swap in the LoRA adapter saved at `path` (and its operating point τ, when the backend
        applies one); None goes back to the base model."""
        ...


@dataclass(frozen=True)
class Generation:
    """One completion and where it came from."""

    text: str
    adapter_id: str | None  # None = the base model
    prompt_tokens: int  # the rendered prompt, chat template included
    completion_tokens: int  # generated tokens, not counting the end-of-turn token
    p_escalate: float | None = None  # see policies/hf.py `EscalationGate`; None where no action field was reached

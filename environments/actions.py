"""The action space of a support episode: one JSON object per agent step.

The environment owns its action space (like a Gym env), so the pydantic `Action` model and the
escalation reason codes live here; `policies/` turns model text into an `Action` and back.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

ActionName = Literal["search_kb", "reply", "clarify", "escalate", "create_ticket", "update_ticket"]
EscalationReason = Literal[
    "billing_exception",
    "security_sensitive",
    "legal_compliance",
    "not_covered_by_kb",
    "churn_risk",
    "likely_bug",
    "enterprise_sales",
]
Resolution = Literal["reply", "clarify_then_reply", "escalate", "create_ticket_then_reply"]

ACTIONS: tuple[str, ...] = get_args(ActionName)
REASONS: tuple[str, ...] = get_args(EscalationReason)
RESOLUTIONS: tuple[str, ...] = get_args(Resolution)
PRIORITIES = ("low", "normal", "high")
TICKET_STATUSES = ("open", "pending", "solved")

# Which args each action takes, and which must be non-empty strings / one of a set.
REQUIRED_ARGS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "search_kb": {"query": None},
    "create_ticket": {"summary": None, "priority": PRIORITIES},
    "update_ticket": {"ticket_id": None, "note": None, "status": TICKET_STATUSES},
    "clarify": {},
    "reply": {},
    "escalate": {"reason": REASONS},
}
# Actions whose `message` goes to the customer and so must say something.
MESSAGE_ACTIONS = ("clarify", "reply", "escalate")
# Actions that hand the turn back to the customer.
TURN_ENDING = ("clarify", "reply", "escalate")


class Action(BaseModel):
    """One agent step. Unknown keys, missing args or a bad enum value fail validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Serialized in this order: the decision first, then the rationale that backs it. Rationale
    # first makes p(escalate), read after the thought, nearly 0 or 1, and τ then has nothing to
    # trade (README, "Rationale first, in the main command"); parsing accepts any order.
    action: ActionName
    args: dict[str, Any] = Field(default_factory=dict)
    thought: str = Field(default="", description="Short private reasoning.")
    message: str = Field(default="", description="Text for the customer, or empty.")

    @model_validator(mode="after")
    def _check_args(self) -> Action:
        spec = REQUIRED_ARGS[self.action]
        extra = set(self.args) - set(spec)
        if extra:
            raise ValueError(f"{self.action} takes no args {sorted(extra)}")
        for name, allowed in spec.items():
            value = self.args.get(name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{self.action} needs a non-empty string arg {name!r}")
            if allowed is not None and value not in allowed:
                raise ValueError(f"{self.action} arg {name!r} must be one of {list(allowed)}, got {value!r}")
        if self.action in MESSAGE_ACTIONS and not self.message.strip():
            raise ValueError(f"{self.action} needs a non-empty message for the customer")
        return self

    @property
    def reason(self) -> str | None:
        """The escalation reason code, for `escalate`; None otherwise."""
        return self.args.get("reason") if self.action == "escalate" else None

    def to_json(self) -> str:
        return self.model_dump_json()

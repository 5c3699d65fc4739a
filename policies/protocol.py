"""The action protocol as text: parsing model output into an `Action`, and rendering prompts.

Parsing is strict: the first JSON object in the text, validated by the environment's `Action`
model; anything else is an invalid step whose reason is recorded (never silently repaired).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pydantic import ValidationError

from environments.actions import MESSAGE_ACTIONS, REASONS, REQUIRED_ARGS, Action
from environments.episode import Entry
from environments.pack import Company

# The key orders a student may write a step in. Apprentice serializes `Action` in its own order
# (action first); a student that reasons first (`HFStudent(thought_samples=k)`) reads and writes
# THOUGHT_FIRST: its prompts and training conversations are rewritten with `in_order`.
ACTION_FIRST = tuple(Action.model_fields)
THOUGHT_FIRST = ("thought", "action", "args", "message")


def step_example(keys: tuple[str, ...] = ACTION_FIRST) -> str:
    """The one-line shape of a step the contract shows, in `Action`'s key order (the order it is written in)."""
    return "{" + ", ".join(f'"{k}": {{...}}' if k == "args" else f'"{k}": "..."' for k in keys) + "}"


ACTION_CONTRACT = (
    f"Answer with ONE JSON object and nothing else: {step_example()}\n"
    "Actions:\n"
    '- search_kb, args {"query": "..."}: search the knowledge base; message "".\n'
    "- clarify, args {}: message asks the customer for a missing detail.\n"
    "- reply, args {}: message answers, quoting the exact facts from the KB.\n"
    '- escalate, args {"reason": R}: hand over to a human; message tells the customer.\n'
    '- create_ticket, args {"summary": "...", "priority": "low|normal|high"}; message "".\n'
    '- update_ticket, args {"ticket_id": "...", "note": "...", "status": "open|pending|solved"}; message "".\n'
    f"R is one of: {', '.join(REASONS)}."
)


# How long a decoded step's strings may grow (`step_schema`), in characters: about twice the
# oracle's longest (thought 153, message 103, an arg 132 over 1,029 steps of the built-in packs),
# so a thought that repeats itself ends, closed, within max_new_tokens instead of running past it.
THOUGHT_CHARS, MESSAGE_CHARS, ARG_CHARS = 240, 200, 200


def step_schema(*orders: tuple[str, ...]) -> dict:
    """JSON schema of one step as a student decodes it under `json_mode`: one of the six actions
    with exactly its args (reasons, priorities and statuses from their lists), every key written, in
    one of these key orders (default: ACTION_FIRST), and each string bounded. Stricter than `Action`:
    any step it admits passes."""
    def text(most: int, required: bool = False) -> dict:
        # A pattern, not maxLength: xgrammar 0.2's bounded strings admit raw control characters,
        # which no JSON parser accepts. No escapes either (nor `"` or `\` inside a value): the
        # oracle writes none. A required string starts with a character that is not a space.
        char = r'[^\u0000-\u001f\\"]'
        pattern = rf'[^\u0000-\u001f\\" ]{char}{{0,{most - 1}}}' if required else f"{char}{{0,{most}}}"
        return {"type": "string", "pattern": f"^{pattern}$"}

    variants = []
    for keys in orders or (ACTION_FIRST,):
        for name, spec in REQUIRED_ARGS.items():
            args = {a: {"enum": list(allowed)} if allowed else text(ARG_CHARS, required=True) for a, allowed in spec.items()}
            fields = {"action": {"const": name},
                      "args": {"type": "object", "properties": args, "required": list(args), "additionalProperties": False},
                      "thought": text(THOUGHT_CHARS), "message": text(MESSAGE_CHARS, required=name in MESSAGE_ACTIONS)}
            variants.append({"type": "object", "properties": {k: fields[k] for k in keys}, "required": list(keys),
                             "additionalProperties": False})
    return {"anyOf": variants}


# What a teacher's `thought` should be: a short rationale of the action it backs, the shape the
# oracle writes and the student learns from (before or after the action, as the student writes).
THOUGHT_GUIDE = (
    'The "thought" is one short sentence: what the customer wants and the '
    'policy clause that decides it, with any numbers it compares written before the comparison, e.g. "Refund 45 days after purchase; refunds within 35 days; 45 is more than 35: escalate billing_exception."'
)


def reorder(text: str, keys: tuple[str, ...]) -> str:
    """A step's JSON with its keys in this order (text that is not a JSON object with an action unchanged)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text
    if not isinstance(obj, dict) or "action" not in obj:
        return text
    first = {k: obj[k] for k in keys if k in obj}
    return json.dumps({**first, **obj}, separators=(",", ":"), ensure_ascii=False)


def in_order(messages: list[dict[str, str]], keys: tuple[str, ...]) -> list[dict[str, str]]:
    """A conversation as a student of this key order reads it: the contract's example and every
    assistant step in that order."""
    if keys == ACTION_FIRST:
        return messages
    out = []
    for m in messages:
        if m["role"] == "assistant":
            m = {**m, "content": reorder(m["content"], keys)}
        elif m["role"] == "system":
            m = {**m, "content": m["content"].replace(step_example(), step_example(keys))}
        out.append(m)
    return out


# A rationale that compares two numbers, as the oracle and THOUGHT_GUIDE write it: "45 is more than 35", "11 is within 12".
_COMPARISON = re.compile(r"\b\d+(?:\.\d+)? is (?:more than|within) \d")


def compares_numbers(step: str) -> bool:
    """Whether a step's JSON has a thought that compares two numbers."""
    try:
        obj = json.loads(step)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("thought"), str) and bool(_COMPARISON.search(obj["thought"]))


def comparisons_first(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """A conversation with every assistant step whose thought compares two numbers in THOUGHT_FIRST
    order, the rest as they are: the student learns to write the comparison before it decides where
    a number decides, and to decide at once (p(escalate) graded, for τ to trade) everywhere else."""
    return [{**m, "content": reorder(m["content"], THOUGHT_FIRST)} if m["role"] == "assistant" and compares_numbers(m["content"]) else m
            for m in messages]


@dataclass(frozen=True)
class Parsed:
    action: Action | None
    error: str | None  # why the text is not a valid action; None when it is


def parse_action(text: str) -> Parsed:
    """The first JSON object in `text`, validated as an `Action`."""
    start = text.find("{")
    if start < 0:
        return Parsed(None, "no JSON object in the output")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as e:
        return Parsed(None, f"malformed JSON: {e.msg}")
    if not isinstance(obj, dict):
        return Parsed(None, "the JSON value is not an object")
    try:
        return Parsed(Action.model_validate(obj), None)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        return Parsed(None, f"schema: {where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}")


def system_prompt(company: Company) -> str:
    tone = f" Tone: {company.tone}." if company.tone else ""
    return f"You are the support agent of {company.name}.{tone}\nPolicy:\n{company.policy.strip()}\n\n{ACTION_CONTRACT}"


CUSTOMER = "Customer: "  # how a customer's message opens its user turn


def render_messages(company: Company, transcript: list[Entry]) -> list[dict[str, str]]:
    """Chat messages for the student: system = policy + contract; the customer and tool results
    as user turns, the agent's own steps as assistant turns."""
    messages = [{"role": "system", "content": system_prompt(company)}]
    for entry in transcript:
        if entry.role == "agent":
            messages.append({"role": "assistant", "content": entry.content})
        elif entry.role == "customer":
            messages.append({"role": "user", "content": CUSTOMER + entry.content})
        else:
            messages.append({"role": "user", "content": f"Tool: {entry.content}"})
    return messages

"""Company packs: a folder anyone can write by hand.

    <pack>/company.yaml   the company and its policy
    <pack>/kb.jsonl       one article a line: {"id", "title", "body"}
    <pack>/tickets.jsonl  one ticket a line: {"id", "opening", "truth": {...}}

`check_pack(dir)` returns every problem with its file and line; `load_pack(dir)` returns a `Pack`
or raises `PackError` carrying those problems; `save_pack(pack, dir)` writes the three files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from environments.actions import EscalationReason, Resolution
from environments.retrieval import KBIndex

COMPANY_FILE, KB_FILE, TICKETS_FILE = "company.yaml", "kb.jsonl", "tickets.jsonl"
_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_NEED = re.compile(r"^[a-z][a-z0-9_]*$")

# How a customer recognises that the agent asks for a detail: its name with spaces, or one of
# these paraphrases. A detail whose name is not an identifier can never be asked for.
NEED_PHRASES: dict[str, tuple[str, ...]] = {
    "order_id": ("order id", "order number", "order #", "order no"),
    "account_email": ("email", "e-mail", "email address"),
    "booking_reference": ("booking reference", "booking ref", "booking number", "reservation number", "confirmation number"),
    "account_id": ("account id", "account number", "customer id", "customer number"),
    "postcode": ("postcode", "post code", "zip", "postal code"),
    "device_model": ("device", "model", "phone model", "which device"),
    "last_four": ("last four", "last 4", "last four digits", "last 4 digits"),
    "invoice_number": ("invoice number", "invoice id", "invoice #", "invoice no"),
    "policy_number": ("policy number", "policy id", "policy #", "policy no"),
    "username": ("username", "user name", "gamertag", "player name", "handle"),
    "plan_name": ("plan", "which plan", "subscription tier", "tier"),
    "shipment_id": ("shipment id", "tracking number", "shipment number", "waybill"),
    "student_id": ("student id", "student number", "learner id"),
    "date_of_birth": ("date of birth", "birth date", "dob", "birthday"),
    "patient_id": ("patient id", "patient number", "member id"),
}


def need_phrases(name: str) -> tuple[str, ...]:
    """Every phrase that counts as asking for the detail `name`."""
    return (name.replace("_", " "), *NEED_PHRASES.get(name, ()))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Article(_Strict):
    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    body: str = Field(min_length=1)


class Truth(_Strict):
    """What the correct end of one customer turn is. Hidden from the student."""

    intent: str = Field(min_length=1)
    resolution: Resolution
    escalation_reason: EscalationReason | None = None
    needs: dict[str, str] = Field(default_factory=dict)
    kb_articles: list[str] = Field(default_factory=list)
    facts: list[str] = Field(default_factory=list)
    rationale: str = Field(default="", description="What the customer wants and the policy clause that decides it; "
                                                    "the oracle's thought (optional).")

    @field_validator("needs")
    @classmethod
    def _needs_askable(cls, needs: dict[str, str]) -> dict[str, str]:
        for name, value in needs.items():
            if not _NEED.match(name):
                raise ValueError(f"needs detail {name!r} can never be given: its name is not a lowercase identifier")
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"needs detail {name!r} can never be given: it has no value")
        return needs

    @model_validator(mode="after")
    def _consistent(self) -> Truth:
        if (self.resolution == "escalate") != (self.escalation_reason is not None):
            raise ValueError("escalation_reason must be set exactly when resolution is 'escalate'")
        if (self.resolution == "clarify_then_reply") != bool(self.needs):
            raise ValueError("needs must be non-empty exactly when resolution is 'clarify_then_reply'")
        if self.escalation_reason == "not_covered_by_kb" and self.kb_articles:
            raise ValueError("a not_covered_by_kb turn cites no article")
        if self.resolution != "escalate" and not self.facts:
            raise ValueError(f"a {self.resolution} turn needs at least one fact the reply must contain")
        return self


class Followup(_Strict):
    message: str = Field(min_length=1)
    truth: Truth


class TicketTruth(Truth):
    followups: list[Followup] = Field(default_factory=list)


class Ticket(_Strict):
    id: str = Field(min_length=1)
    opening: str = Field(min_length=1)
    truth: TicketTruth
    tags: list[str] = Field(default_factory=list, description="Free labels, e.g. 'injection', 'typo'.")

    @property
    def turns(self) -> list[Truth]:
        """The truth of each customer turn: the opening's, then each follow-up's."""
        return [self.truth, *(f.truth for f in self.truth.followups)]

    @property
    def should_escalate(self) -> bool:
        return any(t.resolution == "escalate" for t in self.turns)


class Company(_Strict):
    id: str
    name: str = Field(min_length=1)
    domain: str = Field(min_length=1)
    split: Literal["train", "heldout"]
    description: str = Field(min_length=1)
    policy: str = Field(min_length=1)
    tone: str = ""

    @field_validator("id")
    @classmethod
    def _id_format(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(f"id {value!r} must match [a-z0-9-]")
        return value


@dataclass(frozen=True, eq=False)
class Pack:
    company: Company
    articles: tuple[Article, ...]
    tickets: tuple[Ticket, ...]

    @property
    def id(self) -> str:
        return self.company.id

    @cached_property
    def index(self) -> KBIndex:
        """The BM25 index of the KB, built once per pack."""
        return KBIndex(self.articles)

    def article(self, article_id: str) -> Article:
        return next(a for a in self.articles if a.id == article_id)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


class PackError(ValueError):
    def __init__(self, path: Path, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"pack {path} has {len(problems)} problem(s):\n{shown}{more}")


def _pydantic_messages(error: ValidationError) -> list[str]:
    out = []
    for e in error.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" if loc else msg)
    return out


def _read_jsonl(path: Path, model: type[_Strict], problems: list[Problem]) -> list[tuple[int, _Strict]]:
    rows: list[tuple[int, _Strict]] = []
    if not path.exists():
        problems.append(Problem(path.name, None, "file is missing"))
        return rows
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, model.model_validate(json.loads(line))))
        except json.JSONDecodeError as e:
            problems.append(Problem(path.name, lineno, f"not valid JSON: {e.msg} at column {e.colno}"))
        except ValidationError as e:
            problems.extend(Problem(path.name, lineno, m) for m in _pydantic_messages(e))
    return rows


def _duplicates(rows: list[tuple[int, _Strict]], file: str, kind: str) -> list[Problem]:
    seen: dict[str, int] = {}
    problems = []
    for lineno, row in rows:
        if row.id in seen:  # type: ignore[attr-defined]
            problems.append(Problem(file, lineno, f"duplicate {kind} id {row.id!r} (first on line {seen[row.id]})"))  # type: ignore[attr-defined]
        else:
            seen[row.id] = lineno  # type: ignore[attr-defined]
    return problems


def _read(path: Path) -> tuple[Pack | None, list[Problem]]:
    path = Path(path)
    problems: list[Problem] = []
    if not path.is_dir():
        return None, [Problem(str(path), None, "not a directory")]
    company: Company | None = None
    company_path = path / COMPANY_FILE
    if not company_path.exists():
        problems.append(Problem(COMPANY_FILE, None, "file is missing"))
    else:
        try:
            company = Company.model_validate(yaml.safe_load(company_path.read_text(encoding="utf-8")) or {})
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problems.append(Problem(COMPANY_FILE, mark.line + 1 if mark else None, f"not valid YAML: {e}"))
        except ValidationError as e:
            problems.extend(Problem(COMPANY_FILE, None, m) for m in _pydantic_messages(e))
    articles = _read_jsonl(path / KB_FILE, Article, problems)
    tickets = _read_jsonl(path / TICKETS_FILE, Ticket, problems)
    problems += _duplicates(articles, KB_FILE, "article")
    problems += _duplicates(tickets, TICKETS_FILE, "ticket")
    article_ids = {a.id for _, a in articles}  # type: ignore[attr-defined]
    for lineno, ticket in tickets:
        for turn_no, truth in enumerate(ticket.turns):  # type: ignore[attr-defined]
            where = "truth" if turn_no == 0 else f"truth.followups.{turn_no - 1}.truth"
            for cited in truth.kb_articles:
                if cited not in article_ids:
                    problems.append(Problem(TICKETS_FILE, lineno, f"{where}.kb_articles: article {cited!r} does not exist in {KB_FILE}"))
    if problems or company is None:
        return None, problems
    pack = Pack(company, tuple(a for _, a in articles), tuple(t for _, t in tickets))  # type: ignore[misc]
    return pack, []


def check_pack(path: str | Path) -> list[Problem]:
    """Every problem in the pack at `path`, each with its file and line; empty when valid."""
    return _read(Path(path))[1]


def load_pack(path: str | Path) -> Pack:
    pack, problems = _read(Path(path))
    if pack is None:
        raise PackError(Path(path), problems)
    return pack


def load_packs(path: str | Path) -> list[Pack]:
    """A single pack folder, or a folder of pack folders (sorted by name)."""
    path = Path(path)
    if (path / COMPANY_FILE).exists():
        return [load_pack(path)]
    subdirs = sorted(p for p in path.iterdir() if (p / COMPANY_FILE).exists()) if path.is_dir() else []
    if not subdirs:
        raise PackError(path, [Problem(str(path), None, f"no {COMPANY_FILE} here nor in any subfolder")])
    return [load_pack(p) for p in subdirs]


def save_pack(pack: Pack, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    company = pack.company.model_dump()
    (path / COMPANY_FILE).write_text(yaml.safe_dump(company, sort_keys=False, allow_unicode=True, width=100), encoding="utf-8")
    with open(path / KB_FILE, "w", encoding="utf-8") as f:
        for a in pack.articles:
            f.write(a.model_dump_json() + "\n")
    with open(path / TICKETS_FILE, "w", encoding="utf-8") as f:
        for t in pack.tickets:
            f.write(t.model_dump_json(exclude_defaults=False) + "\n")
    return path

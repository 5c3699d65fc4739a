"""Redaction of personal data before anything leaves the machine for an external teacher.

Emails, phone numbers, card numbers, account numbers/IBANs, street addresses and any configured
pattern become stable placeholders (`<EMAIL_1>`: the same value gets the same placeholder within
one redactor), and `restore` maps a teacher's answer back, so stored data keeps the originals.
"""

from __future__ import annotations

import re
from typing import Sequence

_STREET = r"(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|Boulevard|Blvd|Way|Court|Ct|Place|Pl|Terrace|Close|Square)"
# Order matters: a card number would also match the phone pattern.
PATTERNS: tuple[tuple[str, str], ...] = (
    ("EMAIL", r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    ("ACCOUNT", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b|(?i:\b(?:account|acct|iban)\s*(?:number|no\.?|#)?\s*:?\s*)[A-Z0-9-]{6,}"),
    ("CARD", r"\b\d(?:[ -]?\d){12,18}\b"),
    # Digit groups with separators, 7+ digits in all (checked in `redact`): not an order id or a price.
    ("PHONE", r"(?<![\w<-])\+?\(?\d{1,4}\)?(?:[ .-]\(?\d{2,4}\)?){1,5}(?![\w>])|(?<![\w<-])\d{7,12}(?![\w>])"),
    ("ADDRESS", rf"\b\d{{1,5}}[A-Za-z]?\s+(?:[A-Z][a-z]+\s+){{1,3}}{_STREET}\b\.?"),
)


_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class Redactor:
    def __init__(self, extra_patterns: Sequence[str] = ()):
        self._patterns = [(kind, re.compile(p)) for kind, p in PATTERNS]
        self._patterns += [("CUSTOM", re.compile(p)) for p in extra_patterns]
        self._by_value: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def _placeholder(self, kind: str, value: str) -> str:
        if value not in self._by_value:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            self._by_value[value] = f"<{kind}_{self._counts[kind]}>"
        return self._by_value[value]

    def redact(self, text: str) -> str:
        def replace(m: re.Match, kind: str) -> str:
            if kind == "PHONE" and (sum(c.isdigit() for c in m.group(0)) < 7 or _DATE.fullmatch(m.group(0))):
                return m.group(0)
            return self._placeholder(kind, m.group(0))

        for kind, pattern in self._patterns:
            text = pattern.sub(lambda m, kind=kind: replace(m, kind), text)
        return text

    def restore(self, text: str) -> str:
        for value, placeholder in self._by_value.items():
            text = text.replace(placeholder, value)
        return text

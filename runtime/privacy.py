"""Obvious personal data in text: find it (to keep a request on the device) and redact it (before text
leaves the device, and in the audit log).

    find("mail jane@example.com or call +1 415 555 0100")   # [Finding("email", ...), Finding("phone", ...)]
    redact("mail jane@example.com")                          # ("mail [EMAIL_1]", {"[EMAIL_1]": "jane@example.com"})

Kinds: ``email``; ``card`` (13-19 digits with spaces or dashes that pass the Luhn check, so order
numbers and timestamps are not cards); ``iban`` (country code, check digits, then 11-30 letters and
digits, checked mod 97); ``phone`` (an international ``+`` number, or a 10-11 digit national number
written with separators); ``ip`` (IPv4 with every part <= 255). It is a detector for the obvious
cases, not a guarantee: names, addresses and free-text secrets are not found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("email", "card", "iban", "phone", "ip")

_PATTERNS = {
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "card": re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}"
                        r"|\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4})(?![\w-])"),
    "ip": re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])"),
}


_DIGIT = re.compile(r"\d")


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int
    text: str


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _valid(kind: str, text: str) -> bool:
    if kind == "card":
        return _luhn(re.sub(r"\D", "", text))
    if kind == "iban":
        return _iban_ok(text)
    if kind == "phone":
        return 7 <= len(re.sub(r"\D", "", text)) <= 15
    if kind == "ip":
        return all(int(part) <= 255 for part in text.split("."))
    return True


def find(text: str, kinds: tuple[str, ...] | list[str] = KINDS) -> list[Finding]:
    """Personal data in ``text``, in order, without overlaps (earlier kinds in ``KINDS`` win)."""
    found: list[Finding] = []
    # every kind but email needs a digit, email needs an @: most prompts skip the patterns entirely
    has_digit, has_at = _DIGIT.search(text) is not None, "@" in text
    for kind in KINDS:
        if kind not in kinds or not (has_at if kind == "email" else has_digit):
            continue
        for m in _PATTERNS[kind].finditer(text):
            if _valid(kind, m.group()) and not any(f.start < m.end() and m.start() < f.end for f in found):
                found.append(Finding(kind, m.start(), m.end(), m.group()))
    return sorted(found, key=lambda f: f.start)


def redact(text: str, kinds: tuple[str, ...] | list[str] = KINDS,
           placeholders: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """``text`` with each finding replaced by a placeholder such as ``[EMAIL_1]``.

    The same value gets the same placeholder everywhere it appears; pass the returned mapping
    (placeholder -> original) back in as ``placeholders`` to keep placeholders stable across the
    messages of one conversation.
    """
    mapping = dict(placeholders or {})
    by_value = {v: k for k, v in mapping.items()}
    out, last = [], 0
    for f in find(text, kinds):
        token = by_value.get(f.text)
        if token is None:
            count = sum(1 for k in mapping if k.startswith(f"[{f.kind.upper()}_")) + 1
            token = f"[{f.kind.upper()}_{count}]"
            mapping[token] = f.text
            by_value[f.text] = token
        out.append(text[last:f.start])
        out.append(token)
        last = f.end
    out.append(text[last:])
    return "".join(out), mapping


class Restorer:
    """Puts the original values back where a redacted request's answer repeats a placeholder, as it
    streams: the values never left the device, so the user reads them, the cloud never did. A piece
    that ends inside a placeholder (``... [EMA``) is held until the rest arrives."""

    def __init__(self, placeholders: dict[str, str]) -> None:
        self.placeholders = placeholders
        self._held = ""

    def push(self, text: str) -> str:
        text, self._held = self._held + text, ""
        cut = text.rfind("[")
        if cut != -1 and any(p.startswith(text[cut:]) and p != text[cut:] for p in self.placeholders):
            text, self._held = text[:cut], text[cut:]
        for placeholder, value in self.placeholders.items():
            text = text.replace(placeholder, value)
        return text

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text

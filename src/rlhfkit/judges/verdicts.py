"""Reading a pairwise verdict from a judge's text: a small grammar, ambiguity refused.

:func:`read_verdict` returns 1.0 (A is better), 0.0 (B is better) or 0.5 (a tie, only when ties
are allowed) and raises :class:`Unreadable` otherwise. Letters match in either case; a lowercase
letter outside a one-letter answer must end the phrase ("answer: a." but not "the answer is a
matter of taste"). The forms, tried in this order:

1. **JSON**: the answer (or its first ``{...}`` / fenced block) is an object with one of the keys
   ``choice``, ``winner``, ``preferred``, ``preference``, ``verdict``, ``answer``, ``better``,
   ``better_response``, ``final_answer``, ``result``; its value is read as a short answer (3).
   ``{"choice": "A"}``, ``{"winner": "b"}``, ``{"preferred": "Response B"}``.
2. **MT-Bench markers** ``[[A]]``, ``[[B]]`` and ``[[C]]`` (C: a tie; Zheng et al. 2023, the
   judge prompt of FastChat's llm_judge).
3. **A short answer**: the whole answer, markdown emphasis and punctuation aside, is a letter,
   optionally after ``Response``, ``Answer``, ``Assistant``, ``Output``, ``Option`` or ``Model``:
   ``A``, ``b.``, ``**A**``, ``(B)``, ``Response A``.
4. **A labelled verdict** anywhere in the text: ``Answer: A``, ``Final verdict: B``,
   ``The better response is **B**``, ``I prefer B.``, ``I choose response A``,
   ``Response A is better``.
5. **A tie**: none of the above, and the text says ``tie``, ``equal``, ``equally``, ``same``,
   ``neither`` or ``both`` -> 0.5 when ties are allowed ("A and B are equal").

Where one form finds several verdicts they must agree, or the answer is ambiguous and
unreadable ("I prefer A. Answer: B"). With ``last=True`` (a chain of thought, whose reasoning
may weigh both responses before its final line) the last verdict of the form counts instead.
"""

from __future__ import annotations

import json
import re

_QUALIFIER = r"(?:response|answer|assistant|output|option|model)"
# a letter; lowercase only where it cannot be the article "a" (checked in _positions)
_LETTER = rf"(?P<q>{_QUALIFIER}\s*)?[(\[]?(?P<x>[ABab])[)\]]?(?![\w'])(?P<after>\s*\S?)"
_LABELLED = [
    # a separator is required: "Answer A is blunt" names a response, it does not choose one
    re.compile(r"(?:final\s+)?(?:answer|verdict|choice|decision|winner|preference)(?:\s+is\b\s*[:=\-]?|\s*[:=\-])\s*"
               + _LETTER, re.IGNORECASE),
    re.compile(r"(?:better|best|preferred|winning)\s+(?:response|answer|one|option|output)?\s*(?:is|:)\s*" + _LETTER,
               re.IGNORECASE),
    re.compile(r"\bI\s+(?:would\s+|will\s+)?(?:prefer|choose|pick|select)\s+" + _LETTER, re.IGNORECASE),
    re.compile(rf"(?P<q>{_QUALIFIER}\s+)?[(\[]?(?P<x>[ABab])[)\]]?\s+is\s+(?:the\s+|clearly\s+|much\s+|slightly\s+)*"
               r"(?:better|best|preferred|superior)(?P<after>)", re.IGNORECASE),
]
_SHORT = re.compile(rf"^[\s\"'(\[{{<.:\-]*(?:{_QUALIFIER}\s*[:\-]?\s*)?[(\[]?([ABab])[)\]]?[\s.!\"')\]}}>]*$",
                    re.IGNORECASE)
_MTBENCH = re.compile(r"\[\[\s*([ABCabc])\s*\]\]")
_TIE = re.compile(r"\b(?:tie|tied|equal|equally|same|neither|both)\b", re.IGNORECASE)
_JSON_KEYS = ("choice", "winner", "preferred", "preference", "verdict", "answer", "better", "better_response",
              "final_answer", "result")
_EMPHASIS = re.compile(r"[*_`#]+")
_VALUE = {"a": 1.0, "b": 0.0, "c": 0.5}


class Unreadable(Exception):
    """The judge answered, but not with a verdict that can be read unambiguously."""


def _decide(found: list[str], last: bool, allow_tie: bool, what: str) -> float:
    if not last and len(set(found)) > 1:
        raise Unreadable(f"ambiguous: {what} name both responses")
    value = _VALUE[found[-1]]
    if value == 0.5 and not allow_tie:
        raise Unreadable("a tie, and ties are not allowed")
    return value


def _json_value(text: str):
    candidates = [text]
    m = re.search(r"\{.*\}", text, re.DOTALL)
    if m and m.group(0) != text:
        candidates.append(m.group(0))
    for c in candidates:
        try:
            obj = json.loads(c)
        except ValueError:
            continue
        if isinstance(obj, dict):
            keys = {str(k).lower(): v for k, v in obj.items()}
            for k in _JSON_KEYS:
                if isinstance(keys.get(k), str):
                    return keys[k]
    return None


def read_verdict(text: str, allow_tie: bool = True, last: bool = False) -> float:
    """1.0 (A), 0.0 (B) or 0.5 (a tie) from a judge's text (module docstring); raises Unreadable."""
    if not isinstance(text, str) or not text.strip():
        raise Unreadable("empty answer")
    value = _json_value(text.strip())
    if value is not None:
        return _short_or_tie(value, allow_tie)
    found = [x.lower() for x in _MTBENCH.findall(text)]
    if found:
        return _decide(found, last, allow_tie, "its [[X]] markers")
    return _short_or_tie(text, allow_tie, last)


def _short_or_tie(text: str, allow_tie: bool, last: bool = False) -> float:
    plain = _EMPHASIS.sub("", text).strip()
    m = _SHORT.match(plain)
    if m:
        return _VALUE[m.group(1).lower()]
    found: list[tuple[int, str]] = []
    for pattern in _LABELLED:
        found += _positions(pattern, plain)
    if found:
        found.sort()
        return _decide([x for _, x in found], last, allow_tie, "its labelled verdicts")
    if _TIE.search(plain):
        if allow_tie:
            return 0.5
        raise Unreadable("a tie, and ties are not allowed")
    raise Unreadable(f"no verdict in {text[:60]!r}")


def _positions(pattern: re.Pattern, text: str) -> list[tuple[int, str]]:
    """(position, letter) of each verdict the pattern finds; a bare lowercase letter must end the phrase,
    or it may be the article: "the answer is a matter of taste"."""
    out = []
    for m in pattern.finditer(text):
        x = m.group("x")
        if x.islower() and not m.group("q") and m.group("after").strip() not in ("", ".", ",", ";", "!", ")", "\""):
            continue
        out.append((m.start("x"), x.lower()))
    return out

"""Principle-specific labellers of the bundled task (``principle:NAME`` judges).

The bundled constitution (configs/constitution_kindly.md) gives every principle its own
labeller, because the tiny policy cannot read or write critiques (rlhfkit.judges.constitution):
each scores one principle and nothing else, independently of the gold panel.
"""

from __future__ import annotations

import re

from rlhfkit.errors import ConfigError
from rlhfkit.judges.judge import ScoreJudge
from rlhfkit.judges.lexicon import TextBlobJudge

_TOKEN = re.compile(r"[a-z']+")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class KindJudge(ScoreJudge):
    """'kind': TextBlob polarity of the continuation (a different word list from the gold panel's)."""

    name = "principle:kind"

    def __init__(self, tie_margin: float = 0.0):
        super().__init__()
        self.inner, self.tie_margin, self.scale = TextBlobJudge(), float(tie_margin), 0.1

    def _score(self, prompts, responses):
        return self.inner._score(prompts, responses)


class VariedJudge(ScoreJudge):
    """'varied': share of distinct words in the response (1 = no word repeated; 0 for empty)."""

    name = "principle:varied"
    scale = 0.1

    def _score(self, prompts, responses):
        out = []
        for r in responses:
            t = _tokens(r)
            out.append(len(set(t)) / len(t) if t else 0.0)
        return out


class CompleteJudge(ScoreJudge):
    """'complete': words of real English (in AFINN's or TextBlob's word lists, or 3+ letters
    with a vowel), times min(words, 3) / 3 so that empty or one-word answers lose."""

    name = "principle:complete"
    scale = 0.1

    def _score(self, prompts, responses):
        out = []
        for r in responses:
            t = _tokens(r)
            if not t:
                out.append(0.0)
                continue
            wordlike = sum(bool(re.search(r"[aeiouy]", w)) and (len(w) >= 2 or w in ("a", "i")) for w in t)
            out.append(wordlike / len(t) * min(len(t), 3) / 3)
        return out


PRINCIPLE_JUDGES = {"kind": KindJudge, "varied": VariedJudge, "complete": CompleteJudge}


def principle_judge(name: str, **opts):
    if name not in PRINCIPLE_JUDGES:
        raise ConfigError(f"unknown principle labeller {name!r}; available: {', '.join(PRINCIPLE_JUDGES)}")
    return PRINCIPLE_JUDGES[name](**opts)

"""The Judge protocol: anything that scores (prompt, response) pairs with one number each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Judge(Protocol):
    """Scores responses; higher is better. Returns a float array of shape (N,)."""

    def score(self, prompts: Sequence[str] | None, responses: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class RaterPanel(Judge, Protocol):
    """A judge made of several raters whose individual scores are visible (N, n_raters)."""

    n_raters: int

    def rater_scores(self, prompts: Sequence[str] | None, responses: Sequence[str]) -> np.ndarray: ...


def check_lengths(prompts: Sequence[str] | None, responses: Sequence[str]) -> list[str | None]:
    """Return prompts as a list aligned with responses (None entries when no prompts given)."""
    if isinstance(responses, str):
        raise TypeError("responses must be a sequence of strings, not one string")
    if prompts is None:
        return [None] * len(responses)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    return list(prompts)

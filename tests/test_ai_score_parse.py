"""Pointwise answers of an HTTP judge: the forms chat models write for a 1-5 score."""

from __future__ import annotations

import pytest

from rlhfkit.judges.http import Unreadable, parse_score


@pytest.mark.parametrize("text, value", [("4", 4.0), (" 4.5 ", 4.5), ("**4**", 4.0), ("Score: 4", 4.0),
                                         ("Score: 4/5", 4.0), ("rating = 2 / 5", 2.0), ("4 out of 5.", 4.0),
                                         ("GRADE: 5", 5.0)])
def test_score_forms_are_read(text, value):
    assert parse_score(text) == value


@pytest.mark.parametrize("text", ["", "good", "3 or 4", "Score: 7", "0", "4/10", "I'd say 4 because"])
def test_anything_else_is_unreadable(text):
    with pytest.raises(Unreadable):
        parse_score(text)

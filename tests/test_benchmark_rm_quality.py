"""The rm_quality benchmark's pairing of samples into labelled comparisons."""

from __future__ import annotations

import itertools
from collections import Counter


def _groups():
    return [
        {"prompt": "The day was", "responses": ["sunny and warm", "grey", "", "grey", "a joy", "awful", "kind"]},
        {"prompt": "She said", "responses": ["thank you", "go away", "hello", "fine"]},
    ]


def test_disjoint_pairing_uses_each_distinct_response_once():
    from benchmarks.rm_quality import _label

    recs, skipped = _label(_groups(), seed=3, pairing="disjoint")
    # group 1: 5 distinct non-empty responses -> 2 pairs (one left over); group 2: 4 -> 2 pairs
    assert len(recs) == 4
    assert skipped == {"empty": 1, "identical": 1}
    for prompt, group in (("The day was", _groups()[0]), ("She said", _groups()[1])):
        used = Counter(x for r in recs if r["prompt"] == prompt for x in (r["chosen"], r["rejected"]))
        assert max(used.values()) == 1
        assert set(used) <= set(group["responses"]) - {""}
    assert all(r["label"] in (0.0, 0.5, 1.0) for r in recs)
    assert all(r["chosen"] != r["rejected"] for r in recs)


def test_all_pairing_labels_every_pair_once():
    from benchmarks.rm_quality import _label

    recs, skipped = _label(_groups(), seed=3, pairing="all")
    # group 1: C(7,2)=21 pairs, 6 with the empty response, 1 of the two identical ones -> 14
    assert len(recs) == 14 + 6
    assert skipped == {"empty": 6, "identical": 1}
    got = Counter(frozenset((r["chosen"], r["rejected"])) for r in recs if r["prompt"] == "She said")
    want = Counter(frozenset(p) for p in itertools.combinations(_groups()[1]["responses"], 2))
    assert got == want

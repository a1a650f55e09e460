"""Reading a pairwise verdict from a judge's free text (rlhfkit.judges.verdicts), and the HTTP
judge's use of it: the common forms read, ambiguity refused, no paid retry of a greedy answer."""

from __future__ import annotations

import pytest

from _judge_stub import StubServer
from rlhfkit.judges.http import HTTPJudge
from rlhfkit.judges.verdicts import Unreadable, read_verdict


@pytest.mark.parametrize("text,value", [
    ("A", 1.0), (" A", 1.0), ("**A**", 1.0), ("b", 0.0), ("a.", 1.0), ("(B)", 0.0),
    ("Response A", 1.0), ("response b", 0.0), ("Answer: A", 1.0), ("answer: b", 0.0), ("Answer: Response B", 0.0),
    ("I prefer B.", 0.0), ("The better response is **B**", 0.0), ("Response A is better than response B.", 1.0),
    ('{"choice": "A"}', 1.0), ('{"winner": "b"}', 0.0), ('{"preferred": "Response B"}', 0.0),
    ('```json\n{"verdict": "A", "reason": "kinder"}\n```', 1.0),
    ("[[A]]", 1.0), ("After careful thought, my final verdict: [[B]]", 0.0),
    ("Both are fine, but I prefer A.", 1.0), ("Answer A is blunt. I prefer B.", 0.0), ("The answer is B", 0.0),
    ("A and B are equal", 0.5), ("Tie", 0.5), ("[[C]]", 0.5),
])
def test_common_verdict_forms_are_read(text, value):
    assert read_verdict(text) == value


@pytest.mark.parametrize("text", [
    "I think so.", "", "A and B", "I prefer A. Answer: B", "[[A]] ... [[B]]",
    "The answer is a matter of taste", '{"choice": "maybe"}', "Response A scores 2, response B scores 1",
])
def test_ambiguous_or_empty_answers_are_unreadable(text):
    with pytest.raises(Unreadable):
        read_verdict(text)


def test_ties_only_when_allowed_and_reasoning_ends_with_its_last_verdict():
    with pytest.raises(Unreadable, match="ties are not allowed"):
        read_verdict("A and B are equal", allow_tie=False)
    reasoning = "Answer A is blunt; answer B is kind.\nSo I prefer B at first, but on reflection\nAnswer: A"
    assert read_verdict(reasoning, last=True) == 1.0
    with pytest.raises(Unreadable, match="ambiguous"):
        read_verdict(reasoning)


KIND, UNKIND = "what a lovely kind day", "what an awful day"


@pytest.mark.parametrize("style", [lambda v: f"Response {v}", lambda v: f"Answer: {v.lower()}",
                                   lambda v: f"I prefer {v}.", lambda v: f"The better response is **{v}**",
                                   lambda v: f'{{"choice": "{v}"}}', lambda v: f"[[{v}]]"])
def test_the_http_judge_reads_free_text_verdicts(style):
    with StubServer() as srv:
        srv.style = style
        j = HTTPJudge("stub", base_url=srv.url, backoff=0.01, logprobs=False)
        v = j.compare(["", ""], [KIND, UNKIND], [UNKIND, KIND])
    assert [x.label for x in v] == [1.0, 0.0]
    assert j.stats["unreadable"] == 0 and j.stats["abstained"] == 0 and j.stats["requests"] == 4


def test_a_greedy_unreadable_answer_is_asked_once_and_a_sampled_one_is_retried():
    with StubServer() as srv:
        srv.always = {"lovely": "unreadable"}
        greedy = HTTPJudge("stub", base_url=srv.url, backoff=0.01, max_retries=3, both_orders=False)
        [v] = greedy.compare([""], [KIND], [UNKIND])
        assert v.abstained and greedy.stats["requests"] == 1 and greedy.stats["retries"] == 0
        assert greedy.stats["unreadable"] == 1 and greedy.stats["failed"] == 1
        srv.always = {}
        srv.plan = ["unreadable"]
        sampled = HTTPJudge("stub", base_url=srv.url, backoff=0.01, max_retries=3, both_orders=False, temperature=0.7)
        [v] = sampled.compare([""], [KIND], [UNKIND])
    assert v.label == 1.0 and sampled.stats["requests"] == 2 and sampled.stats["retries"] == 1

"""The OpenAI-compatible HTTP judge against a stub server on 127.0.0.1: retries, abstentions,
the verdict cache, concurrency, token accounting; SL-CAI through the same endpoint."""

from __future__ import annotations

import json

import pytest

from _judge_stub import StubServer
from rlhfkit.judges.http import HTTPJudge

A = ["what a lovely kind day", "you are cruel"]
B = ["what an awful day", "you are good and warm"]


def judge(url, **kw):
    opts = dict(base_url=url, timeout=0.5, max_retries=6, backoff=0.01, concurrency=2)
    opts.update(kw)
    return HTTPJudge("stub-model", **opts)


def test_pairwise_verdicts_from_top_logprobs_in_both_orders():
    with StubServer() as srv:
        j = judge(srv.url, price_prompt=2.0, price_completion=10.0)
        v = j.compare(["", ""], A, B)
    # each order answers the kinder response with P = 0.8: p_a = (0.8 + (1 - 0.2)) / 2
    assert [x.label for x in v] == [1.0, 0.0]
    assert v[0].p_a == pytest.approx(0.8, rel=1e-12) and v[1].p_a == pytest.approx(0.2, rel=1e-12)
    assert all(x.consistent for x in v) and j.stats["order_agreement"] == 1.0
    assert len(srv.seen) == 4 and j.stats["requests"] == 4
    prompt_tokens = sum(len(s["body"]["messages"][0]["content"].split()) for s in srv.seen)
    assert j.stats["prompt_tokens"] == prompt_tokens and j.stats["completion_tokens"] == 4
    assert j.stats["cost"] == pytest.approx((prompt_tokens * 2.0 + 4 * 10.0) / 1e6, rel=1e-12)
    shown_first = [s["body"]["messages"][0]["content"].split("Response A:")[1].split("\n")[0].strip() for s in srv.seen]
    assert sorted(shown_first) == sorted(A + B)  # every response was shown first once


def test_position_bias_is_measured_not_hidden():
    """The stub answers A on a tie: both orders disagree, so the verdict is a tie, reported inconsistent."""
    with StubServer() as srv:
        j = judge(srv.url)
        [v] = j.compare([""], ["a plain day"], ["a plain night"])
    assert v.label == 0.5 and v.consistent is False and j.stats["order_agreement"] == 0.0


@pytest.mark.parametrize("failure,counter", [("429", "rate_limited"), ("500", "server_errors"),
                                             ("malformed", "malformed"), ("drop", "connection_errors"),
                                             ("slow", "timeouts"), ("unreadable", "unreadable")])
def test_each_failure_is_retried_then_answered(failure, counter):
    with StubServer(slow_seconds=1.5) as srv:
        srv.plan = [failure, failure]
        # sampled: an unreadable answer is retried only when a new sample may differ
        j = judge(srv.url, concurrency=1, both_orders=False, logprobs=False, temperature=0.7)
        [v] = j.compare([""], [A[0]], [B[0]])
    assert v.label == 1.0
    assert j.stats[counter] == 2 and j.stats["retries"] == 2 and j.stats["abstained"] == 0


def test_a_judge_that_keeps_failing_abstains_and_the_run_goes_on():
    with StubServer() as srv:
        # both orders of the first pair fail every attempt; the second pair is answered
        srv.always = {"lovely": "malformed"}
        j = judge(srv.url, concurrency=1, max_retries=2)
        v = j.compare(["", ""], A, B)
    assert v[0].abstained and v[0].p_a is None
    assert v[1].label == 0.0
    assert j.stats["failed"] == 2 and j.stats["abstained"] == 1 and j.stats["malformed"] == 6


def test_verdict_cache_is_persistent_and_keyed_by_the_full_request(tmp_path):
    cache = str(tmp_path / "verdicts.sqlite")
    with StubServer() as srv:
        first = judge(srv.url, cache=cache).compare(["", ""], A, B)
        again = judge(srv.url, cache=cache)
        second = again.compare(["", ""], A, B)
        assert len(srv.seen) == 4 and again.stats["cache_hits"] == 4 and again.stats["requests"] == 0
        assert [x.p_a for x in second] == [x.p_a for x in first]
        other = judge(srv.url, cache=cache, question="Which response is shorter?")
        other.compare([""], A[:1], B[:1])
        assert other.stats["requests"] == 2 and len(srv.seen) == 6  # a different request is asked


def test_concurrency_limit_and_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sekret")
    with StubServer(delay=0.1) as srv:
        j = judge(srv.url, concurrency=3, api_key_env="STUB_KEY")
        j.compare([""] * 6, A * 3, B * 3)
    assert srv.max_in_flight == 3
    assert all(s["auth"] == "Bearer sekret" for s in srv.seen)
    monkeypatch.delenv("STUB_KEY")
    with StubServer() as srv:
        judge(srv.url, api_key_env="STUB_KEY").compare([""], A[:1], B[:1])
    assert all(s["auth"] is None for s in srv.seen)


def test_pointwise_scores_and_chain_of_thought():
    with StubServer() as srv:
        j = judge(srv.url, mode="pointwise", logprobs=False)
        assert j.score(["", "", ""], ["so kind", "so cruel", "so plain"]) == [5.0, 1.0, 3.0]
        assert [v.label for v in j.compare(["", ""], A, B)] == [1.0, 0.0]
        cot = judge(srv.url)
        v = cot.compare_with_question(["", ""], A, B, question="Which is kinder?", chain_of_thought=True)
        assert [x.label for x in v] == [1.0, 0.0]
        assert all("Think step by step" in s["body"]["messages"][0]["content"] for s in srv.seen[-4:])


def test_load_judge_builds_the_http_judge():
    from rlhfkit.judges import load_judge

    with StubServer() as srv:
        j = load_judge(f"http:stub-model?base_url={srv.url}&concurrency=2&timeout=2")
        assert j.concurrency == 2 and j.timeout == 2.0
        assert j.compare([""], A[:1], B[:1])[0].label == 1.0


def test_an_http_judge_with_options_is_an_ensemble_member(tmp_path):
    from rlhfkit.judges import load_judge
    from rlhfkit.judges.lexicon import AfinnJudge

    with StubServer() as srv:
        ens = load_judge(f"ensemble:http:stub-model?base_url={srv.url}&concurrency=2&timeout=2+afinn")
        http, afinn = ens.members
        assert isinstance(http, HTTPJudge) and isinstance(afinn, AfinnJudge)
        assert (http.base_url, http.concurrency, http.timeout) == (srv.url, 2, 2.0)
        assert [v.label for v in ens.compare(["", ""], A, B)] == [1.0, 0.0]
        spec = tmp_path / "ens.yaml"
        spec.write_text(f"kind: ensemble\ntie_margin: 0.3\nmembers:\n  - http:stub-model?base_url={srv.url}&max_retries=1\n"
                        "  - textblob\n")
        ens = load_judge(str(spec))
        assert ens.tie_margin == 0.3 and ens.members[0].max_retries == 1 and ens.members[1].name == "textblob"


# -- SL-CAI: critique -> revise ----------------------------------------------------------------

def _constitution(tmp_path):
    path = tmp_path / "c.md"
    path.write_text("## kind\ncritique: Identify unkind words in the response.\n"
                    "revision: Rewrite the response without unkind words.\ncomparison: Which response is kinder?\n")
    return path


def test_cai_revise_through_the_http_stub(tmp_path):
    from rlhfkit.recipes.cai import Config, main

    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me about my neighbour\nWhat about the weather\n")
    with StubServer() as srv:
        srv.plan = ["ok", "ok", "drop", "drop"]  # a dropped connection on the first critiques is retried
        stats = main(Config(model=f"http:stub?base_url={srv.url}&backoff=0.01", constitution=str(_constitution(tmp_path)),
                            prompts=str(prompts), output=str(tmp_path / "sft.jsonl"), revisions=2))
    rows = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and stats["revised"] == 2
    for r in rows:
        assert r["initial"] == "That is an awful question, but here is my answer."
        assert r["completion"] == "That is an kind question, but here is my answer."
        assert r["revisions"][0]["critique"] == "The response uses unkind words: awful."
        assert r["revisions"][1]["critique"] == "No problems."
        assert [h["principle"] for h in r["revisions"]] == ["kind", "kind"]
    assert stats["model_stats"]["connection_errors"] == 2 and stats["failed_critiques"] == 0


class _InstructionFollower:
    """A deterministic in-process model: the stub's answers without HTTP, failing where told."""

    name = "follower"

    def __init__(self, fail_revisions=False):
        from _judge_stub import answer

        self.answer, self.fail_revisions = answer, fail_revisions

    def generate(self, instructions, max_new_tokens=256):
        out = []
        for i in instructions:
            out.append(None if self.fail_revisions and "Revision request:" in i else self.answer(i))
        return out


def test_revise_loop_with_a_deterministic_model(tmp_path):
    from rlhfkit.judges.constitution import load_constitution
    from rlhfkit.recipes.cai import revise

    principles = load_constitution(_constitution(tmp_path))
    history, counts = revise(_InstructionFollower(), ["p", "q"], ["you are cruel and mean", "you are lovely"],
                             principles, revisions=1, max_new_tokens=32)
    assert history[0][0]["revision"] == "you are kind and kind"
    assert history[1][0]["revision"] == "you are lovely" and history[1][0]["critique"] == "No problems."
    history, counts = revise(_InstructionFollower(fail_revisions=True), ["p"], ["you are cruel"], principles, 3, 32)
    assert history == [[]] and counts["failed_revisions"] == 3  # the response stays as it was, counted


def test_cai_revise_rejects_a_model_that_cannot_generate(tmp_path):
    from rlhfkit.errors import ConfigError
    from rlhfkit.recipes.cai import Config, main

    (tmp_path / "p.txt").write_text("hi\n")
    with pytest.raises(ConfigError, match="cannot write critiques"):
        main(Config(model="afinn", constitution=str(_constitution(tmp_path)), prompts=str(tmp_path / "p.txt"),
                    output=str(tmp_path / "o.jsonl")))
    assert not (tmp_path / "o.jsonl").exists()


def test_a_wrong_request_stops_with_the_servers_message():
    """A 4xx other than 429 (a wrong key, an unknown model) cannot be cured by retrying."""
    from rlhfkit.errors import ConfigError

    with StubServer() as srv:
        srv.always = {"stub-model": "401"}
        with pytest.raises(ConfigError, match="answered 401"):
            judge(srv.url).compare([""], A[:1], B[:1])
        assert len(srv.seen) <= 2  # no retries


def test_label_with_a_failing_endpoint_leaves_out_and_counts_the_abstentions(tmp_path, capsys):
    from rlhfkit.recipes.label import Config, main

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": "", "a": x, "b": y}) + "\n" for x, y in zip(A + ["a horrible day"], B + ["a good day"])))
    with StubServer() as srv:
        srv.always = {"horrible": "malformed"}  # every request about the third pair fails
        stats = main(Config(input=str(inp), output=str(tmp_path / "o.jsonl"),
                            judge=f"http:stub-model?base_url={srv.url}&backoff=0.01&max_retries=2"))
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and stats["abstained"] == 1
    assert stats["judge"]["failed"] == 2 and stats["judge"]["malformed"] == 6  # 2 orders x 3 attempts
    out = capsys.readouterr().out
    assert "1 abstained" in out and "malformed 6" in out


def test_retry_after_as_an_http_date_is_honoured():
    import datetime
    import email.utils
    import time

    from rlhfkit.judges.http import retry_after

    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=2)
    with StubServer() as srv:
        srv.headers = {"Retry-After": email.utils.format_datetime(soon, usegmt=True)}
        srv.plan = ["429"]
        j = judge(srv.url, both_orders=False, backoff=0.001)
        t0 = time.monotonic()
        [v] = j.compare([""], A[:1], B[:1])
        waited = time.monotonic() - t0
    assert v.label == 1.0 and j.stats["rate_limited"] == 1
    assert 0.9 < waited < 3.5  # the date has whole seconds: between 1 and 2 s from now
    assert retry_after("3") == 3.0 and retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after("soon") == 0.0 and retry_after(None) == 0.0


def test_an_error_body_that_echoes_the_key_is_redacted(monkeypatch):
    from rlhfkit.errors import ConfigError

    monkeypatch.setenv("STUB_KEY", "sk-live-0123456789")
    with StubServer() as srv:
        srv.always = {"stub-model": "401"}
        srv.error_body = (b'{"error": "invalid key sk-live-0123456789", '
                          b'"echo": "Authorization: Bearer sk-live-0123456789; proxy Bearer abc.def"}')
        with pytest.raises(ConfigError) as e:
            judge(srv.url, api_key_env="STUB_KEY").compare([""], A[:1], B[:1])
    msg = str(e.value)
    assert "sk-live" not in msg and "abc.def" not in msg
    assert "invalid key ***" in msg and "Bearer ***" in msg


def test_cai_revise_writes_only_revised_records_and_prints_tokens_and_cost(tmp_path, capsys):
    from rlhfkit.recipes.cai import Config, main

    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"prompt": "hi", "completion": "you are awful"}) + "\n"
                         + json.dumps({"prompt": "hey", "completion": "you are lovely"}) + "\n")
    with StubServer() as srv:
        stats = main(Config(model=f"http:stub?base_url={srv.url}&price_prompt=2&price_completion=10",
                            constitution=str(_constitution(tmp_path)), responses=str(responses),
                            output=str(tmp_path / "sft.jsonl")))
        prompt_tokens = sum(len(s["body"]["messages"][0]["content"].split()) for s in srv.seen)
    rows = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    # the stub's revision of a response without unkind words is the response itself: not an SFT record
    assert [r["completion"] for r in rows] == ["you are kind"]
    assert stats["records"] == 1 and stats["unrevised"] == 1 and stats["unchanged_revisions"] == 1
    out = capsys.readouterr().out
    assert "1 of 2 responses revised -> " in out and "1 left out (no revision)" in out
    # completions: the critiques "The response uses unkind words: awful." (6 words) and "No problems." (2),
    # the revisions "you are kind" and "you are lovely" (3 each)
    assert f"prompt_tokens {prompt_tokens}" in out and "completion_tokens 14" in out
    assert f"cost {(prompt_tokens * 2 + 14 * 10) / 1e6:.6f}" in out


def test_cai_revise_fails_when_nothing_was_revised(tmp_path):
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.recipes.cai import Config, main

    (tmp_path / "p.txt").write_text("hi\nhello\n")
    with StubServer() as srv:
        srv.always = {"Revision request": "500"}
        with pytest.raises(RlhfkitError) as e:
            main(Config(model=f"http:stub?base_url={srv.url}&backoff=0.001&max_retries=1",
                        constitution=str(_constitution(tmp_path)), prompts=str(tmp_path / "p.txt"),
                        output=str(tmp_path / "sft.jsonl")))
    assert "no response of 2 was revised" in str(e.value) and "\n" not in str(e.value)
    assert "2 revisions failed" in str(e.value)
    assert not (tmp_path / "sft.jsonl").exists()

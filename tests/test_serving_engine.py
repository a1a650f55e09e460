"""The policy server's batching engine (rlhfkit.serving.engine), without HTTP.

The model is a tiny random Llama in float64, so a row's logits are the same (to ~1e-15) whether
it is decoded alone, left-padded in a batch or joined into a running batch: every output below
is compared token for token with the rollout engine decoding the prompt on its own.
"""

from __future__ import annotations

import threading

import pytest
import torch

from rl_helpers import tiny_policy, tiny_tokenizer
from rlhfkit.data.collate import encode_prompt
from rlhfkit.rollout.generate import generate, sample_next_token
from rlhfkit.serving.engine import (
    Engine,
    Job,
    Sampling,
    choice_generator,
    find_stop,
    safe_end,
    sample_rows,
)

PROMPTS = ["the cat sat", "a kind word makes the day", "she", "bad news travels fast but"]


@pytest.fixture(scope="module")
def tok_model():
    tok = tiny_tokenizer()
    return tok, tiny_policy(tok).double().eval()


class Collector:
    """Events of one job; `wait()` returns once every choice has finished."""

    def __init__(self, n: int = 1, on_delta=None):
        self.events, self.left, self.done, self.on_delta = [], n, threading.Event(), on_delta

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if event["type"] == "delta" and self.on_delta:
            self.on_delta(self)
        self.left -= event["type"] == "finish"
        if event["type"] == "error" or self.left == 0:
            self.done.set()

    def wait(self):
        assert self.done.wait(60), "the engine did not finish the job"
        assert not [e for e in self.events if e["type"] == "error"], self.events
        return self

    def text(self, index: int = 0) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "delta" and e["index"] == index)

    def finish(self, index: int = 0) -> dict:
        return next(e for e in self.events if e["type"] == "finish" and e["index"] == index)


def ids(tok, prompt: str) -> list[int]:
    return encode_prompt(tok, prompt)[0]


def reference(tok, model, prompt: str, max_tokens: int, **kw) -> tuple[str, list[int]]:
    """The rollout engine on the prompt alone: (text, sampled token ids incl. a final EOS)."""
    out = generate(model, tok, [prompt], max_tokens, **kw)
    toks = out.response_ids[0][out.response_mask[0].bool()].tolist()
    return tok.decode([t for t in toks if t != tok.eos_token_id], skip_special_tokens=True), toks


def test_sample_rows_picks_what_sample_next_token_picks():
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 3
    temps, top_ps = [0.0, 0.7, 1.0, 1.3, 0.5, 1.0], [1.0, 0.9, 0.5, 1.0, 0.3, 1.0]
    for step in range(20):
        gens = [torch.Generator().manual_seed(100 + i) for i in range(6)]
        for g in gens:  # a generator some steps in, as a row's generator is mid-response
            torch.rand((step, 1), generator=g)
        u = torch.tensor([torch.rand((1, 1), generator=g)[0, 0].item() if t > 0 else 0.0
                          for g, t in zip(gens, temps)])
        got = sample_rows(logits, torch.tensor(temps), top_ps, u)
        for i in range(6):
            g = torch.Generator().manual_seed(100 + i)
            torch.rand((step, 1), generator=g)
            want = sample_next_token(logits[i:i + 1], temps[i], top_ps[i], g)
            assert got[i].item() == want.item(), (step, i)


def test_stop_strings_and_held_back_text():
    assert find_stop("hello world, bye", ["bye", "world"]) == 6
    assert find_stop("hello", ["x"]) is None
    assert safe_end("hello wor", ["world"]) == len("hello ")  # may become the stop string
    assert safe_end("hello w", ["xyz"]) == len("hello w")
    assert safe_end("caf\ufffd", []) == 3  # half a UTF-8 character waits for its other bytes


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_one_prefill_for_requests_that_arrive_together_each_with_its_settings(tok_model, engine):
    tok, model = tok_model
    eng = Engine(model, tok, engine=engine, batch_wait_s=0.5, seed=0)
    try:
        jobs = [Collector() for _ in range(4)]
        stop_ref, _ = reference(tok, model, PROMPTS[2], 12, temperature=0.0)
        assert len(stop_ref) > 6  # the precondition of the stop-string check
        stop = stop_ref[4:6]
        settings = [Sampling(max_tokens=12, temperature=0.0),                 # greedy
                    Sampling(max_tokens=3, temperature=0.0),                  # a short budget
                    Sampling(max_tokens=12, temperature=0.0, stop=(stop,)),   # a stop string
                    Sampling(max_tokens=9, temperature=0.8, top_p=0.9, seed=7)]
        for prompt, s, c in zip(PROMPTS, settings, jobs):
            eng.submit(Job(ids(tok, prompt), s, c))
        for c in jobs:
            c.wait()
        assert eng.stats["prefills"] == 1 and eng.stats["max_jobs_in_step"] == 4
        assert jobs[0].text() == reference(tok, model, PROMPTS[0], 12, temperature=0.0)[0]
        text, toks = reference(tok, model, PROMPTS[1], 3, temperature=0.0)
        assert jobs[1].text() == text and jobs[1].finish() == {"type": "finish", "index": 0, "reason": "length",
                                                               "completion_tokens": 3}
        assert jobs[2].text() == stop_ref[:stop_ref.index(stop)] and jobs[2].finish()["reason"] == "stop"
        # a seeded request in a batch draws from its own generator: what it draws alone
        alone = Engine(model, tok, engine=engine, seed=123)
        try:
            c = Collector()
            alone.submit(Job(ids(tok, PROMPTS[3]), settings[3], c))
            assert c.wait().text() == jobs[3].text()
        finally:
            alone.close()
    finally:
        eng.close()


def test_requests_join_a_running_batch_and_leave_it_when_done(tok_model):
    tok, model = tok_model
    eng = Engine(model, tok, engine="hf", seed=0)
    long_text, long_toks = reference(tok, model, PROMPTS[1], 24, temperature=0.0)
    assert len(long_toks) == 24  # the precondition: the long request runs its whole budget
    late = []

    def join_late(c: Collector) -> None:  # after the long request's 3rd piece of text, two more arrive
        if sum(e["type"] == "delta" for e in c.events) == 3:
            for prompt, n in ((PROMPTS[0], 6), (PROMPTS[3], 16)):
                late.append((prompt, n, Collector()))
                eng.submit(Job(ids(tok, prompt), Sampling(max_tokens=n, temperature=0.0), late[-1][2]))

    try:
        first = Collector(on_delta=join_late)
        eng.submit(Job(ids(tok, PROMPTS[1]), Sampling(max_tokens=24, temperature=0.0), first))
        first.wait()
        for prompt, n, c in late:
            assert c.wait().text() == reference(tok, model, prompt, n, temperature=0.0)[0]
        assert first.text() == long_text
        assert eng.stats["prefills"] == 2 and eng.stats["max_jobs_in_step"] == 3
        assert eng.batch.cache is None  # every row left; the cache is released
    finally:
        eng.close()


def test_n_choices_share_one_prefill_and_seeds_reproduce(tok_model):
    tok, model = tok_model
    eng = Engine(model, tok, seed=0)
    try:
        runs = []
        for seed in (5, 5, 6):
            c = Collector(n=3)
            eng.submit(Job(ids(tok, PROMPTS[0]), Sampling(max_tokens=10, n=3, seed=seed, temperature=1.0), c))
            runs.append([c.wait().text(i) for i in range(3)])
        assert runs[0] == runs[1] and runs[0] != runs[2]
        assert len(set(runs[0])) > 1  # choices of one request differ
        # choice k of a seeded request is the rollout engine's draw from the same generator
        g = choice_generator(5, 1, torch.device("cpu"))
        out = _seeded_reference(tok, model, PROMPTS[0], 10, g)
        assert runs[0][1] == out
    finally:
        eng.close()


def _seeded_reference(tok, model, prompt, n, generator) -> str:
    """Token by token with sample_next_token and a full forward each step (no cache at all)."""
    seq = ids(tok, prompt)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([seq + out])).logits[:, -1, :]
        t = sample_next_token(logits, 1.0, 1.0, generator).item()
        if t == tok.eos_token_id:
            break
        out.append(t)
    return tok.decode(out, skip_special_tokens=True)


def test_logprobs_are_the_models_and_a_cancelled_job_leaves(tok_model):
    tok, model = tok_model
    eng = Engine(model, tok, seed=0)
    try:
        c = Collector()
        p = ids(tok, PROMPTS[2])
        eng.submit(Job(p, Sampling(max_tokens=4, temperature=0.0, logprobs=3), c))
        entries = [x for e in c.wait().events if e["type"] == "delta" for x in e["logprobs"]]
        seq = p + [e["id"] for e in entries]
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0], -1)
        for k, e in enumerate(entries):
            row = logp[len(p) - 1 + k]
            assert e["logprob"] == pytest.approx(row[e["id"]].item(), abs=1e-9)
            assert [t for t, _ in e["top"]] == row.topk(3).indices.tolist()
        stop = Collector(on_delta=lambda col: col_job.cancel())
        col_job = Job(p, Sampling(max_tokens=50, temperature=1.0), stop)
        eng.submit(col_job)
        threading.Event().wait(0.5)
        assert not any(e["type"] == "finish" for e in stop.events) and not eng._busy()
    finally:
        eng.close()

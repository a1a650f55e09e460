"""`serve-policy --engine vllm` against a stub with vLLM's offline API (`LLM.generate` with
token-id prompts and one `SamplingParams` per prompt), as the vLLM rollout engine is tested
(tests/test_scale_vllm.py). The stub decodes greedily with rlhfkit's hf loop on its own copy
of the model and honours max_tokens, n, stop strings and logprobs, so the server's answers can
be compared with the rollout engine's."""

from __future__ import annotations

import dataclasses
import importlib
import threading
import time
import types

import pytest
import torch
import uvicorn

from rl_helpers import save_tiny, tiny_policy, tiny_tokenizer
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.rollout.generate import generate
from rlhfkit.serving.server import ServeConfig, create_app
from test_serving_api import HI, free_port

openai = pytest.importorskip("openai")
hf_engine = importlib.import_module("rlhfkit.rollout.generate")


def make_stub() -> types.ModuleType:
    @dataclasses.dataclass
    class SamplingParams:
        n: int = 1
        temperature: float = 1.0
        top_p: float = 1.0
        max_tokens: int = 16
        stop: list | None = None
        seed: int | None = None
        logprobs: int | None = None

    @dataclasses.dataclass
    class Logprob:
        logprob: float

    class LLM:
        def __init__(self, model, **kwargs):
            self.path, self.kwargs, self.calls = model, kwargs, []
            self.hf, self.tok = load_policy(model).eval(), load_tokenizer(model)

        def _one(self, ids, sp):
            assert sp.temperature == 0.0  # the stub only decodes greedily
            stop = torch.tensor([self.tok.eos_token_id])
            _, _, toks, mask, ended = hf_engine._generate_chunk(self.hf, [ids], sp.max_tokens, 0.0, 1.0, stop,
                                                                 self.tok.pad_token_id, None)
            row = toks[0][mask[0].bool()].tolist()
            finish = "stop" if bool(ended[0]) else "length"
            text = self.tok.decode(row, skip_special_tokens=True)
            for s in sp.stop or []:
                if s in text:
                    text, finish = text[:text.index(s)], "stop"
            logprobs = None
            if sp.logprobs is not None:
                with torch.no_grad():
                    logp = torch.log_softmax(self.hf(torch.tensor([ids + row])).logits[0, len(ids) - 1:-1], -1)
                logprobs = []
                for k, t in enumerate(row):
                    top = logp[k].topk(sp.logprobs)
                    entry = {int(i): Logprob(float(v)) for i, v in zip(top.indices, top.values)}
                    entry[t] = Logprob(float(logp[k, t]))
                    logprobs.append(entry)
            return types.SimpleNamespace(token_ids=row, text=text, finish_reason=finish, logprobs=logprobs)

        def generate(self, prompts, sampling_params, use_tqdm=True):
            assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
            self.calls.append([dataclasses.asdict(sp) for sp in sampling_params])
            return [types.SimpleNamespace(outputs=[self._one(p["prompt_token_ids"], sp)] * sp.n)
                    for p, sp in zip(prompts, sampling_params)]

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


@pytest.fixture()
def served(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    path = save_tiny(tmp_path / "tiny", tiny_policy(tok), tok)
    monkeypatch.setitem(__import__("sys").modules, "vllm", make_stub())
    app = create_app(ServeConfig(models=[f"tiny={path}"], engine="vllm", batch_wait_ms=300, max_tokens=8))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        assert thread.is_alive()
        time.sleep(0.05)
    yield app, openai.OpenAI(base_url=f"http://127.0.0.1:{srv.config.port}/v1", api_key="x", max_retries=0), path
    srv.should_exit = True
    thread.join(30)


def test_requests_waiting_together_go_to_vllm_in_one_call_with_their_own_settings(served):
    app, client, path = served
    results = {}
    barrier = threading.Barrier(3)

    def ask(i, **kw):
        barrier.wait()
        results[i] = client.completions.create(model="tiny", temperature=0.0, **kw)

    asks = [dict(prompt="the cat sat", max_tokens=3), dict(prompt="a kind word", max_tokens=7, n=2),
            dict(prompt="she smiled", max_tokens=5, logprobs=2)]
    threads = [threading.Thread(target=ask, args=(i,), kwargs=kw) for i, kw in enumerate(asks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    llm = app.state.models["tiny"].engine.llm
    assert len(llm.calls) == 1 and sorted(sp["max_tokens"] for sp in llm.calls[0]) == [3, 5, 7]
    assert sorted(sp["n"] for sp in llm.calls[0]) == [1, 1, 2]
    model, tok = load_policy(path).eval(), load_tokenizer(path)
    for i, kw in enumerate(asks):
        ref = generate(model, tok, [kw["prompt"]], kw["max_tokens"], temperature=0.0)
        toks = ref.response_ids[0][ref.response_mask[0].bool()].tolist()
        want = tok.decode(toks, skip_special_tokens=True)
        assert [c.text for c in results[i].choices] == [want] * kw.get("n", 1)
        assert results[i].usage.completion_tokens == len(toks) * kw.get("n", 1)
    lp = results[2].choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == results[2].usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_chat_stream_and_stop_strings_through_vllm(served):
    app, client, _ = served
    plain = client.chat.completions.create(model="tiny", messages=HI, temperature=0.0, max_tokens=8)
    text = plain.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, temperature=0.0, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len(text) > 3  # the precondition of the stop-string check
    cut = client.chat.completions.create(model="tiny", messages=HI, temperature=0.0, max_tokens=8, stop=text[2:4])
    assert cut.choices[0].message.content == text[:text.index(text[2:4])]
    assert app.state.models["tiny"].engine.llm.calls[-1][0]["stop"] == [text[2:4]]

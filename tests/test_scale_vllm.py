"""The vLLM engine's weight sync, sleep/wake and batching, run against a stub with vLLM's API.

The stub's LLM holds its own copy of the model (built from the checkpoint path, as vLLM would
load it), takes weights only through `load_weights`, refuses to load or generate while asleep,
and generates greedily with rlhfkit's hf loop on its copy. So its tokens equal the policy's only
if the engine pushed the policy's current weights.
"""

from __future__ import annotations

import dataclasses
import importlib
import types

import pytest
import torch

from rlhfkit.errors import ConfigError
from rlhfkit.models import load_policy, load_tokenizer, save_model, tiny_llama
from rlhfkit.rollout.vllm import VLLMEngine, import_vllm

hf_engine = importlib.import_module("rlhfkit.rollout.generate")
PROMPTS = ["the kind dog", "a warm smile made", "she thanked", "they shared bread with the tired", "the garden"]


def make_stub(tokenizer) -> types.ModuleType:
    @dataclasses.dataclass
    class SamplingParams:
        n: int = 1
        temperature: float = 1.0
        top_p: float = 1.0
        max_tokens: int = 16
        stop_token_ids: list | None = None
        seed: int | None = None
        top_k: int = -1
        logprobs: int | None = None

    class StubModel:
        """vLLM's model object: takes (name, tensor) pairs in load_weights; `hf` is its copy."""

        def __init__(self, llm):
            self.llm, self.hf = llm, load_policy(llm.path).eval()

        def load_weights(self, weights):
            assert "weights" in llm_awake(self.llm), "load_weights while the weights are asleep"
            params = dict(self.hf.named_parameters())
            for name, tensor in weights:
                params[name].data.copy_(tensor)
                self.llm.loaded.append(name)

    def llm_awake(llm):
        return llm.awake

    class LLM:
        def __init__(self, model, **kwargs):
            self.path, self.kwargs, self.awake, self.loaded, self.calls, self.events = model, kwargs, {"weights", "kv_cache"}, [], [], []
            runner = types.SimpleNamespace(model=StubModel(self))
            self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=runner)))

        def sleep(self, level):
            self.events.append(f"sleep{level}")
            self.awake = set()

        def wake_up(self, tags):
            self.events.append("wake:" + ",".join(tags))
            self.awake |= set(tags)

        def reset_prefix_cache(self):
            self.events.append("reset")

        def generate(self, prompts, sampling_params, use_tqdm=True):
            assert self.awake == {"weights", "kv_cache"}, "generate while asleep"
            sp = sampling_params
            assert sp.temperature == 0.0  # the stub only does greedy
            self.calls.append(len(prompts))
            model = self.llm_engine.model_executor.driver_worker.model_runner.model.hf
            stop = torch.tensor(sp.stop_token_ids)
            q, _, toks, mask, ended, lps = hf_engine._generate_chunk(
                model, [p["prompt_token_ids"] for p in prompts], sp.max_tokens, 0.0, 1.0, stop,
                tokenizer.pad_token_id, None, with_logprobs=True)
            outs = []
            for i in range(len(prompts)):
                row = toks[i][mask[i].bool()].tolist()
                finish = "stop" if bool(ended[i]) else "length"
                # vLLM's logprobs=0: per position, {sampled id: Logprob}
                lp = [{t: types.SimpleNamespace(logprob=float(v))} for t, v in zip(row, lps[i][mask[i].bool()])]
                sample = types.SimpleNamespace(token_ids=row, finish_reason=finish, logprobs=lp,
                                               stop_reason=row[-1] if finish == "stop" else None)
                outs.append(types.SimpleNamespace(prompt_token_ids=prompts[i]["prompt_token_ids"],
                                                  outputs=[sample] * sp.n))
            return outs

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


@pytest.fixture()
def setup(tmp_path):
    tok = load_tokenizer("kindly:tokenizer")
    policy = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3,
                        tokenizer=tok)
    save_model(policy, tok, tmp_path / "policy")
    return tok, policy, tmp_path / "policy"


def test_rollout_matches_the_hf_engine_and_batches(setup):
    tok, policy, path = setup
    engine = VLLMEngine(str(path), vllm_module=make_stub(tok))
    assert engine.llm.kwargs["enable_sleep_mode"] and engine.llm.events == ["sleep2"]
    out = engine.generate(policy, tok, PROMPTS, max_new_tokens=7, temperature=0.0, num_samples=2, batch_size=4)
    ref = hf_engine.generate(policy, tok, PROMPTS, max_new_tokens=7, temperature=0.0, num_samples=2, batch_size=4)
    assert engine.llm.calls == [2, 2, 1]  # 4 rows in flight: 2 prompts x 2 samples per call
    for field in ("query_ids", "query_mask", "response_ids", "response_mask", "ended_with_eos", "prompt_index",
                  "sampler_logp"):
        assert torch.equal(getattr(out, field), getattr(ref, field)), field
    assert out.responses == ref.responses and out.prompts == ref.prompts
    # weights woken before the push, KV cache before generating, everything released after
    assert engine.llm.events == ["sleep2", "wake:weights", "reset", "wake:kv_cache", "sleep2"]


def test_weights_pushed_after_each_update(setup):
    tok, policy, path = setup
    engine = VLLMEngine(str(path), vllm_module=make_stub(tok))
    opt = torch.optim.SGD(policy.parameters(), lr=5.0)
    ids = torch.tensor([hf_engine.encode_prompts(tok, ["the kind dog waited"])[0][0]])
    policy(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # the policy moves; vLLM's copy is now stale until the next rollout pushes it
    runner_model = engine.llm.llm_engine.model_executor.driver_worker.model_runner.model.hf
    assert not torch.equal(runner_model.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)
    out = engine.generate(policy, tok, PROMPTS, max_new_tokens=6, temperature=0.0)
    for name, p in policy.named_parameters():
        assert torch.equal(dict(runner_model.named_parameters())[name], p.detach()), name
    n_unique = len({id(p) for p in policy.parameters()})
    assert len(engine.llm.loaded) == n_unique  # every weight once (the tied head is not sent twice)
    ref = hf_engine.generate(policy, tok, PROMPTS, max_new_tokens=6, temperature=0.0)
    assert out.responses == ref.responses
    engine.generate(policy, tok, PROMPTS, max_new_tokens=6, temperature=0.0)
    assert engine.pushes == 2


def test_lora_policy_pushes_merged_base_weights(setup):
    from rlhfkit.config import ModelArgs
    from rlhfkit.models.lora import apply_lora

    tok, policy, path = setup
    peft_model = apply_lora(policy, ModelArgs(use_lora=True, lora_r=2, lora_alpha=4), task_type="CAUSAL_LM")
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.05)  # a non-zero adapter, so merged != base
    engine = VLLMEngine(str(path), vllm_module=make_stub(tok))
    engine.generate(peft_model, tok, PROMPTS[:2], max_new_tokens=4, temperature=0.0)
    assert not any("lora_" in n or "base_layer" in n for n in engine.llm.loaded)
    runner_model = engine.llm.llm_engine.model_executor.driver_worker.model_runner.model.hf
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    q = runner_model.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q, merged.model.layers[0].self_attn.q_proj.weight)


def test_missing_vllm_is_one_line():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ConfigError, match="pip install vllm"):
        import_vllm()

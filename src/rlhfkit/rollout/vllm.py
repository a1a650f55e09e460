"""Rollout engine `vllm`: generation by a colocated vLLM instance (optional; `pip install vllm`).

Colocated: vLLM runs in the training process on the same GPU, holding `gpu_memory_utilization`
of it. Each rollout:

1. wake vLLM's weight memory and push the policy's current weights into it (`load_weights`, the
   same HF parameter names; a LoRA policy is merged for the push and unmerged after), so vLLM
   always samples from the policy being trained;
2. wake the KV cache, generate every prompt's samples (vLLM batches and schedules them), and
3. put vLLM to sleep (level 2: weights and KV cache released), giving the memory back to the
   training forward and backward.

Sampling follows the `hf` engine: temperature (0 = greedy), top-k, top-p, stop at EOS and the stop
ids. The ratio's old log-probs are recomputed by the training forward; vLLM's own log-prob of each
sampled token (`logprobs_mode="processed_logprobs"`, vLLM >= 0.10.2: after temperature, top-k and
top-p, the distribution it sampled from) is recorded as `Rollout.sampler_logp`, for the sampler
agreement metrics and the optional off-policy correction. The layout of the returned Rollout is
the `hf` engine's.

The vLLM calls (`LLM`, `SamplingParams`, `sleep`, `wake_up`, `reset_prefix_cache`,
`llm_engine.model_executor.driver_worker.model_runner.model.load_weights`) are the ones TRL's
colocate mode uses (trl/generation/vllm_generation.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from types import ModuleType

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.rollout.record import Rollout


def import_vllm() -> ModuleType:
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise ConfigError("config field 'engine': vllm is not installed; `pip install vllm` (CUDA), "
                          "or use engine static or hf") from e


def named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every weight vLLM needs; a peft model yields its merged base weights."""
    model = getattr(model, "module", model)
    if hasattr(model, "peft_config"):
        base = model.get_base_model()
        for name, p in base.named_parameters():
            if "lora_" in name:
                continue
            yield name.replace(".base_layer", ""), p.detach()
        return
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # a tied LM head is the embedding: vLLM ties it itself
            continue
        seen.add(id(p))
        yield name, p.detach()


class VLLMEngine:
    """One colocated vLLM instance serving rollouts of a policy that keeps training."""

    def __init__(self, model_path: str, *, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 dtype: str = "bfloat16", sleep: bool = True, seed: int = 0, vllm_module: ModuleType | None = None):
        self.vllm = vllm_module or import_vllm()
        self.sleep_enabled = sleep
        self.llm = self.vllm.LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization,
                                 max_model_len=max_model_len, dtype=dtype, enable_sleep_mode=sleep, seed=seed,
                                 distributed_executor_backend="external_launcher", logprobs_mode="processed_logprobs")
        if sleep:
            self.llm.sleep(level=2)
        self.pushes = 0

    def push_weights(self, model: torch.nn.Module) -> int:
        """Copy the policy's current weights into vLLM; returns the number of tensors sent."""
        if self.sleep_enabled:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        inner = getattr(model, "module", model)
        merged = hasattr(inner, "peft_config")
        if merged:
            inner.merge_adapter()
        count = 0
        try:
            for name, tensor in named_weights(inner):
                target.load_weights([(name, tensor)])
                count += 1
        finally:
            if merged:
                inner.unmerge_adapter()
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.pushes += 1
        return count

    def generate(self, model, tokenizer, prompts: Sequence[str], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, num_samples: int = 1, batch_size: int = 64, seed: int | None = None,
                 max_prompt_length: int | None = None, stop_token_ids: Sequence[int] | None = None, top_k: int = 0):
        """The rollout-engine call (the signature of rlhfkit.rollout.generate.generate)."""
        gen = importlib.import_module("rlhfkit.rollout.generate")
        if max_new_tokens < 1 or num_samples < 1 or batch_size < 1:
            raise ConfigError("max_new_tokens, num_samples and batch_size must be >= 1")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        pad_id = tokenizer.pad_token_id
        ids, truncated = gen.encode_prompts(tokenizer, prompts, max_prompt_length)
        stop = gen._stop_ids(getattr(model, "module", model), tokenizer, stop_token_ids)
        self.push_weights(model)
        if self.sleep_enabled:
            self.llm.wake_up(tags=["kv_cache"])
        params = self.vllm.SamplingParams(n=num_samples, temperature=max(temperature, 0.0), top_p=top_p,
                                          top_k=top_k if top_k > 0 else -1, max_tokens=max_new_tokens,
                                          stop_token_ids=stop, seed=seed, logprobs=0)
        per_call = max(1, batch_size // num_samples)  # prompts per call: at most batch_size rows in flight
        responses: list[list[int]] = []
        logps: list[list[float]] = []
        ended: list[bool] = []
        try:
            for start in range(0, len(ids), per_call):
                chunk = [{"prompt_token_ids": p} for p in ids[start:start + per_call]]
                for out in self.llm.generate(chunk, sampling_params=params, use_tqdm=False):
                    for sample in out.outputs:
                        toks = list(sample.token_ids)
                        stopped = sample.finish_reason == "stop"
                        reason = getattr(sample, "stop_reason", None)
                        if stopped and isinstance(reason, int) and (not toks or toks[-1] != reason):
                            toks.append(reason)  # keep the stop token: the policy must learn to emit it
                        responses.append(toks[:max_new_tokens])
                        logps.append(_sampled_logprobs(sample, toks[:max_new_tokens]))
                        ended.append(stopped)
        finally:
            if self.sleep_enabled:
                self.llm.sleep(level=2)
        roll = _to_rollout(tokenizer, prompts, ids, responses, ended, num_samples, pad_id, truncated)
        roll.sampler_logp = torch.zeros(roll.response_ids.shape, dtype=torch.float32)
        for k, row in enumerate(logps):
            roll.sampler_logp[k, :len(row)] = torch.tensor(row, dtype=torch.float32)
        return roll


def _sampled_logprobs(sample, toks: list[int]) -> list[float]:
    """vLLM's log-prob of each sampled token (`logprobs=0` returns the sampled token's own); the stop
    token appended from `stop_reason` has none from vLLM and gets 0 (vLLM never sampled it)."""
    entries = list(getattr(sample, "logprobs", None) or [])
    out = [float(d[t].logprob) if d is not None and t in d else 0.0 for d, t in zip(entries, toks)]
    return out + [0.0] * (len(toks) - len(out))


def _to_rollout(tokenizer, prompts, ids, responses, ended, num_samples, pad_id, truncated):
    rows = [i for i in range(len(ids)) for _ in range(num_samples)]
    p = max(len(x) for x in ids)
    r = max(1, max(len(x) for x in responses))
    query = torch.full((len(rows), p), pad_id, dtype=torch.long)
    qmask = torch.zeros((len(rows), p), dtype=torch.long)
    resp = torch.full((len(rows), r), pad_id, dtype=torch.long)
    rmask = torch.zeros((len(rows), r), dtype=torch.long)
    for k, (i, toks) in enumerate(zip(rows, responses)):
        query[k, p - len(ids[i]):] = torch.tensor(ids[i])
        qmask[k, p - len(ids[i]):] = 1
        if toks:
            resp[k, :len(toks)] = torch.tensor(toks)
            rmask[k, :len(toks)] = 1
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Rollout(prompts=[prompts[i] for i in rows], responses=texts, query_ids=query, query_mask=qmask,
                   response_ids=resp, response_mask=rmask, ended_with_eos=torch.tensor(ended),
                   prompt_index=torch.tensor(rows, dtype=torch.long), num_truncated_prompts=truncated)


_ENGINES: dict[int, VLLMEngine] = {}


def generate_rollout(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, temperature: float = 1.0,
                     top_p: float = 1.0, num_samples: int = 1, batch_size: int = 64, seed: int | None = None,
                     max_prompt_length: int | None = None, stop_token_ids: Sequence[int] | None = None,
                     top_k: int = 0):
    """The `vllm` engine with the rollout-engine signature: one colocated vLLM per policy, started
    on first use from the policy's checkpoint path, its weights refreshed on every call."""
    inner = getattr(model, "module", model)
    key = id(inner)
    if key not in _ENGINES:
        import_vllm()  # a missing library is the first thing to say
        path = getattr(inner.config, "_name_or_path", "") or getattr(inner, "name_or_path", "")
        if not path:
            raise ConfigError("config field 'engine': vllm needs a policy loaded from a checkpoint folder or hub name")
        _ENGINES[key] = VLLMEngine(path)
    return _ENGINES[key].generate(model, tokenizer, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                                  num_samples=num_samples, batch_size=batch_size, seed=seed,
                                  max_prompt_length=max_prompt_length, stop_token_ids=stop_token_ids, top_k=top_k)

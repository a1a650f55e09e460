"""Making two on-policy implementations do the same computation, so their speeds can be compared.

Two samplers fed the same logits still draw different tokens when they consume randomness
differently: rlhfkit draws one uniform per row and inverts the CDF (rollout/generate.py), HF
`generate` calls `torch.multinomial` on the global generator. Different tokens mean different
rollouts, rewards and losses, and then nothing shows the two sides did equal work.

`shared_sampling_noise(model, seed_of_call)` makes the peer's `model.generate` draw its tokens
as rlhfkit's sampler would with the same seed: while that call runs, `torch.multinomial(probs, 1)`
is answered by inverse-CDF sampling with a private generator seeded by `seed_of_call(i)` for the
i-th call. The work per token is unchanged (one softmax, one cumulative sum, one search per row
instead of one exponential draw per vocabulary entry, both negligible next to the forward).

`warm_start(policy, tokenizer, steps)` gives the benchmarks' random tiny policy a short SFT on the
bundled task so that it ends responses with EOS at varied lengths, as a real policy does. A
random policy almost never samples EOS, every response then has the maximum length, and a
group-normalised policy loss at ratio 1 is exactly zero on both sides whatever they computed.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import torch

_ORIGINAL_MULTINOMIAL = torch.multinomial


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `probs` (B, V), (B, 1) shaped like torch.multinomial(probs, 1): the
    same arithmetic as rlhfkit.rollout.generate.sample_next_token at top_p 1."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)


@contextlib.contextmanager
def _noise(seed: int) -> Iterator[None]:
    generators: dict[torch.device, torch.Generator] = {}  # made on the device of the first draw

    def multinomial(probs, num_samples, replacement=False, *, generator=None, out=None):
        if num_samples != 1 or probs.dim() != 2 or generator is not None or out is not None:
            return _ORIGINAL_MULTINOMIAL(probs, num_samples, replacement, generator=generator, out=out)
        if probs.device not in generators:
            generators[probs.device] = torch.Generator(device=probs.device).manual_seed(seed)
        return inverse_cdf_sample(probs, generators[probs.device])

    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = _ORIGINAL_MULTINOMIAL


def shared_sampling_noise(model, seed_of_call: Callable[[int], int]) -> None:
    """Patch `model.generate` (an instance attribute) so its i-th call samples with seed_of_call(i)."""
    original = model.generate
    calls = itertools.count()

    def generate(*args, **kwargs):
        with _noise(int(seed_of_call(next(calls)))):
            return original(*args, **kwargs)

    model.generate = generate


def warm_start(policy, tokenizer, steps: int = 120, batch: int = 32, lr: float = 2e-3, seed: int = 0) -> dict:
    """A short SFT of `policy` on the bundled task's continuations (in place); returns its metrics."""
    import tempfile
    from pathlib import Path

    from rlhfkit.recipes import sft
    from rlhfkit.train.accelerator import make_accelerator

    examples = sft.load_sft_examples("kindly", tokenizer, max_length=64).examples
    with tempfile.TemporaryDirectory() as d:
        cfg = sft.Config(model="unused", output_dir=d, per_device_train_batch_size=batch, max_steps=steps,
                         learning_rate=lr, logging_steps=10**9, report_to="none", progress=False, seed=seed)
        return sft.train_causal_lm(cfg, policy, tokenizer, examples, [], make_accelerator(cfg), Path(d))


def rlhfkit_reward_encoding(tokenizer, prompts: list[str], bos: str = ""):
    """`tokenizer` (changed in place and returned) encoding TRL's reward texts as rlhfkit does.

    TRL hands a reward model's tokenizer the joined text prompt + completion; rlhfkit's reward
    models read [BOS] prompt + response + EOS with prompt and response tokenised separately
    (rlhfkit.models.reward.encode_prompt_response, the form they are trained on). The two give
    different token ids where BPE merges across the boundary or at the missing EOS. Each text is
    split after the longest of `prompts` (the strings TRL was given, which may start with the
    written-out `bos`) it starts with, and encoded as rlhfkit encodes it, right-padded.
    """
    import copy

    from transformers import BatchEncoding

    from rlhfkit.data.collate import pad_right
    from rlhfkit.models.reward import encode_prompt_response

    base, plain = type(tokenizer), copy.deepcopy(tokenizer)
    known = sorted(set(prompts), key=len, reverse=True)

    def split(text: str) -> tuple[str, str]:
        for p in known:
            if text.startswith(p):
                return p[len(bos):] if bos and p.startswith(bos) else p, text[len(p):]
        raise ValueError(f"reward text does not start with a known prompt: {text[:60]!r}")

    class RlhfkitEncoding(base):
        def __call__(self, text=None, *args, **kwargs):
            texts = [text] if isinstance(text, str) else list(text)
            ids = [encode_prompt_response(plain, *split(t))[0] for t in texts]
            input_ids, mask = pad_right(ids, self.pad_token_id)
            return BatchEncoding({"input_ids": input_ids, "attention_mask": mask})

    RlhfkitEncoding.__name__ = base.__name__
    tokenizer.__class__ = RlhfkitEncoding
    return tokenizer


def rlhfkit_ppo_reward(get_reward, reward_model, tokenizer, prompt_of_query: dict[tuple[int, ...], str]):
    """TRL 1.12 PPO's `get_reward`, answering for `reward_model` on the input rlhfkit's reward model reads.

    TRL scores query ids + generated ids (cut after the first EOS, no EOS added when none was
    sampled); rlhfkit scores [BOS] prompt + the decoded response re-encoded + EOS
    (rlhfkit.models.reward.encode_prompt_response), which is what its reward models are trained
    on and what lets a reward model with another tokenizer score the policy. The patched call
    rebuilds each row that way (query kept, left-padded as TRL has it; the response part
    re-encoded, right-padded) and then runs TRL's own function on it. Calls for other models
    (the value model) are passed through unchanged.
    """
    from rlhfkit.models.reward import encode_prompt_response

    def patched(model, query_responses, pad_token_id, context_length):
        if model is not reward_model:
            return get_reward(model, query_responses, pad_token_id, context_length)
        responses = []
        for row in query_responses:
            query, response = row[:context_length], row[context_length:]
            q_ids = query[query != pad_token_id].tolist()
            prompt = prompt_of_query[tuple(q_ids)]
            text = tokenizer.decode(response[response != pad_token_id].tolist(), skip_special_tokens=True)
            ids, _ = encode_prompt_response(tokenizer, prompt, text)
            if ids[: len(q_ids)] != q_ids:
                raise ValueError("the reward input's prompt ids differ from the policy's query ids")
            responses.append(ids[len(q_ids):])
        width = max(len(r) for r in responses)
        rebuilt = torch.full((len(responses), context_length + width), pad_token_id, dtype=query_responses.dtype,
                             device=query_responses.device)
        rebuilt[:, :context_length] = query_responses[:, :context_length]
        for i, r in enumerate(responses):
            rebuilt[i, context_length:context_length + len(r)] = torch.tensor(r, dtype=rebuilt.dtype)
        return get_reward(model, rebuilt, pad_token_id, context_length)

    return patched


def sequential_dataloader(dataloader_cls):
    """A DataLoader factory that ignores `shuffle=True`: the peer visits the data in the order given."""
    def make(*args, **kwargs):
        kwargs["shuffle"] = False
        return dataloader_cls(*args, **kwargs)

    return make

"""rlhfkit.rollout: batched sampling from a policy (KV cache, temperature, top-p, EOS stop).

`generate` is the one entry point every on-policy recipe, best-of-N and the evaluators use.
"""

from rlhfkit.rollout.generate import (
    Rollout,
    encode_prompts,
    generate,
    sample_next_token,
    top_p_filter,
)

__all__ = ["Rollout", "generate", "encode_prompts", "sample_next_token", "top_p_filter"]

"""rlhfkit.rollout: generation engines behind one interface, the typed rollout records, prompt sets.

An engine is a function ``generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0,
top_p=1.0, num_samples=1, batch_size=64, seed=None, max_prompt_length=None,
stop_token_ids=None) -> Rollout``; :data:`ENGINES` maps names to engines ("hf": the KV-cache
sampling loop in generate.py). Other engines register themselves in ENGINES under their name.
"""

from rlhfkit.errors import ConfigError
from rlhfkit.rollout.generate import encode_prompts, generate, sample_next_token, top_p_filter
from rlhfkit.rollout.record import Rollout, Trajectory, micro_batches, minibatches

ENGINES = {"hf": generate}

# the fast engines (issue 15): static KV cache + torch.compile, and colocated vLLM (docs/scale.md)
from rlhfkit.rollout import static as _static  # noqa: E402
from rlhfkit.rollout import vllm as _vllm  # noqa: E402

ENGINES["static"] = _static.generate_rollout
ENGINES["vllm"] = _vllm.generate_rollout


def get_engine(name: str):
    """The generation engine called `name`."""

    if name not in ENGINES:
        raise ConfigError(f"config field 'engine': unknown generation engine {name!r}; choose from {sorted(ENGINES)}")
    return ENGINES[name]


__all__ = ["ENGINES", "Rollout", "Trajectory", "encode_prompts", "generate", "get_engine", "micro_batches",
           "minibatches", "sample_next_token", "top_p_filter"]

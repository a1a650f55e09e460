"""The value model (critic) of PPO: a one-output sequence classifier read at every response token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfkit.logprobs import position_ids_from_mask
from rlhfkit.models import load_reward_model, load_tokenizer, resolve_path
from rlhfkit.models.io import adapter_base
from rlhfkit.models.reward import _head, member_paths, unwrap_hf


class TokenValues(nn.Module):
    """forward(input_ids, attention_mask, response_width) -> (B, R) per-token values.

    Wraps a one-output sequence-classification model; the head is applied to the hidden state
    *before* each response token, i.e. V(s_t) for the state that emits token t. A wrapper
    module rather than a subclass, so DDP can wrap it and sync gradients.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, response_width: int) -> torch.Tensor:
        hf = unwrap_hf(self.model)
        backbone = getattr(hf, hf.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        hidden = hidden[:, -response_width - 1:-1]
        return _head(hf)(hidden).squeeze(-1).float()


def value_model_source(value_model: str, policy: str, rewards: list[str], tokenizer: Any, log=print) -> str:
    """Where the critic starts: `value_model` if given, else the first `rm:` reward when it shares
    the policy's tokenizer (its head already reads the task), else the policy."""

    if value_model:
        return value_model
    rm_specs = [s[3:] for s in rewards if s.startswith("rm:")]
    if not rm_specs:
        return policy
    rm = Path(resolve_path(rm_specs[0]))
    if (rm / "ensemble.json").is_file():
        rm = member_paths(rm)[0]
    if not (rm / "config.json").is_file() and adapter_base(rm) is None:
        return policy
    if load_tokenizer(str(rm)).get_vocab() == tokenizer.get_vocab():
        return str(rm)
    log("ppo: the reward model's tokenizer differs from the policy's; the critic starts from the policy")
    return policy


def load_value_model(source: str, tokenizer: Any, dtype: str = "float32", **kwargs: Any) -> TokenValues:
    """The critic from a folder (a reward model or the policy: a fresh one-output head); `kwargs` go to
    load_reward_model (attn_implementation, gradient_checkpointing)."""

    critic = load_reward_model(source, dtype, **kwargs)
    critic.config.pad_token_id = tokenizer.pad_token_id
    return TokenValues(critic)

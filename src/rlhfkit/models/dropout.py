"""Dropout off for preference and RL training, as TRL does (`disable_dropout_in_model`).

With dropout on, the rollout-time log-probs and the first training forward see different
masks, so the first importance ratio is not 1 and the KL to an identical reference is not 0.
"""

from __future__ import annotations

from torch import nn


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability in `model` to 0: nn.Dropout modules, attention modules that
    read a float `attention_dropout` / `dropout` attribute, and the config's *dropout / *pdrop fields
    (so a saved model keeps the training setting out of the way of users)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model

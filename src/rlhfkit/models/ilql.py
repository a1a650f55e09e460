"""ILQL's value and Q heads on a causal LM, and the LM that decodes with them (rlhfkit.losses.ilql).

As in trlX (trlx/models/modeling_ilql.py): each head is an MLP hidden -> 2 * hidden -> out on the LM's
last hidden state; V has one output, each of the two Q heads one per vocabulary entry; the target Q
heads start as copies and follow the Q heads by Polyak averaging, target <- alpha * Q + (1 - alpha) *
target (`sync_targets`). The heads are saved beside the LM (its own save_pretrained folder) as
ilql_heads.safetensors with ilql_heads.json, so the folder still opens as a plain LM in transformers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhfkit.errors import ConfigError
from rlhfkit.losses.ilql import ilql_decoding_logits
from rlhfkit.models.io import load_policy

HEADS_FILE, HEADS_CONFIG = "ilql_heads.safetensors", "ilql_heads.json"


def _mlp(hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, out))


class ILQLHeads(nn.Module):
    """V head, Q heads and their target copies (no gradient) on hidden states (..., H)."""

    def __init__(self, hidden: int, vocab: int, two_qs: bool = True):
        super().__init__()
        self.hidden, self.vocab, self.two_qs = hidden, vocab, two_qs
        self.v_head = _mlp(hidden, 1)
        self.q_heads = nn.ModuleList(_mlp(hidden, vocab) for _ in range(2 if two_qs else 1))
        self.target_q_heads = copy.deepcopy(self.q_heads).requires_grad_(False)

    def forward(self, hidden: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """(Q of each head (..., V), target Q of each head (..., V), V (...))."""
        with torch.no_grad():
            targets = [h(hidden) for h in self.target_q_heads]
        return [h(hidden) for h in self.q_heads], targets, self.v_head(hidden).squeeze(-1)

    @torch.no_grad()
    def sync_targets(self, alpha: float) -> None:
        for target, q in zip(self.target_q_heads, self.q_heads):
            for t, p in zip(target.parameters(), q.parameters()):
                t.mul_(1.0 - alpha).add_(p.detach(), alpha=alpha)

    def save(self, folder: str | Path, beta: float = 1.0) -> None:
        """The heads' weights and shape, and the decoding `beta` load_ilql_policy uses by default."""
        folder = Path(folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, folder / HEADS_FILE)
        (folder / HEADS_CONFIG).write_text(json.dumps({"hidden": self.hidden, "vocab": self.vocab,
                                                       "two_qs": self.two_qs, "beta": beta}))

    @classmethod
    def load(cls, folder: str | Path) -> ILQLHeads:
        folder = Path(folder)
        if not (folder / HEADS_FILE).is_file():
            raise ConfigError(f"{folder} has no {HEADS_FILE}: not a model trained by `rlhfkit ilql`")
        meta = json.loads((folder / HEADS_CONFIG).read_text())
        heads = cls(meta["hidden"], meta["vocab"], meta["two_qs"])
        heads.load_state_dict(load_file(str(folder / HEADS_FILE)))
        return heads


class ILQLPolicy(nn.Module):
    """A causal LM whose logits follow ILQL's decoding rule: log pi_beta + beta * (min target Q - V).

    Its forward takes and returns what the LM's does (cache included), so rlhfkit's generation
    engine and evaluator use it as any policy. beta = 0 leaves the LM's distribution as it is."""

    def __init__(self, model: nn.Module, heads: ILQLHeads, beta: float = 1.0):
        super().__init__()
        self.model, self.heads, self.beta = model, heads, beta
        self.generation_config = getattr(model, "generation_config", None)
        self.config = model.config

    def forward(self, **kwargs):
        out = self.model(**kwargs, output_hidden_states=True)
        width = out.logits.shape[1]  # logits_to_keep may have kept only the last positions
        hidden = out.hidden_states[-1][:, -width:]
        with torch.no_grad():
            target_q = torch.stack([h(hidden) for h in self.heads.target_q_heads]).min(0).values
            values = self.heads.v_head(hidden).squeeze(-1)
        out.logits = ilql_decoding_logits(out.logits, target_q, values, self.beta)
        return out


def load_ilql_policy(folder: str | Path, beta: float | None = None, dtype: str = "float32") -> ILQLPolicy:
    """An ILQL-trained LM and its heads from one folder, decoding with `beta` (default: the training
    run's --beta, saved in ilql_heads.json)."""
    heads = ILQLHeads.load(folder)
    if beta is None:
        beta = float(json.loads((Path(folder) / HEADS_CONFIG).read_text()).get("beta", 1.0))
    return ILQLPolicy(load_policy(str(folder), dtype, trainable=False), heads, beta).eval()

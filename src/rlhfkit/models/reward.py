"""Reward models: last-token scoring, ensembles, stored normalisation, and a text-in scorer.

A reward model is an ``AutoModelForSequenceClassification`` (one output, or H outputs for
an ensemble of H heads on one backbone). Its score of a sequence is the head applied to the
hidden state of the last non-pad token, found from the attention mask rather than from the
pad token id, so a tokenizer whose pad token equals its EOS token scores correctly.

Every scored text is ``[BOS] prompt + response + EOS`` tokenised by :func:`encode_prompt_response`,
in training and in scoring alike, so the summarising token is always the EOS.

Saved layout (``output_dir/final``):

* one model: a Hugging Face folder; ``reward_stats.json`` beside the weights and the fields
  ``rlhfkit_reward_mean`` / ``rlhfkit_reward_std`` / ``rlhfkit_ensemble_heads`` in config.json;
* N models: ``ensemble.json`` listing ``member-0`` ... ``member-{N-1}``, each such a folder.

:class:`RewardScorer` loads either and turns (prompt, response) text into normalised scores,
re-tokenising with the reward model's own tokenizer (so a policy with another tokenizer works),
with the ensemble's spread as uncertainty and ``mean - k * std`` as a conservative reward
(Coste et al. 2024, "Reward model ensembles help mitigate overoptimization", sec. 3).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from rlhfkit.data import encode_prompt_completion
from rlhfkit.data.collate import pad_right  # noqa: F401  (re-exported)
from rlhfkit.errors import ConfigError
from rlhfkit.logprobs import position_ids_from_mask
from rlhfkit.models.io import (
    adapter_base,
    load_reward_model,
    load_tokenizer,
    max_positions,
    resolve_path,
)

STATS_FILE = "reward_stats.json"
ENSEMBLE_FILE = "ensemble.json"


# ---------------------------------------------------------------------------------------------
# tokenisation shared by training and scoring


def encode_prompt_response(tokenizer: Any, prompt: str, response: str,
                           max_length: int | None = None) -> tuple[list[int], bool]:
    """Token ids of [BOS] prompt + response + EOS; returns (ids, was_truncated).

    The data layer's encoder (``rlhfkit.data.encode_prompt_completion``), so reward models,
    DPO and SFT share one tokenisation and truncation rule: prompt and response tokenised
    separately (the boundary matches how a policy generated the response), the prompt cut
    from the left, the response from the right; nothing is dropped.
    """

    enc = encode_prompt_completion(tokenizer, prompt or "", response, max_length)
    return list(enc.input_ids), bool(enc.truncated)


# ---------------------------------------------------------------------------------------------
# scoring the last non-pad token


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row (right or left padding)."""
    t = attention_mask.shape[-1]
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    idx = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values
    if bool((idx < 0).any()):
        raise ValueError("a row of the batch has an all-zero attention mask (an empty sequence)")
    return idx


def unwrap_hf(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / accelerate / peft wrappers (LoRA layers stay injected)."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def _head(hf: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        head = getattr(hf, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ConfigError(f"{type(hf).__name__} has no 'score' or 'classifier' head; "
                      "load it with AutoModelForSequenceClassification")


class LastTokenReward(nn.Module):
    """forward(input_ids, attention_mask) -> (B, H) float32 rewards from the last real token.

    A thin module around a sequence-classification model (not a subclass of it), so DDP and
    accelerate can wrap it and gradients still synchronise. The head is applied to the B
    pooled states only, not to every position.

    With ``padding_free`` the real tokens of the batch are packed end to end into rows, with
    position ids restarting at each sequence, and no pad token is computed. transformers then
    builds a block-diagonal causal mask from the position ids (models using its
    ``create_causal_mask``, e.g. Llama, Mistral, Qwen2); the rewards are the padded ones to
    float precision, which :func:`padding_free_matches` checks on a batch. A packed row is as
    wide as the batch's longest sequence (``pack_tokens`` 0) or ``pack_tokens`` when that is
    wider: CPU attention does the whole masked row x row product, so one row holding every
    sequence would cost more attention than the padding it saves.
    """

    def __init__(self, model: nn.Module, padding_free: bool = False, pack_tokens: int = 0):
        super().__init__()
        self.model = model
        self.padding_free = padding_free
        self.pack_tokens = pack_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hf = unwrap_hf(self.model)
        backbone = getattr(hf, hf.base_model_prefix)
        if self.padding_free:
            # a packed row never runs past the model's learned positions (GPT-2's wpe table)

            budget = min(self.pack_tokens, max_positions(hf) or self.pack_tokens)
            pooled = _packed_last_hidden(backbone, input_ids, attention_mask, budget)
        else:
            # positions count real tokens, so a left-padded prompt scores as if unpadded
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
            idx = last_token_indices(attention_mask)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        return _head(hf)(pooled).float()


def _packed_last_hidden(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        budget: int) -> torch.Tensor:
    """Hidden state of each row's last real token, computed on packed rows without padding."""
    mask = attention_mask.bool()
    lens = mask.sum(1).tolist()
    if min(lens) == 0:
        raise ValueError("a row of the batch has an all-zero attention mask (an empty sequence)")
    groups = _first_fit_decreasing(lens, max(max(lens), budget))
    width = max(sum(lens[i] for i in g) for g in groups)
    dev = input_ids.device
    ids = torch.zeros((len(groups), width), dtype=input_ids.dtype, device=dev)
    pos = torch.zeros((len(groups), width), dtype=torch.long, device=dev)
    ends = [0] * len(lens)
    for g, rows in enumerate(groups):
        n = sum(lens[i] for i in rows)
        ids[g, :n] = input_ids[rows][mask[rows]]
        pos[g, :n] = torch.cat([torch.arange(lens[i], device=dev) for i in rows])
        # the tail restarts at position 0, so it is a separate (ignored) sequence in the mask
        pos[g, n:] = torch.arange(width - n, device=dev)
        at = g * width - 1
        for i in rows:
            at += lens[i]
            ends[i] = at
    hidden = backbone(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[torch.tensor(ends, device=dev)]


def _first_fit_decreasing(lens: list[int], width: int) -> list[list[int]]:
    """Row indices grouped into packed rows of at most `width` tokens, longest first (each
    row's indices in batch order)."""
    bins: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):
        for b in range(len(bins)):
            if used[b] + lens[i] <= width:
                bins[b].append(i)
                used[b] += lens[i]
                break
        else:
            bins.append([i])
            used.append(lens[i])
    return [sorted(b) for b in bins]


@torch.no_grad()
def padding_free_matches(module: LastTokenReward, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         rtol: float = 1e-4) -> bool:
    """Whether packed and padded forwards give the same rewards on this batch (the model's
    attention honours packed position ids)."""
    was, flag = module.training, module.padding_free
    module.eval()
    try:
        module.padding_free = False
        padded = module(input_ids, attention_mask)
        module.padding_free = True
        packed = module(input_ids, attention_mask)
    finally:
        module.padding_free = flag
        module.train(was)
    return bool(torch.allclose(packed, padded, rtol=rtol, atol=rtol * max(1.0, float(padded.abs().max()))))


def freeze_backbone(model: nn.Module) -> int:
    """Freeze everything but the score head; returns the number of trainable parameters left."""
    hf = unwrap_hf(model)
    head = _head(hf)
    head_ids = {id(p) for p in head.parameters()}
    for p in hf.parameters():
        p.requires_grad_(id(p) in head_ids)
    return sum(p.numel() for p in head.parameters())


@torch.no_grad()
def score_token_lists(module: LastTokenReward, seqs: Sequence[Sequence[int]], pad_id: int,
                      batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """Raw (unnormalised) rewards (N, H) of token lists, scored in length-sorted batches."""
    was_training = module.training
    module.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.zeros((len(seqs), _num_heads(module.model)), dtype=np.float64)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        ids, mask = pad_right([seqs[j] for j in chunk], pad_id)
        out[chunk] = module(ids.to(device), mask.to(device)).double().cpu().numpy()
    module.train(was_training)
    return out


def _num_heads(model: nn.Module) -> int:
    return int(getattr(unwrap_hf(model).config, "num_labels", 1))


# ---------------------------------------------------------------------------------------------
# normalisation statistics


def compute_stats(raw: np.ndarray, reference: str = "") -> dict:
    """Per-head mean/std of raw rewards (N, H) over a reference set (population std)."""
    raw = np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)
    if len(raw) < 2:
        raise ValueError("normalisation needs at least 2 reference responses")
    std = raw.std(axis=0)
    return {"mean": raw.mean(axis=0).tolist(), "std": np.where(std > 0, std, 1.0).tolist(),
            "count": len(raw), "reference": reference}


def attach_stats(model: nn.Module, stats: dict) -> dict[str, str]:
    """Write the stats into the model's config (saved in config.json) and return extra files."""
    cfg = unwrap_hf(model).config
    cfg.rlhfkit_reward_mean = stats["mean"]
    cfg.rlhfkit_reward_std = stats["std"]
    cfg.rlhfkit_ensemble_heads = len(stats["mean"])
    return {STATS_FILE: json.dumps(stats, indent=2) + "\n"}


def read_stats(path: str | Path, config: Any = None) -> dict | None:
    """Stats saved with a model: reward_stats.json, else the config.json fields, else None."""
    f = Path(path) / STATS_FILE
    if f.is_file():
        return json.loads(f.read_text())
    if config is not None and getattr(config, "rlhfkit_reward_mean", None) is not None:
        return {"mean": list(np.atleast_1d(config.rlhfkit_reward_mean)),
                "std": list(np.atleast_1d(config.rlhfkit_reward_std))}
    return None


def normalise(raw: np.ndarray, stats: dict | None) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.float64)
    if stats is None:
        return raw
    return (raw - np.asarray(stats["mean"])) / np.asarray(stats["std"])


# ---------------------------------------------------------------------------------------------
# ensembles


def combine(scores: np.ndarray, k: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, mean - k * std) over the last axis (members x heads), population std."""
    scores = np.asarray(scores, dtype=np.float64)
    mean = scores.mean(axis=-1)
    std = scores.std(axis=-1) if scores.shape[-1] > 1 else np.zeros_like(mean)
    return mean, std, mean - k * std


def member_paths(path: str | Path) -> list[Path]:
    """The model folders behind `path`: the members of an ensemble, or `path` itself."""
    path = Path(path)
    manifest = path / ENSEMBLE_FILE
    if manifest.is_file():
        members = json.loads(manifest.read_text()).get("members") or []
        if not members:
            raise ConfigError(f"{manifest}: 'members' is empty")
        return [path / m for m in members]
    return [path]


def write_ensemble_manifest(path: str | Path, members: list[str], info: dict | None = None) -> dict[str, str]:
    """The extra file content of an ensemble folder (written by the caller atomically)."""
    return {ENSEMBLE_FILE: json.dumps({"members": members, "kind": "models", **(info or {})}, indent=2) + "\n"}


class RewardScorer:
    """Score (prompt, response) text with a saved reward model or ensemble.

    ``score(prompts, responses)`` returns the normalised reward (the ensemble mean, minus
    ``conservative_k`` standard deviations when that is > 0), so it fits the Judge protocol.
    ``score_with_uncertainty`` returns (mean, std). Texts are re-tokenised with the reward
    model's tokenizer, so the policy may use a different one.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 64,
                 max_length: int | None = 512, normalize: bool = True, conservative_k: float = 0.0,
                 dtype: str = "float32"):
        root = Path(resolve_path(str(path)))
        self.paths = member_paths(root)
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.conservative_k = conservative_k
        self.members, self.stats, self.tokenizers = [], [], []
        for p in self.paths:
            base = adapter_base(p)  # a LoRA reward model saved as a peft adapter (merge_lora false)
            if not (p / "config.json").is_file() and base is None:
                raise ConfigError(f"{p} is not a saved model folder (no config.json, no adapter_config.json)")
            model = load_reward_model(str(p), dtype=dtype, num_labels=_saved_num_labels(p))
            self.members.append(LastTokenReward(model).to(device).eval())
            self.stats.append(read_stats(p, model.config) if normalize else None)
            self.tokenizers.append(load_tokenizer(str(p)))  # an adapter without one: its base's
        self.truncated = 0

    @property
    def num_scores(self) -> int:
        return sum(_num_heads(m.model) for m in self.members)

    def raw_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[np.ndarray]:
        """Unnormalised (N, H) rewards of each member."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out = []
        for member, tok in zip(self.members, self.tokenizers):
            seqs = []
            for p, r in zip(prompts, responses):
                ids, cut = encode_prompt_response(tok, p, r, self.max_length)
                self.truncated += int(cut)
                seqs.append(ids)
            out.append(score_token_lists(member, seqs, tok.pad_token_id, self.batch_size, self.device))
        return out

    def all_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Normalised scores (N, members x heads)."""
        raw = self.raw_scores(prompts, responses)
        return np.concatenate([normalise(r, s) for r, s in zip(raw, self.stats)], axis=1)

    def score_with_uncertainty(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        mean, std, _ = combine(self.all_scores(prompts, responses))
        return mean, std

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        _, _, conservative = combine(self.all_scores(prompts, responses), self.conservative_k)
        return conservative

    __call__ = score


def _saved_num_labels(path: Path) -> int:
    """Outputs of a saved model: our own field, else id2label; transformers omits id2label when
    there are 2 labels (its default), and a causal LM folder gets a fresh one-output head. A peft
    adapter has no config.json: its saved score head's rows are the outputs."""
    if not (path / "config.json").is_file():
        return _adapter_num_labels(path)
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("rlhfkit_ensemble_heads"):
        return int(cfg["rlhfkit_ensemble_heads"])
    if cfg.get("id2label"):
        return len(cfg["id2label"])
    is_classifier = any("ForSequenceClassification" in a for a in cfg.get("architectures") or [])
    return 2 if is_classifier else 1


def _adapter_num_labels(path: Path) -> int:
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                if key.endswith(("score.weight", "classifier.weight")):
                    return int(f.get_slice(key).get_shape()[0])
    stats = read_stats(path)
    return len(stats["mean"]) if stats else 1


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


__all__ = [
    "ENSEMBLE_FILE",
    "STATS_FILE",
    "LastTokenReward",
    "RewardScorer",
    "attach_stats",
    "combine",
    "compute_stats",
    "encode_prompt_response",
    "freeze_backbone",
    "last_token_indices",
    "member_paths",
    "normalise",
    "pad_right",
    "padding_free_matches",
    "read_stats",
    "score_token_lists",
    "unwrap_hf",
    "sigmoid",
    "write_ensemble_manifest",
]

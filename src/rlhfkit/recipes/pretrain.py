"""Pretrain a small Llama-architecture causal LM from scratch on a text corpus.

The bundled base model is made by one command from the committed config:

    rlhfkit pretrain --config configs/pretrain_kindly.yaml

Text lines are tokenised, joined with EOS and cut into blocks of `block_size` tokens
(GPT-style concatenation); every token is a target except the tokenizer's unknown token (a
word the vocabulary lacks: a model taught to predict it would write it, and it decodes to
nothing). Held-out perplexity is reported on the corpus's eval split, and a few samples are
printed so a person can check they are English.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from rlhfkit.config import TrainArgs, require
from rlhfkit.errors import ConfigError
from rlhfkit.models import load_tokenizer, save_model, tiny_llama
from rlhfkit.recipes.sft import ignore_unknown, train_causal_lm
from rlhfkit.tasks import kindly
from rlhfkit.train.accelerator import make_accelerator
from rlhfkit.train.memory import count_parameters
from rlhfkit.train.runs import atomic_write_json, one_run_per_folder, prepare_run_dir


@dataclasses.dataclass
class Config(TrainArgs):
    corpus: str = "kindly"
    """Text corpus: 'kindly' (the bundled one) or a UTF-8 text file with one document per line."""
    eval_corpus: str = ""
    """Held-out text file (default: the bundled eval split when corpus is 'kindly', else the last 2% of lines)."""
    tokenizer: str = "kindly:tokenizer"
    """Tokenizer folder or hub name."""
    hidden_size: int = 192
    """Model width."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    intermediate_size: int = 512
    """MLP inner width."""
    block_size: int = 64
    """Tokens per training row."""
    export_to: str = ""
    """Also copy the final model here (e.g. src/rlhfkit/tasks/kindly/base to ship it)."""
    num_samples: int = 5
    """Samples printed (and saved) after training."""

    def __post_init__(self) -> None:
        self._check_train_args()
        require(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        require(self.block_size >= 8, "block_size", "must be >= 8")


def read_lines(corpus: str, split: str) -> list[str]:
    if corpus == "kindly":
        return list(kindly.corpus_lines(split))
    path = Path(corpus)
    if not path.is_file():
        raise ConfigError(f"config field 'corpus': {corpus} is not a file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    cut = max(1, len(lines) * 98 // 100)
    return lines[:cut] if split == "train" else lines[cut:]


def make_blocks(lines: list[str], tokenizer, block_size: int) -> list[dict]:
    """Concatenate tokenised lines with EOS separators and cut into full blocks."""
    ids: list[int] = []
    for enc in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    blocks = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for i in range(0, len(ids) - block_size + 1, block_size):
        chunk = ids[i:i + block_size]
        blocks.append({"input_ids": chunk, "labels": ignore_unknown(chunk, unk), "attention_mask": [1] * block_size})
    return blocks


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, seed: int = 0) -> list[str]:
    model.eval()
    out = []
    g = torch.Generator().manual_seed(seed)
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids).logits[:, -1]
            nxt = torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=g)
            if nxt.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, nxt], dim=1)
        out.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    return out


@one_run_per_folder
def main(cfg: Config) -> dict:
    accelerator = make_accelerator(cfg)
    out = prepare_run_dir(cfg.output_dir, cfg, accelerator.is_main_process)
    tokenizer = load_tokenizer(cfg.tokenizer)
    model = tiny_llama(len(tokenizer), cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size,
                       max_position_embeddings=max(256, cfg.block_size), seed=cfg.seed, tokenizer=tokenizer)
    train = make_blocks(read_lines(cfg.corpus, "train"), tokenizer, cfg.block_size)
    eval_lines = read_lines(cfg.eval_corpus, "train") if cfg.eval_corpus else read_lines(cfg.corpus, "eval")
    held_out = make_blocks(eval_lines, tokenizer, cfg.block_size)
    accelerator.print(f"pretrain: {count_parameters(model):,} parameters, {len(train)} blocks of {cfg.block_size} tokens, "
                      f"{len(held_out)} held-out blocks")
    result = train_causal_lm(cfg, model, tokenizer, train, held_out, accelerator, out)
    result["parameters"] = count_parameters(model)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model) if hasattr(accelerator, "unwrap_model") else model
        starts = [" ".join(line.split()[:3]) for line in eval_lines[: cfg.num_samples]]
        samples = sample_texts(model, tokenizer, starts, seed=cfg.seed)
        result["samples"] = samples
        accelerator.print(f"held-out perplexity: {result.get('eval_ppl', float('nan')):.2f}")
        for s in samples:
            accelerator.print(f"  sample: {s}")
        atomic_write_json(out / "results.json", result)
        if cfg.export_to:
            save_model(model, tokenizer, cfg.export_to, extra_files={"pretrain_results.json": _json(result)})
            accelerator.print(f"exported the base model to {cfg.export_to}")
    return result


def _json(obj) -> str:
    return json.dumps(obj, indent=2, default=float)

"""Tiny Llama-architecture models built from config, for the bundled task, tests and benchmarks."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification


def tiny_llama_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                      intermediate_size: int = 512, max_position_embeddings: int = 256,
                      tokenizer=None, tie_word_embeddings: bool = True, **extra) -> LlamaConfig:
    """A LlamaConfig of the given size; special-token ids come from `tokenizer` when given."""
    ids = {}
    if tokenizer is not None:
        vocab_size = max(vocab_size, len(tokenizer))
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **ids,
        **extra,
    )


def tiny_llama(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
               intermediate_size: int = 512, max_position_embeddings: int = 256, seed: int = 0,
               tokenizer=None, **extra) -> LlamaForCausalLM:
    """A freshly initialised LlamaForCausalLM (deterministic for a given seed)."""
    cfg = tiny_llama_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
                            max_position_embeddings, tokenizer, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def tiny_reward_model(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                      intermediate_size: int = 512, max_position_embeddings: int = 256, seed: int = 0,
                      tokenizer=None, **extra) -> LlamaForSequenceClassification:
    """A freshly initialised one-output LlamaForSequenceClassification (a reward or value model)."""
    cfg = tiny_llama_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
                            max_position_embeddings, tokenizer, num_labels=1, **extra)
    if cfg.pad_token_id is None:
        cfg.pad_token_id = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(cfg)

"""Memory estimate against a hand count."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from rlhfkit.errors import ConfigError
from rlhfkit.train.memory import (
    GiB,
    MemoryEstimate,
    ModelShape,
    check_fits,
    count_parameters,
    estimate,
    llama_param_count,
)

CFG = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128, tie_word_embeddings=True)
# by hand: embedding 100*64 = 6400; per layer q,o 2*64*64 = 8192, k,v 2*64*32 = 4096,
# MLP 3*64*128 = 24576, two norms 128 -> 36992; 2 layers 73984; final norm 64
HAND_PARAMS = 6400 + 2 * 36992 + 64


def test_parameter_count_matches_hand_and_transformers():
    config = LlamaConfig(**CFG)
    assert llama_param_count(config) == HAND_PARAMS == 80448
    assert count_parameters(LlamaForCausalLM(config)) == HAND_PARAMS
    untied = LlamaConfig(**{**CFG, "tie_word_embeddings": False})
    assert llama_param_count(untied) == HAND_PARAMS + 6400 == count_parameters(LlamaForCausalLM(untied))


def test_fp32_adamw_by_hand():
    shape = ModelShape.from_config(LlamaConfig(**CFG))
    assert (shape.kv_heads, shape.head_dim) == (2, 16)
    est = estimate(shape, batch=2, seq_len=10, rollout_batch=3, rollout_len=20)
    assert est.weights == 80448 * 4 == 321792
    assert est.gradients == 321792
    assert est.optimizer == 80448 * 8  # two fp32 moments
    # per layer s*b*h*34 bytes at 2-byte activations, x2 for fp32: 10*2*64*34*2 = 87040; logits 2*b*s*V*4
    assert est.activations == 2 * 87040 + 2 * 2 * 10 * 100 * 4
    # K and V, 2 layers, 2 kv heads of 16, 20 positions, 3 rows, 4 bytes
    assert est.kv_cache == 2 * 2 * 2 * 16 * 20 * 3 * 4 == 30720
    assert est.total == 321792 * 2 + 643584 + 190080 + 30720


def test_eager_attention_and_checkpointing_by_hand():
    shape = ModelShape.from_config(LlamaConfig(**CFG))
    eager = estimate(shape, batch=2, seq_len=10, attn_implementation="eager")
    # + 5*a*s/h = 5*4*10/64 = 3.125 per s*b*h: 10*2*64*37.125*2 = 95040 per layer
    assert eager.activations == 2 * 95040 + 16000
    ckpt = estimate(shape, batch=2, seq_len=10, gradient_checkpointing=True)
    # each layer's input (2*s*b*h bytes at 2 bytes, x2 in fp32) + one full layer during recompute
    assert ckpt.activations == 2 * (2 * 10 * 2 * 64 * 2) + 87040 + 16000


def test_pure_bf16_8bit_sharded_by_hand():
    shape = ModelShape.from_config(LlamaConfig(**CFG))
    est = estimate(shape, weight_dtype="bfloat16", optimizer="adamw_8bit", shards=4, batch=1, seq_len=8,
                   frozen_params=1000)
    assert est.weights == 80448 * 2 // 4
    assert est.gradients == 80448 * 2 // 4
    assert est.optimizer == 80448 * (2 * 1 + 4) // 4  # 8-bit moments + fp32 master
    assert est.frozen_models == 1000 * 2 // 4
    zero2 = estimate(shape, weight_dtype="bfloat16", shards=4, zero_stage=2, batch=1, seq_len=8)
    assert zero2.weights == 80448 * 2  # ZeRO-2 keeps whole weights on every device
    assert zero2.optimizer == 80448 * (8 + 4) // 4


def test_refuses_with_what_to_change():
    big = MemoryEstimate(weights=14 * GiB, gradients=14 * GiB, optimizer=56 * GiB, activations=30 * GiB,
                         kv_cache=0, frozen_models=0)
    check_fits(big, None, gradient_checkpointing=False, optimizer="adamw", use_lora=False, batch=8, shards=1)
    with pytest.raises(ConfigError) as e:
        check_fits(big, 80 * GiB, gradient_checkpointing=False, optimizer="adamw", use_lora=False, batch=8,
                   shards=1)
    msg = str(e.value)
    assert "114.0 GiB" in msg and "80.0 GiB" in msg
    for tip in ("gradient_checkpointing: true", "use_lora: true", "adamw_8bit", "fsdp2_8gpu.yaml"):
        assert tip in msg
    check_fits(big, 200 * GiB, gradient_checkpointing=False, optimizer="adamw", use_lora=False, batch=8, shards=1)

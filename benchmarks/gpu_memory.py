"""The largest Llama-shaped model for which one PPO step and one GRPO step fit on this GPU.

A step is measured, not estimated: the models are built on the GPU in bf16 and one step runs
(generation with a KV cache, then the training forward/backward and an optimiser step), under
four settings: full fine-tuning or LoRA (r 16, all linear layers), each with and without
gradient checkpointing.

* PPO: policy (trained), critic (trained, same shape with a scalar head), reference and reward
  model (frozen, same shape), 16 rows x (128 prompt + 256 response) tokens.
* GRPO: policy (trained), reference and reward model (frozen), 16 rows of the same length.

Sizes searched: Llama shapes with hidden 1024 .. 8192 (layers and FFN scaled as in the Llama
family). The result is the largest size whose step ran without CUDA out-of-memory, with its
peak allocated memory and the rlhfkit.train.memory estimate beside it.

On a machine without CUDA it prints one line and exits 0 (nothing measured, no file written).
"""

from __future__ import annotations

import copy
import gc

import torch

from benchmarks.common import cuda_or_say_why

ROWS, PROMPT, RESPONSE = 16, 128, 256
# (hidden, layers, heads, kv heads, ffn): Llama-family shapes from ~0.5B to ~30B parameters
SHAPES = [(1024, 16, 16, 8, 2816), (2048, 16, 16, 8, 5632), (2048, 24, 16, 8, 5632), (3072, 28, 24, 8, 8192),
          (4096, 32, 32, 8, 11008), (5120, 40, 40, 8, 13824), (6656, 60, 52, 8, 17920)]


def _config(shape, vocab: int = 32000):
    from transformers import LlamaConfig

    h, layers, heads, kv, ffn = shape
    return LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=ffn, max_position_embeddings=PROMPT + RESPONSE,
                       tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def one_step(cfg, algo: str, lora: bool, checkpointing: bool, device) -> int:
    """Run one step; return the peak allocated bytes (raises torch.cuda.OutOfMemoryError)."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from rlhfkit.rollout import static
    from rlhfkit.train.savers import enable_gradient_checkpointing

    torch.cuda.reset_peak_memory_stats(device)
    head_cfg = copy.deepcopy(cfg)
    head_cfg.num_labels = 1  # a scalar head for the reward and value models
    with torch.device(device):
        policy = LlamaForCausalLM(cfg).to(torch.bfloat16)
        frozen = [LlamaForCausalLM(cfg).to(torch.bfloat16).eval(),
                  LlamaForSequenceClassification(head_cfg).to(torch.bfloat16).eval()]
        critic = LlamaForSequenceClassification(head_cfg).to(torch.bfloat16) if algo == "ppo" else None
    trained = [m for m in (policy, critic) if m is not None]
    if lora:
        from peft import LoraConfig, get_peft_model

        trained = [get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")) for m in trained]
    if checkpointing:
        for m in trained:
            enable_gradient_checkpointing(m)
    for m in frozen:
        m.requires_grad_(False)
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    from rlhfkit.train.optim import MasterWeightOptimizer

    opt = MasterWeightOptimizer(params, torch.optim.AdamW, lr=1e-6)
    prompts = torch.randint(3, cfg.vocab_size, (ROWS, PROMPT), device=device)
    resp, _, _ = static.generate(trained[0], prompts, torch.ones_like(prompts), RESPONSE, 1.0, 1.0, [-1], 0,
                                 compile=False)
    seq = torch.cat([prompts, resp], 1)
    with torch.no_grad():
        for m in frozen:
            m(input_ids=seq)
    for m in trained:
        m.train()
        out = m(input_ids=seq)
        (out.logits.float().mean()).backward()
    opt.step()
    peak = torch.cuda.max_memory_allocated(device)
    del policy, frozen, critic, trained, opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def run(quick: bool = False) -> dict | None:
    if not cuda_or_say_why("gpu_memory"):
        return None
    device = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(device)
    shapes = SHAPES[:3] if quick else SHAPES
    results = {}
    for algo in ("ppo", "grpo"):
        for lora in (False, True):
            for ckpt in (False, True):
                key = f"{algo}{'_lora' if lora else ''}{'_checkpointing' if ckpt else ''}"
                largest = None
                for shape in shapes:
                    cfg = _config(shape)
                    try:
                        peak = one_step(cfg, algo, lora, ckpt, device)
                    except torch.cuda.OutOfMemoryError:
                        gc.collect()
                        torch.cuda.empty_cache()
                        break
                    from rlhfkit.train.memory import llama_param_count

                    largest = {"shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "ffn"), shape)),
                               "parameters": llama_param_count(cfg), "peak_gib": round(peak / 2**30, 2)}
                results[key] = largest
    return {
        "metric": "largest_model_one_step",
        "device": torch.cuda.get_device_name(device),
        "device_memory_gib": round(total / 2**30, 1),
        "results": results,
        "workload": {"rows": ROWS, "prompt_tokens": PROMPT, "response_tokens": RESPONSE, "dtype": "bfloat16",
                     "optimizer": "AdamW with fp32 master weights (rlhfkit.train.optim.MasterWeightOptimizer)"},
    }

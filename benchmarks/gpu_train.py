"""Training step time and MFU on a GPU, side by side with TRL on the identical workload.

Model: the Qwen2.5-0.5B-shaped Llama of gpu_rollout (random weights, bf16 autocast, sdpa).
SFT: 2048-token-free rows of 512 tokens, batch 8, rlhfkit's loop vs TRL's SFTTrainer, the same
initial weights and batches in the same order (TRL samples sequentially over the rows put in
rlhfkit's epoch order), each side's first and last loss recorded; the ratio is given only when
the first-step losses agree to 1e-4 relative (benchmarks.common.paired_comparison).

MFU = tokens/s x 6N / (measured bf16 matmul peak), N the matmul weights per token (decoder
linears + LM head), the peak from an 8192^3 bf16 matmul on the same device. Target: >= 40%.

DPO: preference pairs from the bundled task (dpo_speed's pairs), batch 8 pairs, sigmoid loss,
beta 0.1, the reference log-probs precomputed once by both sides inside the timed region;
`dpo.main` vs TRL's DPOTrainer (trl samples sequentially over the pairs in rlhfkit's order).
The first DPO loss is ln 2 on both sides (policy == reference). Counted FLOPs: 6N per trained
token plus 2N per token for the reference pass.

GRPO: 8 prompts x 8 generations a step, up to 256 new tokens, beta 0.04 (a reference forward),
token-level loss, one pass per batch, a same-shaped one-output reward model; both sides timed
from the saved folders to the saved policy (`grpo.main` vs loading, building the trainer,
`GRPOTrainer.train()` and `save_model()`). The policy first gets a short SFT on the bundled task
(benchmarks.equal_work.warm_start) so responses end with EOS at varied lengths; TRL visits the
prompts in rlhfkit's order, samples with rlhfkit's noise for the same seed and its reward model
reads rlhfkit's token ids (benchmarks/equal_work.py), so the first losses agree when the two
sides did the same computation. MFU counts only the training forward/backward (6N per
prompt+completion token), not generation, so it is a lower bound.

`measure()` takes any config and device: the test smoke-runs every path on CPU with a tiny
Llama, so the code a GPU run takes is exercised without one.

On a machine without CUDA it prints one line and exits 0 (nothing measured, no file written).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    SPEED_TOKENIZER,
    cuda_or_say_why,
    load_average,
    measure_matmul_peak,
    paired_comparison,
    peer_available,
    qwen05b_config,
)

SEQ_LEN, BATCH, LR = 512, 8, 1e-5
DPO_BATCH, DPO_MAX_LEN, DPO_BETA = 8, 512, 0.1
G_PROMPTS, G_GENERATIONS, G_NEW_TOKENS, G_BETA = 8, 8, 256, 0.04


def matmul_params(model) -> int:
    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    return n + model.config.vocab_size * model.config.hidden_size


def fresh_model(cfg):
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)


def rows(cfg, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, cfg.vocab_size, (n, SEQ_LEN), generator=g).tolist()


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sft_ours(cfg, tokenizer, data) -> dict:
    from rlhfkit.recipes import sft
    from rlhfkit.train.accelerator import make_accelerator

    losses: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        c = sft.Config(model="unused", output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=1.0, learning_rate=LR,
                       logging_steps=10**9, report_to="none", progress=False, seed=0, bf16=_cuda())
        examples = [{"input_ids": r, "labels": list(r), "attention_mask": [1] * len(r)} for r in data]
        acc = make_accelerator(c)
        model = fresh_model(cfg)
        _sync()
        t0 = time.perf_counter()
        sft.train_causal_lm(c, model, tokenizer, examples, [], acc, Path(d), on_step=lambda s, m: losses.append(m["loss"]))
        _sync()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}


def sft_trl(cfg, tokenizer, data) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as d:
        args = SFTConfig(output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                         lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, logging_strategy="steps",
                         logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", bf16=_cuda(), use_cpu=not _cuda(),
                         max_length=SEQ_LEN, packing=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                         train_sampling_strategy="sequential", gradient_checkpointing=False)
        trainer = SFTTrainer(model=fresh_model(cfg), args=args, train_dataset=Dataset.from_dict({"input_ids": data}),
                             processing_class=tokenizer)
        _sync()
        t0 = time.perf_counter()
        trainer.train()
        _sync()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}


def save_policy(cfg, tokenizer, root: Path, warm_steps: int = 0, warm_lr: float = 1e-3) -> tuple[str, str]:
    """The same initial policy (after `warm_steps` SFT steps) and reward model (a one-output
    classifier of that shape) for both sides."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from benchmarks.equal_work import warm_start
    from rlhfkit.models import save_model

    policy = fresh_model(cfg)
    if warm_steps:
        warm_start(policy, tokenizer, steps=warm_steps, lr=warm_lr)
    save_model(policy.cpu(), tokenizer, root / "policy")
    rm_cfg = LlamaConfig(**{**cfg.to_dict(), "num_labels": 1})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        save_model(LlamaForSequenceClassification(rm_cfg), tokenizer, root / "rm")
    return str(root / "policy"), str(root / "rm")


def dpo_ours(model_dir: str, data: str) -> dict:
    from rlhfkit.recipes import dpo
    from rlhfkit.train.runs import read_metrics

    with tempfile.TemporaryDirectory() as d:
        c = dpo.Config(model=model_dir, dataset=data, output_dir=d, ref_cache_dir=str(Path(d) / "cache"), loss="sigmoid",
                       beta=DPO_BETA, per_device_train_batch_size=DPO_BATCH, num_train_epochs=1.0, learning_rate=LR,
                       lr_scheduler_type="constant", max_grad_norm=1.0, max_length=DPO_MAX_LEN, logging_steps=1,
                       report_to="jsonl", progress=False, seed=0, bf16=_cuda())
        _sync()
        t0 = time.perf_counter()
        dpo.main(c)
        _sync()
        seconds = time.perf_counter() - t0
        losses = [r["loss"] for r in read_metrics(d) if "loss" in r]
    return {"seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}


def dpo_trl(model_dir: str, tokenizer, pairs) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(output_dir=d, per_device_train_batch_size=DPO_BATCH, num_train_epochs=1, learning_rate=LR,
                         lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                         beta=DPO_BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                         precompute_ref_batch_size=2 * DPO_BATCH, max_length=DPO_MAX_LEN, logging_strategy="steps",
                         logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
                         use_cpu=not _cuda(), bf16=_cuda(), dataloader_num_workers=0, seed=0, disable_tqdm=True,
                         train_sampling_strategy="sequential", gradient_checkpointing=False)
        # rlhfkit puts a BOS before the prompt; TRL does not for this tokenizer (as in dpo_speed)
        ds = Dataset.from_list([{**p, "prompt": tokenizer.bos_token + p["prompt"]} for p in pairs])
        _sync()
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=ds,
                             processing_class=tokenizer)
        trainer.train()
        _sync()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}


def grpo_ours(policy: str, rm: str, prompts: str, steps: int) -> dict:
    from rlhfkit.recipes import grpo
    from rlhfkit.train.runs import read_metrics

    with tempfile.TemporaryDirectory() as d:
        c = grpo.Config(model=policy, reward_model=rm, prompts=prompts, eval_prompts="", output_dir=d, max_steps=steps,
                        prompts_per_step=G_PROMPTS, num_generations=G_GENERATIONS,
                        per_device_train_batch_size=G_PROMPTS * G_GENERATIONS,
                        generation_batch_size=G_PROMPTS * G_GENERATIONS, num_mini_batches=1, num_ppo_epochs=1,
                        max_completion_length=G_NEW_TOKENS, beta=G_BETA, loss_type="token", learning_rate=1e-6,
                        report_to="jsonl", sample_every=0, seed=0, eval_reward="none", hacking_window=0, bf16=_cuda())
        _sync()
        t0 = time.perf_counter()
        grpo.main(c)
        _sync()
        seconds = time.perf_counter() - t0
        rows = [r for r in read_metrics(d) if "response_length" in r]
    key = next((k for k in ("policy_loss", "loss/policy", "loss") if any(k in r for r in rows)), None)
    losses = [r[key] for r in rows if key in r] if key else []
    return {"seconds": seconds, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "mean_completion_tokens": sum(r["response_length"] for r in rows) / max(len(rows), 1)}


def grpo_trl(policy: str, rm: str, prompts: list[str], steps: int) -> dict:
    """`prompts` in the order rlhfkit visits them (visited in sequence here)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.equal_work import (
        rlhfkit_reward_encoding,
        shared_sampling_noise,
    )
    from rlhfkit.models import load_tokenizer
    from rlhfkit.rollout.prompts import rollout_seed

    with tempfile.TemporaryDirectory() as d:
        _sync()
        t0 = time.perf_counter()
        tok = load_tokenizer(policy, padding_side="left")
        # rlhfkit puts the BOS before a prompt; TRL tokenises the bare text, so it is written out
        bos = tok.bos_token if tok.bos_token_id is not None and tok("x").input_ids[:1] != [tok.bos_token_id] else ""
        prompts = [bos + p for p in prompts]
        args = GRPOConfig(output_dir=d, per_device_train_batch_size=G_PROMPTS * G_GENERATIONS,
                          gradient_accumulation_steps=1, num_generations=G_GENERATIONS,
                          max_completion_length=G_NEW_TOKENS, max_steps=steps, num_iterations=1, beta=G_BETA,
                          loss_type="dapo", learning_rate=1e-6, temperature=1.0, gradient_checkpointing=False,
                          report_to="none", save_strategy="no", logging_strategy="steps", logging_steps=1,
                          use_cpu=not _cuda(), bf16=_cuda(), seed=0, dataloader_num_workers=0, disable_tqdm=True,
                          shuffle_dataset=False)
        model = AutoModelForCausalLM.from_pretrained(policy)
        shared_sampling_noise(model, lambda i: rollout_seed(0, i))
        trainer = GRPOTrainer(model=model, reward_funcs=AutoModelForSequenceClassification.from_pretrained(rm),
                              args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                              reward_processing_classes=rlhfkit_reward_encoding(load_tokenizer(rm), prompts, bos))
        trainer.train()
        trainer.save_model(str(Path(d) / "final"))
        _sync()
        seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    lengths = [h["completions/mean_length"] for h in logs if "completions/mean_length" in h]
    return {"seconds": seconds, "loss_first": logs[0]["loss"] if logs else None,
            "loss_last": logs[-1]["loss"] if logs else None,
            "mean_completion_tokens": sum(lengths) / len(lengths) if lengths else None}


def _mfu(cmp: dict, flops_per_run: dict, peak: float) -> dict:
    """Each side's FLOPs (per run) over its median seconds and the peak."""
    out = {}
    for side in ("ours", "peer"):
        runs = cmp[f"{side}_side"]
        if runs and flops_per_run.get(side):
            out[side] = round(flops_per_run[side] / runs["seconds"] / peak, 4)
    return out


def measure(cfg, peak: float, quick: bool = False, repeats: int = 3, sizes: dict | None = None) -> dict:
    """SFT, DPO and GRPO on both sides for `cfg` on the current device (CUDA when there is one)."""
    import json

    from benchmarks.dpo_speed import make_pairs
    from rlhfkit.data.preference import encode_preferences
    from rlhfkit.models import load_tokenizer
    from rlhfkit.rollout.prompts import prompts_for_step
    from rlhfkit.tasks import kindly
    from rlhfkit.train.batches import epoch_order

    sizes = {"sft_rows": 64 if quick else 256, "dpo_pairs": 64 if quick else 256, "grpo_steps": 2 if quick else 5,
             **(sizes or {})}
    tokenizer = load_tokenizer(SPEED_TOKENIZER)
    has_trl = peer_available("trl")
    n_mm = matmul_params(fresh_model(cfg))
    out = {}

    n = sizes["sft_rows"]
    data = rows(cfg, n)
    peer_data = [data[i] for i in epoch_order(n, 0, 0)]
    ours, peer = [], []
    for _ in range(repeats):
        ours.append(sft_ours(cfg, tokenizer, data))
        if has_trl:
            peer.append(sft_trl(cfg, tokenizer, peer_data))
    cmp = paired_comparison(ours, peer, work=n * SEQ_LEN)
    flops = 6 * n_mm * n * SEQ_LEN
    out["sft"] = {**cmp, "mfu": _mfu(cmp, {"ours": flops, "peer": flops}, peak), "tokens": n * SEQ_LEN}

    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        policy, rm = save_policy(cfg, tokenizer, root, warm_steps=sizes.get("warm_steps", 20),
                                 warm_lr=sizes.get("warm_lr", 1e-3))
        pairs = make_pairs(sizes["dpo_pairs"])
        (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        enc = encode_preferences([(p["prompt"], p["chosen"], p["rejected"]) for p in pairs], None, tokenizer,
                                 DPO_MAX_LEN)
        tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in enc.rows)
        peer_pairs = [pairs[i] for i in epoch_order(len(pairs), 0, 0)]
        ours, peer = [], []
        for _ in range(repeats):
            ours.append(dpo_ours(policy, str(root / "pairs.jsonl")))
            if has_trl:
                peer.append(dpo_trl(policy, tokenizer, peer_pairs))
        cmp = paired_comparison(ours, peer, work=tokens)
        flops = 8 * n_mm * tokens  # 6N training + 2N reference precompute per token
        out["dpo"] = {**cmp, "mfu": _mfu(cmp, {"ours": flops, "peer": flops}, peak), "tokens": tokens}

        steps = sizes["grpo_steps"]
        prompts = kindly.prompts("train")[: steps * G_PROMPTS]
        (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        peer_prompts = [prompts[i] for step in range(steps) for i in prompts_for_step(len(prompts), step, G_PROMPTS, 0)]
        prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts) * G_GENERATIONS
        ours, peer = [], []
        for _ in range(repeats):
            ours.append(grpo_ours(policy, rm, str(root / "prompts.jsonl"), steps))
            if has_trl:
                peer.append(grpo_trl(policy, rm, peer_prompts, steps))
        cmp = paired_comparison(ours, peer)
        flops = {side: 6 * n_mm * (prompt_tokens + runs[0]["mean_completion_tokens"] * steps * G_PROMPTS * G_GENERATIONS)
                 for side, runs in (("ours", ours), ("peer", peer)) if runs and runs[0]["mean_completion_tokens"]}
        step_seconds = {side: round(r["seconds"] / steps, 4) for side, r in (("ours", cmp["ours_side"]),
                                                                               ("peer", cmp["peer_side"])) if r}
        out["grpo"] = {**cmp, "mfu_training_pass_only": _mfu(cmp, flops, peak), "step_seconds": step_seconds,
                       "steps": steps}
    return out


def run(quick: bool = False) -> dict | None:
    if not cuda_or_say_why("gpu_train"):
        return None
    from rlhfkit.models import load_tokenizer

    device = torch.device("cuda")
    tok = load_tokenizer(SPEED_TOKENIZER)
    # the bundled tokenizer's special ids, so generation stops at its EOS on both sides
    cfg = qwen05b_config(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    peak = measure_matmul_peak(device, torch.bfloat16)
    load_before = load_average()
    results = measure(cfg, peak, quick=quick, repeats=1 if quick else 3)
    return {
        "metric": "sft_dpo_grpo_step_time_and_mfu",
        "device": torch.cuda.get_device_name(device),
        "bf16_matmul_peak_tflops": round(peak / 1e12, 1),
        **results,
        "target": {"mfu": 0.40, "grpo_step_ratio_vs_trl": 1.5},
        "load_average": {"before": load_before, "after": load_average()},
        "workload": {"model": "Qwen2.5-0.5B-shaped Llama, random weights", "seq_len": SEQ_LEN, "batch": BATCH,
                     "dpo": {"batch_pairs": DPO_BATCH, "max_length": DPO_MAX_LEN, "beta": DPO_BETA},
                     "grpo": {"prompts_per_step": G_PROMPTS, "generations": G_GENERATIONS,
                              "max_new_tokens": G_NEW_TOKENS, "beta": G_BETA},
                     "mixed_precision": "bf16", "attn": "sdpa", "matmul_params": matmul_params(fresh_model(cfg))},
    }

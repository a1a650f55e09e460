"""DPO and relatives: preference optimisation without a reward model or RL.

    rlhfkit dpo --model runs/sft/final --dataset prefs.jsonl --loss sigmoid --beta 0.1
    rlhfkit dpo --model runs/sft/final --dataset prefs.jsonl --loss kto      # pairs split into +/- examples
    rlhfkit dpo --model runs/sft/final --dataset unpaired.jsonl --loss kto   # prompt/completion/label

`--loss` picks a function from :data:`rlhfkit.losses.preference.PREFERENCE_LOSSES` (sigmoid,
ipo, hinge, cdpo, robust, simpo, orpo, kto). Data: `prompt`/`chosen`/`rejected` pairs (text
or conversations), `prompt`/`responses`/`ranking` rankings (expanded to every ordered pair),
or `prompt`/`completion`/`label` for KTO.

A step: chosen and rejected rows of a micro-batch go through ONE forward
(:func:`rlhfkit.logprobs.response_logprobs`; data from :mod:`rlhfkit.data.preference`).
Reference log-probs are computed once and cached on disk, keyed by the reference weights,
the token ids and the settings (`--precompute_ref false`: on the fly); with `--use_lora`
the reference is the adapter-disabled policy. Logged: implicit rewards beta*log(pi/pi_ref)
of chosen and rejected, their margin and accuracy, on training and held-out pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhfkit.config import ModelArgs, SplitArgs, TrainArgs, require
from rlhfkit.data.preference import (
    PreferenceData,
    ResponseBatch,
    collate_preferences,
    collate_responses,
    example_rows,
    load_preferences,
    pair_units,
)
from rlhfkit.data.readers import eval_source
from rlhfkit.logprobs import fast_head_allowed, response_logprobs
from rlhfkit.logprobs import preference_reference_logps as compute_reference_logps
from rlhfkit.losses.preference import (
    PREFERENCE_LOSSES,
    UNPAIRED_LOSSES,
    compute_preference_loss,
    loss_parameters,
    needs_reference,
)
from rlhfkit.train.memory import report_for_run
from rlhfkit.models import (
    check_max_length,
    load_policy,
    load_tokenizer,
    reference_context,
    save_model,
    weights_fingerprint,
)
from rlhfkit.train.runs import (
    MetricsLogger,
    atomic_path,
    atomic_write_json,
    one_run_per_folder,
    prepare_run_dir,
)
from rlhfkit.train.sharding import full_state_dict
from rlhfkit.train.accelerator import make_accelerator, mean_across_processes
from rlhfkit.train.batches import iterate_batches, micro_steps_per_epoch
from rlhfkit.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhfkit.train.optim import make_optimizer, make_scheduler
from rlhfkit.train.step import check_finite

CACHE_FORMAT = 2  # bump when the meaning of cached reference log-probs changes


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs, SplitArgs):
    dataset: str = ""
    """Preference data: .jsonl/.json/.parquet, a saved HF dataset or a hub name (pairs, rankings or KTO-style labels)."""
    eval_dataset: str = ""
    """Held-out preference data for loss and reward accuracy (default: dataset's test/eval split if it has one)."""
    loss: str = "sigmoid"
    """Loss variant: sigmoid (DPO), ipo, hinge, cdpo, robust, simpo, orpo or kto."""
    beta: float = 0.1
    """Strength of the KL regulariser (DPO beta; IPO tau; SimPO's reward scale; ORPO's lambda)."""
    label_smoothing: float = 0.0
    """Assumed label-flip rate eps for cdpo and robust, and for sigmoid (then cDPO, as in TRL); 0 <= eps < 0.5."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin gamma."""
    desirable_weight: float = 1.0
    """KTO lambda_D, weight of desirable examples."""
    undesirable_weight: float = 1.0
    """KTO lambda_U, weight of undesirable examples."""
    kto_kl: bool = True
    """Estimate KTO's reference point z_0 from mismatched (prompt, completion) pairs; False sets z_0 = 0."""
    reference: str = ""
    """Reference model (default: the starting model). Ignored with LoRA: the adapter-disabled policy is the reference."""
    precompute_ref: bool = True
    """Compute reference log-probs once before training and cache them on disk (False: on the fly each step)."""
    ref_cache_dir: str = ""
    """Where cached reference log-probs live (default: $XDG_CACHE_HOME/rlhfkit/ref_logps)."""
    max_length: int = 128
    """Longest prompt + response in tokens; longer ones are truncated (prompt from the left) and counted."""
    max_eval_examples: int = 512
    """Cap on held-out pairs scored at each evaluation."""

    @property
    def loss_name(self) -> str:
        """The loss actually computed: `sigmoid` with label_smoothing > 0 is cDPO (Mitchell 2023),
        as TRL's DPOConfig does it."""
        return "cdpo" if self.loss == "sigmoid" and self.label_smoothing > 0 else self.loss

    def __post_init__(self) -> None:
        self._check_train_args()
        require(bool(self.dataset), "dataset", "give preference data (--dataset FILE)")
        require(self.loss in PREFERENCE_LOSSES, "loss", f"must be one of {', '.join(PREFERENCE_LOSSES)}, got {self.loss!r}")
        require(self.beta > 0, "beta", "must be > 0")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        require(self.label_smoothing == 0 or "label_smoothing" in loss_parameters(self.loss_name), "label_smoothing",
                f"loss {self.loss!r} does not use it (sigmoid, which becomes cDPO as in TRL, cdpo and robust do)")
        require(self.max_length >= 4, "max_length", "must be >= 4")
        self.model = self.model or "kindly"


# ---------------------------------------------------------------------------------------------
# data and the forward pass: rlhfkit.data.preference and rlhfkit.logprobs


def load_encoded(source, split: str, loss: str, tokenizer, max_length: int, limit: int | None = None, max_prompt_length: int = 0):
    return load_preferences(source, split, loss in UNPAIRED_LOSSES, tokenizer, max_length, limit, loss_name=loss,
                            log=lambda m: print(f"dpo: {m}"), max_prompt_length=max_prompt_length)


def response_logps(model, batch: ResponseBatch, fast_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log pi(response | prompt) per row and the response lengths."""
    lp, _ = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_width,
                              batch.response_mask, fast_head=fast_head)
    return lp.sum(-1), batch.response_mask.sum(-1).to(lp.dtype)


# ---------------------------------------------------------------------------------------------
# reference log-probs: precomputed and cached, or on the fly


def cached_reference_logps(ref_model, enc: PreferenceData, cfg: Config, pad_id: int, device: Any, kl: bool,
                           is_main: bool = True) -> torch.Tensor:
    """Load reference log-probs from the cache, computing and writing them (atomically) when missing."""
    from safetensors.torch import load_file, save_file

    key_parts = {"format": CACHE_FORMAT, "model": weights_fingerprint(ref_model), "data": enc.fingerprint(),
                 "max_length": cfg.max_length, "kl_pairs": kl and not enc.paired, "dtype": cfg.dtype}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(cfg.ref_cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlhfkit" / "ref_logps")
    path = root / f"{key}.safetensors"
    if path.is_file():
        print(f"dpo: reference log-probs from cache {path}")
        return load_file(str(path))["logps"]
    logps = compute_reference_logps(ref_model, enc, cfg.per_device_train_batch_size * 2, pad_id, device, kl,
                                    progress=cfg.progress and is_main, fast_head=fast_head_allowed(cfg.mixed_precision))
    if is_main:
        with atomic_path(path) as tmp:
            save_file({"logps": logps}, str(tmp), metadata={k: str(v) for k, v in key_parts.items()})
        print(f"dpo: cached reference log-probs of {len(enc.rows)} examples at {path}")
    return logps


# ---------------------------------------------------------------------------------------------
# one loss evaluation


def batch_loss(cfg: Config, model, ref_model, enc: PreferenceData, index: list[int], ref_table: torch.Tensor | None,
               pad_id: int, device: Any, reduce=None) -> tuple[torch.Tensor, dict, int]:
    """Loss, metrics, non-pad tokens of micro-batch `index`; `reduce` (cross-process sum): KTO's z_0 over all."""
    use_ref = needs_reference(cfg.loss)
    kl = cfg.kto_kl and not enc.paired
    # pairs: the preference batch the reward recipe uses too (chosen rows, then rejected rows)
    batch = (collate_preferences(pair_units(enc, index), pad_id, device).rows if enc.paired
             else collate_responses(example_rows(enc, index), pad_id, device))
    fast = fast_head_allowed(cfg.mixed_precision)
    logps, lengths = response_logps(model, batch, fast)
    tokens = int(batch.attention_mask.sum())
    kl_logps = ref_kl = None
    if kl:
        with torch.no_grad():
            kl_logps, _ = response_logps(model, collate_responses(example_rows(enc, index, kl=True), pad_id, device), fast)
    ref_logps = None
    if use_ref and ref_table is not None:
        ref = ref_table[index].to(device=device, dtype=logps.dtype)
        ref_logps = torch.cat([ref[:, 0], ref[:, 1]]) if enc.paired else ref[:, 0]
        ref_kl = ref[:, 1] if kl else None
    elif use_ref:
        with torch.no_grad(), reference_context(ref_model) as ref:
            ref_logps, _ = response_logps(ref, batch, fast)
            if kl:
                ref_kl, _ = response_logps(ref, collate_responses(example_rows(enc, index, kl=True), pad_id, device), fast)
    hparams = dict(beta=cfg.beta, label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma,
                   desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight, all_reduce_sum=reduce)
    if enc.paired:
        B = len(index)
        inputs = dict(chosen_logps=logps[:B], rejected_logps=logps[B:], chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
        if ref_logps is not None:
            inputs.update(ref_chosen_logps=ref_logps[:B], ref_rejected_logps=ref_logps[B:])
    else:
        labels = torch.tensor([enc.labels[i] for i in index], device=device)
        inputs = dict(logps=logps, ref_logps=ref_logps, labels=labels, kl_logps=kl_logps, ref_kl_logps=ref_kl)
    loss, metrics = compute_preference_loss(cfg.loss_name, **inputs, **hparams)
    return loss, metrics, tokens


@torch.no_grad()
def evaluate(cfg: Config, model, ref_model, enc: PreferenceData, ref_table, pad_id: int, device: Any) -> dict[str, float]:
    """Mean loss and metrics over held-out examples.

    Each batch mean is weighted by the examples it averages: for unpaired (KTO) data the
    chosen/rejected rewards by the batch's desirable/undesirable counts, and the margin is
    the difference of the two overall means (a batch may hold only one kind).
    """
    model.eval()
    sums, weights = {}, {}  # metric -> weighted sum, summed weight
    bs = cfg.per_device_train_batch_size * 2
    for start in range(0, len(enc.rows), bs):
        index = list(range(start, min(start + bs, len(enc.rows))))
        loss, metrics, _ = batch_loss(cfg, model, ref_model, enc, index, ref_table, pad_id, device)
        n_pos = len(index) if enc.paired else sum(enc.labels[i] for i in index)
        n_neg = len(index) if enc.paired else len(index) - n_pos
        for k, v in {"loss": loss, **metrics}.items():
            v = float(v)
            w = {"rewards/chosen": n_pos, "rewards/rejected": n_neg}.get(k, len(index))
            if v == v and w > 0:  # NaN marks a metric absent from this batch
                sums[k] = sums.get(k, 0.0) + v * w
                weights[k] = weights.get(k, 0) + w
    model.train()
    out = {k: v / weights[k] for k, v in sums.items()}
    if not enc.paired and "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return {f"eval_{k}": v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# the loop


def _load_eval(cfg: Config, tokenizer) -> PreferenceData | None:
    source, split = eval_source(cfg.dataset, cfg.eval_dataset, cfg.eval_split)
    return None if source is None else load_encoded(source, split, cfg.loss, tokenizer, cfg.max_length, cfg.max_eval_examples, cfg.max_prompt_length)


def _reference(cfg: Config, policy):
    """The reference model: the adapter-disabled policy with LoRA, else a frozen separate copy."""
    if cfg.use_lora:
        return policy
    return load_policy(cfg.reference or cfg.model, cfg.dtype, trainable=False, disable_dropout=cfg.disable_dropout).requires_grad_(False)


@one_run_per_folder
def main(cfg: Config) -> dict:
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    out = prepare_run_dir(cfg.output_dir, cfg, accelerator.is_main_process)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    pad_id = tokenizer.pad_token_id
    train = load_encoded(cfg.dataset, cfg.dataset_split, cfg.loss, tokenizer, cfg.max_length, None, cfg.max_prompt_length)
    held_out = _load_eval(cfg, tokenizer)
    kind = "pairs" if train.paired else f"unpaired examples ({sum(train.labels)} desirable)"
    accelerator.print(f"dpo[{cfg.loss}]: {len(train.rows)} training {kind}"
                      + (f", {len(held_out.rows)} held out" if held_out else ""))

    policy = load_policy(cfg.model, cfg.dtype, lora=cfg, disable_dropout=cfg.disable_dropout,
                         attn_implementation=cfg.attn_implementation, gradient_checkpointing=cfg.gradient_checkpointing)
    check_max_length(policy, cfg.max_length)
    report_for_run(accelerator, policy, cfg, batch=2 * cfg.per_device_train_batch_size, seq_len=cfg.max_length)
    ref_model = _reference(cfg, policy) if needs_reference(cfg.loss) else None
    kl = cfg.kto_kl and not train.paired
    ref_train = ref_eval = None
    if ref_model is not None:
        ref_model.to(device)
        if cfg.precompute_ref:
            ref_train = cached_reference_logps(ref_model, train, cfg, pad_id, device, kl, accelerator.is_main_process)
            if held_out is not None:
                ref_eval = cached_reference_logps(ref_model, held_out, cfg, pad_id, device, kl, accelerator.is_main_process)
            if not cfg.use_lora:
                ref_model = None  # every reference value is in the tables now; free the copy

    nproc, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.gradient_accumulation_steps
    reduce = (lambda t: accelerator.reduce(t, "sum")) if nproc > 1 else None  # KTO's z_0 over all processes
    per_epoch = micro_steps_per_epoch(len(train.rows), cfg.per_device_train_batch_size, nproc)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.num_train_epochs * per_epoch) // accum)
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)  # stepped by hand once per optimiser step
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if ref_model is not None and cfg.use_lora:
        ref_model = policy
    accelerator.register_for_checkpointing(scheduler)
    step = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        step = load_checkpoint(accelerator, ckpt)["step"]
        accelerator.print(f"dpo: resumed from {ckpt} at step {step}")

    logger = MetricsLogger(out, cfg.report_to, enabled=accelerator.is_main_process)
    bar = tqdm(total=total_steps, initial=step, desc=f"dpo[{cfg.loss}]", disable=not (cfg.progress and accelerator.is_main_process))
    policy.train()
    t0, tokens, window = time.perf_counter(), 0, []
    metrics: dict[str, float] = {}
    for micro, local, _ in iterate_batches(len(train.rows), cfg.per_device_train_batch_size, cfg.seed, step * accum,
                                           total_steps * accum, nproc, rank):
        sync = (micro + 1) % accum == 0
        with contextlib.nullcontext() if sync or nproc == 1 else accelerator.no_sync(policy):
            loss, m, ntok = batch_loss(cfg, policy, ref_model, train, local, ref_train, pad_id, device, reduce)
            check_finite("loss", loss)
            accelerator.backward(loss)  # accelerate divides by gradient_accumulation_steps itself
        tokens += ntok * nproc
        window.append({"loss": loss.detach(), **m})
        if not sync:
            continue
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        if grad_norm is not None:
            check_finite("gradient norm", grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.logging_steps == 0 or step == total_steps:
            # metrics are read (one device sync) only when logged
            metrics = {k: float(torch.stack([w[k] for w in window]).nanmean()) for k in window[-1]}
            if nproc > 1:  # every process logs the mean over all of them (NaN if one saw no such example)
                metrics = dict(zip(metrics, mean_across_processes(accelerator, list(metrics.values()))))
            metrics.update(lr=scheduler.get_last_lr()[0], tokens_per_s=tokens / (time.perf_counter() - t0),
                           epoch=micro / max(per_epoch, 1))
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            logger.log(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics.get('rewards/accuracy', float('nan')):.2f}")
        window = []
        if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and held_out is not None:
            logger.log(evaluate(cfg, policy, ref_model, held_out, ref_eval, pad_id, device), step)
        if cfg.save_steps > 0 and step % cfg.save_steps == 0:
            save_checkpoint(accelerator, out, step)
    bar.close()
    final = dict(metrics, steps=step, seconds=time.perf_counter() - t0, tokens=tokens,
                 train_examples=len(train.rows), truncated=train.truncated, skipped=train.skipped)
    if held_out is not None:
        final.update(evaluate(cfg, policy, ref_model, held_out, ref_eval, pad_id, device))
        logger.log({k: v for k, v in final.items() if k.startswith("eval_")}, step)
    logger.close()
    accelerator.wait_for_everyone()
    state = full_state_dict(accelerator, policy)  # all processes: gathers a sharded model
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(policy), tokenizer, out / "final", merge_lora=cfg.merge_lora,
                   state_dict=state)
        atomic_write_json(out / "results.json", final)
    accelerator.wait_for_everyone()
    return final

"""DPO and relatives: preference optimisation without a reward model or RL.

    rlhfkit dpo --model runs/sft/final --dataset prefs.jsonl --loss sigmoid --beta 0.1
    rlhfkit dpo --model runs/sft/final --dataset prefs.jsonl --loss kto      # pairs split into +/- examples
    rlhfkit dpo --model runs/sft/final --dataset unpaired.jsonl --loss kto   # prompt/completion/label

`--loss` picks a function from :data:`rlhfkit.losses.preference.PREFERENCE_LOSSES` (sigmoid,
ipo, hinge, cdpo, robust, simpo, orpo, kto). Data: `prompt`/`chosen`/`rejected` pairs (text
or conversations; a `label` below 0.5 means rejected won, ties are left out and counted),
`prompt`/`responses`/`ranking` rankings (possibly partial, expanded to every ordered pair),
mixed as the reward recipe takes them (:mod:`rlhfkit.data.preference`), or
`prompt`/`completion`/`label` for KTO.

A step: chosen and rejected rows of a micro-batch go through ONE forward
(:func:`rlhfkit.logprobs.response_logprobs`; data from :mod:`rlhfkit.data.preference`).
Reference log-probs are computed once and cached on disk, keyed by the reference weights,
the token ids and the settings (`--precompute_ref false`: on the fly); with `--use_lora`
the reference is the adapter-disabled policy. Logged: implicit rewards beta*log(pi/pi_ref)
of chosen and rejected, their margin and accuracy, on training and held-out pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rlhfkit.config import ModelArgs, SplitArgs, TrainArgs, require
from rlhfkit.data.preference import (
    PreferenceData,
    ResponseBatch,
    collate_responses,
    example_rows,
    load_preferences,
)
from rlhfkit.data.readers import eval_source
from rlhfkit.logprobs import fast_head_allowed, response_logprobs
from rlhfkit.losses.preference import (
    PREFERENCE_LOSSES,
    UNPAIRED_LOSSES,
    compute_preference_loss,
    loss_parameters,
    needs_reference,
)
from rlhfkit.models import (
    check_max_length,
    load_policy,
    load_tokenizer,
    reference_context,
    save_model,
    weights_fingerprint,
)
from rlhfkit.train.accelerator import make_accelerator, mean_across_processes
from rlhfkit.train.batches import micro_steps_per_epoch, optimizer_steps, total_optimizer_steps
from rlhfkit.train.checkpoints import save_checkpoint
from rlhfkit.train.memory import report_for_run
from rlhfkit.train.optim import prepare_training
from rlhfkit.train.runs import (
    MetricsLogger,
    atomic_path,
    atomic_write_json,
    one_run_per_folder,
    prepare_run_dir,
)
from rlhfkit.train.sharding import full_state_dict
from rlhfkit.train.step import accumulate, backward, optimizer_step, share

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
    lp, _ = response_logprobs(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              response_width=batch.response_width, response_mask=batch.response_mask,
                              fast_head=fast_head)
    return lp.sum(-1), batch.response_mask.sum(-1).to(lp.dtype)


# ---------------------------------------------------------------------------------------------
# reference log-probs: precomputed and cached, or on the fly


@torch.no_grad()
def compute_reference_logps(ref_model, data: PreferenceData, batch_size: int, pad_id: int, device, kl: bool,
                            progress: bool = False, fast_head: bool = True) -> torch.Tensor:
    """Summed reference log-probs of every example, (n, 2) float64: pairs -> [chosen, rejected];
    unpaired -> [completion, mismatched KL completion (with `kl`)].

    `ref_model` runs in eval mode, under `reference_context` (adapters disabled on a LoRA policy).
    """
    out = torch.zeros(len(data.rows), 2, dtype=torch.float64)
    with reference_context(ref_model) as ref:
        was_training = ref.training
        ref.eval()
        for start in tqdm(range(0, len(data.rows), batch_size), desc="reference log-probs", disable=not progress):
            index = list(range(start, min(start + batch_size, len(data.rows))))
            rows = example_rows(data, index)
            if not data.paired and kl:
                rows = rows + example_rows(data, index, kl=True)
            b = collate_responses(rows, pad_id, device)
            lp, _ = response_logprobs(ref, input_ids=b.input_ids, attention_mask=b.attention_mask,
                                      response_width=b.response_width, response_mask=b.response_mask,
                                      fast_head=fast_head)
            lp = lp.sum(-1).double().cpu()
            if data.paired or kl:
                out[index, 0], out[index, 1] = lp[:len(index)], lp[len(index):]
            else:
                out[index, 0] = lp
        ref.train(was_training)
    return out


def cached_reference_logps(ref_model, enc: PreferenceData, cfg: Config, pad_id: int, device: Any, kl: bool,
                           is_main: bool = True) -> torch.Tensor:
    """Load reference log-probs from the cache, computing and writing them (atomically) when missing."""

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
    # pairs: chosen rows, then rejected rows (the pair layout of the reward recipe's batches)
    batch = collate_responses(example_rows(enc, index), pad_id, device)
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


class Reference(NamedTuple):
    """The reference side of the loss: a model, or tables of its log-probs computed once."""

    model: Any
    train_table: torch.Tensor | None
    eval_table: torch.Tensor | None


def _reference_tables(cfg: Config, policy, train: PreferenceData, held_out: PreferenceData | None,
                      pad_id: int, accelerator) -> Reference:
    if not needs_reference(cfg.loss):
        return Reference(None, None, None)
    ref_model, kl = _reference(cfg, policy), cfg.kto_kl and not train.paired
    ref_model.to(accelerator.device)
    if not cfg.precompute_ref:
        return Reference(ref_model, None, None)
    tables = [None if enc is None else cached_reference_logps(ref_model, enc, cfg, pad_id, accelerator.device, kl,
                                                              accelerator.is_main_process) for enc in (train, held_out)]
    # every reference value is in the tables now; free the copy (with LoRA it is the policy itself)
    return Reference(ref_model if cfg.use_lora else None, *tables)


@one_run_per_folder
def main(cfg: Config) -> dict:
    accelerator = make_accelerator(cfg)
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
    ref = _reference_tables(cfg, policy, train, held_out, pad_id, accelerator)
    total_steps = total_optimizer_steps(len(train.rows), cfg, accelerator.num_processes)
    policy, optimizer, scheduler, step = prepare_training(accelerator, policy, cfg, total_steps, out, "dpo")
    if ref.model is not None and cfg.use_lora:
        ref = ref._replace(model=policy)  # the prepared policy, run with its adapter disabled
    logger = MetricsLogger(out, cfg.report_to, enabled=accelerator.is_main_process)
    t0 = time.perf_counter()
    metrics, step, tokens = train_loop(cfg, accelerator, policy, ref, train, held_out, optimizer, scheduler, step,
                                       total_steps, out, pad_id, logger)
    final = dict(metrics, steps=step, seconds=time.perf_counter() - t0, tokens=tokens,
                 train_examples=len(train.rows), truncated=train.truncated, skipped=train.skipped)
    if held_out is not None:
        final.update(evaluate(cfg, policy, ref.model, held_out, ref.eval_table, pad_id, accelerator.device))
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


def train_loop(cfg: Config, accelerator, policy, ref: Reference, train: PreferenceData, held_out, optimizer, scheduler,
               step: int, total_steps: int, out: Path, pad_id: int, logger) -> tuple[dict, int, int]:
    """Optimiser steps from `step` to `total_steps`; returns (last logged metrics, step, tokens seen)."""
    nproc, device = accelerator.num_processes, accelerator.device
    reduce = (lambda t: accelerator.reduce(t, "sum")) if nproc > 1 else None  # KTO's z_0 over all processes
    per_epoch = micro_steps_per_epoch(len(train.rows), cfg.per_device_train_batch_size, nproc)
    bar = tqdm(total=total_steps, initial=step, desc=f"dpo[{cfg.loss}]", disable=not (cfg.progress and accelerator.is_main_process))
    policy.train()
    t0, tokens, metrics = time.perf_counter(), 0, {}
    for batches in optimizer_steps(len(train.rows), cfg, step, total_steps, nproc, accelerator.process_index):
        step_rows = sum(len(g) for _, _, g in batches) / nproc  # examples in the step, per process
        window = []
        for j, (_, local, _) in enumerate(batches):
            with accumulate(accelerator, [policy], last=j == len(batches) - 1):
                loss, m, ntok = batch_loss(cfg, policy, ref.model, train, local, ref.train_table, pad_id, device, reduce)
                # the loss is the micro-batch's mean: weighted by its share of the step (train.step)
                backward(accelerator, loss * share(len(local), step_rows), "loss")
            tokens += ntok * nproc
            window.append({"loss": loss.detach(), **m})
        grad_norm = optimizer_step(accelerator, [policy], [optimizer], [scheduler], cfg.max_grad_norm)
        step += 1
        bar.update(1)
        if step % cfg.logging_steps == 0 or step == total_steps:
            # metrics are read (one device sync) only when logged
            metrics = {k: float(torch.stack([w[k] for w in window]).nanmean()) for k in window[-1]}
            if nproc > 1:  # every process logs the mean over all of them (NaN if one saw no such example)
                metrics = dict(zip(metrics, mean_across_processes(accelerator, list(metrics.values()))))
            metrics.update(lr=scheduler.get_last_lr()[0], tokens_per_s=tokens / (time.perf_counter() - t0),
                           epoch=batches[-1][0] / max(per_epoch, 1))
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            logger.log(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics.get('rewards/accuracy', float('nan')):.2f}")
        if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and held_out is not None:
            logger.log(evaluate(cfg, policy, ref.model, held_out, ref.eval_table, pad_id, device), step)
        if cfg.save_steps > 0 and step % cfg.save_steps == 0:
            save_checkpoint(accelerator, out, step)
    bar.close()
    return metrics, step, tokens

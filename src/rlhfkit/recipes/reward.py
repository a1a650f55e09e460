"""Train a reward model from pairwise preferences or K-way rankings.

Data: TRL-style preference records (`prompt`/`chosen`/`rejected`, plain text or conversations,
optional `margin`, optional `label` = P(chosen preferred) with 0.5 a tie, or `tie: true`,
optional `annotator_id`), ranking records (`prompt`/`responses`/`ranking`, best first, possibly
partial), a mix of both, or labels straight from the feedback database (`--from_feedback DB_URL`),
read as DPO reads them (:mod:`rlhfkit.data.preference`; the rules: :mod:`rlhfkit.data.schemas`).

Chosen and rejected rows go through one forward pass; the K responses of a ranking too, and
all C(K, 2) comparisons are formed from those K rewards. After training, the reward mean and
standard deviation over the training responses are saved with the model.

    rlhfkit reward --model runs/sft/final --dataset prefs.jsonl --output_dir runs/rm
    rlhfkit reward --model kindly --dataset ranks.jsonl --ranking_loss plackett_luce
    rlhfkit reward --dataset prefs.jsonl --ensemble_size 4 --ensemble_mode heads
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from rlhfkit.config import ModelArgs, SplitArgs, TrainArgs, require
from rlhfkit.data.preference import (
    EncodedComparison,
    PreferenceBatch,
    collate_comparisons,
    encode_comparisons,
    read_comparisons,
    strict_pairs,
)
from rlhfkit.data.readers import Records, eval_source, load_records
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.losses.reward import PAIR_LOSSES, RANKING_LOSSES, reward_centering_penalty
from rlhfkit.models import (
    check_max_length,
    disable_dropout,
    load_reward_model,
    load_tokenizer,
    save_model,
)
from rlhfkit.models.reward import (
    LastTokenReward,
    attach_stats,
    compute_stats,
    freeze_backbone,
    padding_free_matches,
    score_token_lists,
    unwrap_hf,
    write_ensemble_manifest,
)
from rlhfkit.train.accelerator import make_accelerator, multi_process_cpu
from rlhfkit.train.batches import optimizer_steps, total_optimizer_steps
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
from rlhfkit.train.sharding import full_state_dict, is_sharded, shard_layers_of, unsharded_copy
from rlhfkit.train.step import accumulate, backward, optimizer_step, share


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs, SplitArgs):
    dataset: str = ""
    """Preference or ranking data: .jsonl/.json/.parquet, a saved HF dataset folder or a hub name."""
    from_feedback: str = ""
    """Read labels from the feedback database at this URL (sqlite:///... or postgresql://...) instead of `dataset`."""
    eval_dataset: str = ""
    """Held-out preference data (default: `eval_fraction` of the training data is held out)."""
    eval_fraction: float = 0.05
    """Share of the training data held out for evaluation when there is no eval_dataset or eval split (0 disables)."""
    loss: str = "bradley_terry"
    """Pairwise loss: bradley_terry (ties skipped and counted), soft_label or davidson (ties modelled)."""
    ranking_loss: str = "instructgpt"
    """K-way ranking loss: instructgpt (mean over all C(K,2) pairs) or plackett_luce."""
    tie_log_nu: float = 0.0
    """log of the Davidson tie parameter nu (loss=davidson)."""
    use_margin: bool = True
    """Subtract a record's `margin` column from the reward gap (Llama 2), when present."""
    center_rewards_coef: float = 0.0
    """Weight of the centering regulariser coef * mean((r_chosen + r_rejected)^2) (0 disables)."""
    max_length: int = 256
    """Longest prompt + response in tokens; longer ones are truncated (prompt from the left) and counted."""
    freeze_backbone: bool = False
    """Train only the score head (a linear probe on the backbone's features)."""
    ensemble_size: int = 1
    """Number of reward models (ensemble_mode=models) or heads (ensemble_mode=heads)."""
    ensemble_mode: str = "models"
    """models: N models with seeds seed..seed+N-1 and their own data orders; heads: one backbone, N heads."""
    bootstrap_heads: bool = True
    """With ensemble_mode=heads, weight each example per head by a Poisson(1) draw (online bootstrap)."""
    normalize: bool = True
    """Store the reward mean/std over the training responses with the model, for normalised scores in RL."""
    norm_examples: int = 4096
    """Responses used for the normalisation statistics (at most)."""
    on_bad_record: str = "error"
    """error: stop at the first bad record naming file/line/field; skip: drop it and print counts per reason."""
    max_eval_examples: int = 2000
    """Cap on held-out comparisons scored per evaluation."""
    padding_free: bool = True
    """Pack each batch's sequences end to end (no pad tokens computed); checked against the padded forward on the first batch, and turned off if the model does not support it."""

    def __post_init__(self) -> None:
        self._check_train_args()
        if not self.model:
            self.model = "kindly"
        require(bool(self.dataset) or bool(self.from_feedback), "dataset", "give --dataset or --from_feedback")
        require(self.loss in PAIR_LOSSES, "loss", f"must be one of {', '.join(PAIR_LOSSES)}, got {self.loss!r}")
        require(self.ranking_loss in RANKING_LOSSES, "ranking_loss",
                f"must be one of {', '.join(RANKING_LOSSES)}, got {self.ranking_loss!r}")
        require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
        require(self.max_length >= 8, "max_length", "must be >= 8")
        require(self.ensemble_size >= 1, "ensemble_size", "must be >= 1")
        require(self.ensemble_mode in ("models", "heads"), "ensemble_mode", "must be models or heads")
        require(self.on_bad_record in ("error", "skip"), "on_bad_record", "must be error or skip")
        require(self.center_rewards_coef >= 0, "center_rewards_coef", "must be >= 0")
        require(not (self.use_lora and self.freeze_backbone), "freeze_backbone",
                "cannot be combined with use_lora (LoRA already freezes the base weights)")


def batch_loss(module: torch.nn.Module, batch: PreferenceBatch, cfg: Config, weights: torch.Tensor | None = None,
               device: Any = "cpu") -> tuple[torch.Tensor, dict[str, float]]:
    """One forward over every row of the batch, then the pair and ranking losses from its rewards."""
    rows = batch.rows.to(device)
    rewards = module(rows.input_ids, rows.attention_mask)  # (R, H)
    if rewards.shape[-1] == 1:
        rewards = rewards.squeeze(-1)
    b = batch.num_pairs
    if weights is not None:
        weights = weights[batch.order].to(device)
    parts, metrics, n_units = [], {}, b + batch.rank_index.shape[0]
    if b:
        chosen, rejected = rewards[:b], rewards[b:2 * b]
        kwargs = {"labels": batch.labels.to(device) if cfg.loss != "bradley_terry" else None,
                  "weights": None if weights is None else weights[:b]}
        if cfg.use_margin and batch.margins is not None and cfg.loss == "bradley_terry":
            kwargs["margin"] = batch.margins.to(device)
        if cfg.loss == "davidson":
            kwargs["log_nu"] = cfg.tie_log_nu
        loss, m = PAIR_LOSSES[cfg.loss](chosen, rejected, **kwargs)
        parts.append(loss * b / n_units)
        if cfg.center_rewards_coef > 0:
            parts.append(reward_centering_penalty(torch.stack([chosen, rejected], 1), coef=cfg.center_rewards_coef) * b / n_units)
        metrics.update({f"pair_{k}" if k != "accuracy" else "accuracy": float(v) for k, v in m.items()})
    if batch.rank_index.numel():
        idx, mask = batch.rank_index.to(device), batch.rank_mask.to(device)
        ranked = rewards[idx]  # (Br, K[, H])
        nr = idx.shape[0]
        loss, m = RANKING_LOSSES[cfg.ranking_loss](ranked, mask, weights=None if weights is None else weights[b:])
        parts.append(loss * nr / n_units)
        if cfg.center_rewards_coef > 0:
            parts.append(reward_centering_penalty(ranked, mask, coef=cfg.center_rewards_coef) * nr / n_units)
        metrics["ranking_accuracy"] = float(m["accuracy"])
    total = torch.stack(parts).sum()
    metrics["loss"] = float(total.detach())
    return total, metrics


# ---------------------------------------------------------------------------------------------
# training one reward model (one member of an ensemble, or one backbone with N heads)


@torch.no_grad()
def evaluate(module: torch.nn.Module, comps: list[EncodedComparison], cfg: Config, pad_id: int,
             device: Any) -> dict[str, float]:
    """Held-out loss and accuracy: :func:`rlhfkit.losses.reward.preference_accuracy` over the decisive
    pairs (labelled ties left out) and, for rankings, over their C(K, 2) pairs, pooled over batches."""
    was = module.training
    module.eval()
    comps = comps[: cfg.max_eval_examples]
    totals: Counter = Counter()
    bs = cfg.per_device_train_batch_size * 2
    for i in range(0, len(comps), bs):
        chunk = comps[i:i + bs]
        loss, m = batch_loss(module, collate_comparisons(chunk, pad_id), cfg, device=device)
        totals["loss"] += float(loss) * len(chunk)
        # a batch's accuracy is over its verdicts; weighting by their count pools them exactly
        decisive = sum(1 for c in chunk if not c.ranked and c.label != 0.5)
        rank_pairs = sum(len(c.responses) * (len(c.responses) - 1) // 2 for c in chunk if c.ranked)
        if decisive:
            totals["acc"] += m["accuracy"] * decisive
            totals["n_acc"] += decisive
        if rank_pairs:
            totals["racc"] += m["ranking_accuracy"] * rank_pairs
            totals["n_racc"] += rank_pairs
    module.train(was)
    out = {"eval_loss": totals["loss"] / max(len(comps), 1), "eval_examples": len(comps)}
    if totals["n_acc"]:
        out["eval_accuracy"] = totals["acc"] / totals["n_acc"]
    if totals["n_racc"]:
        out["eval_ranking_accuracy"] = totals["racc"] / totals["n_racc"]
    return out


def _load_model(cfg: Config, heads: int, seed: int, tokenizer: Any):
    torch.manual_seed(seed)  # the fresh score head's initialisation differs per member
    model = load_reward_model(cfg.model, cfg.dtype, lora=cfg if cfg.use_lora else None, num_labels=heads,
                              tokenizer=tokenizer, attn_implementation=cfg.attn_implementation,
                              gradient_checkpointing=cfg.gradient_checkpointing)
    check_max_length(model, cfg.max_length)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    return model


def train_one(cfg: Config, member: int, train: list[EncodedComparison], eval_units: list[EncodedComparison],
              tokenizer: Any, out: Path, printer=print) -> tuple[Any, dict]:
    """Train one reward model, save it to out/final; returns (unwrapped module, final metrics).

    Resumable from out/checkpoints.
    """
    seed = cfg.seed + member
    heads = cfg.ensemble_size if cfg.ensemble_mode == "heads" else 1
    accelerator = make_accelerator(dataclasses.replace(cfg, seed=seed))
    module = _member_module(cfg, heads, seed, tokenizer, train, accelerator, printer)
    boot = None
    if heads > 1 and cfg.bootstrap_heads:
        boot = torch.poisson(torch.ones(len(train), heads), generator=torch.Generator().manual_seed(seed))
    total = total_optimizer_steps(len(train), cfg, accelerator.num_processes)
    shard_layers_of(module, unwrap_hf(module.model))
    module, optimizer, scheduler, step = prepare_training(accelerator, module, cfg, total, out, f"reward: member {member}",
                                                           printer)
    logger = MetricsLogger(out, cfg.report_to, enabled=accelerator.is_main_process)
    t0 = time.perf_counter()
    metrics, step = _train_member(cfg, member, accelerator, module, optimizer, scheduler, step, total, train, eval_units,
                                  boot, tokenizer.pad_token_id, out, logger)
    final = dict(metrics, steps=step, seconds=time.perf_counter() - t0)
    module = accelerator.unwrap_model(module)
    if eval_units:
        final.update(evaluate(module, eval_units, cfg, tokenizer.pad_token_id, accelerator.device))
        logger.log({k: v for k, v in final.items() if k.startswith("eval_")}, step)
    logger.close()
    state = full_state_dict(accelerator, module)  # all processes: gathers a sharded model onto the main one
    if accelerator.is_main_process:  # one writer; the others wait so every process returns a saved model
        whole = module if state is None else LastTokenReward(
            unsharded_copy(module.model, {k.removeprefix("model."): v for k, v in state.items()}), module.padding_free)
        final["stats"] = save_reward_model(whole, tokenizer, out / "final", train, cfg)
        atomic_write_json(out / "member_results.json", final)
    accelerator.wait_for_everyone()
    return module, final


def _member_module(cfg: Config, heads: int, seed: int, tokenizer, train: list[EncodedComparison], accelerator,
                   printer) -> LastTokenReward:
    """The reward model to train, padding-free when its architecture honours packed position ids."""
    module = LastTokenReward(_load_model(cfg, heads, seed, tokenizer))
    unwrap_hf(module.model).config.pad_token_id = tokenizer.pad_token_id
    report_for_run(accelerator, unwrap_hf(module.model), cfg, batch=2 * cfg.per_device_train_batch_size,
                   seq_len=cfg.max_length, outputs=heads)
    if cfg.padding_free:
        probe = collate_comparisons(train[: cfg.per_device_train_batch_size], tokenizer.pad_token_id)
        module.padding_free = padding_free_matches(module, probe.rows.input_ids, probe.rows.attention_mask)
        if not module.padding_free:
            printer(f"reward: {type(unwrap_hf(module.model)).__name__} does not honour packed position ids; "
                    "training with padding instead")
    return module


def _train_member(cfg: Config, member: int, accelerator, module, optimizer, scheduler, step: int, total: int,
                  train: list[EncodedComparison], eval_units: list[EncodedComparison], boot, pad_id: int, out: Path,
                  logger) -> tuple[dict, int]:
    """Optimiser steps from `step` to `total`; returns (the last step's metrics, step)."""
    nproc, sharded = accelerator.num_processes, is_sharded(accelerator)
    bar = tqdm(total=total, initial=step, desc=f"reward[{member}]", disable=not (cfg.progress and accelerator.is_main_process))
    t0, tokens, metrics = time.perf_counter(), 0, {}
    module.train()
    for batches in optimizer_steps(len(train), cfg, step, total, nproc, accelerator.process_index, seed=cfg.seed + member):
        step_units = sum(len(g) for _, _, g in batches) / nproc  # comparisons in the step, per process
        window = []
        for j, (_, local, _) in enumerate(batches):
            batch = collate_comparisons([train[i] for i in local], pad_id)
            with accumulate(accelerator, [module], last=j == len(batches) - 1):
                loss, m = batch_loss(module, batch, cfg, None if boot is None else boot[local], accelerator.device)
                # the loss is the micro-batch's mean: weighted by its share of the step (train.step)
                backward(accelerator, loss * share(len(local), step_units), "reward-model loss")
            tokens += int(batch.rows.attention_mask.sum()) * nproc
            window.append(m)
        grad_norm = optimizer_step(accelerator, [module], [optimizer], [scheduler], cfg.max_grad_norm)
        step += 1
        bar.update(1)
        metrics = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
        metrics.update(lr=scheduler.get_last_lr()[0], tokens_per_s=tokens / (time.perf_counter() - t0))
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        if step % cfg.logging_steps == 0 or step == total:
            logger.log(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        # a sharded model all-gathers in every forward: every process evaluates (the same units) then
        if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and eval_units and (accelerator.is_main_process or sharded):
            logger.log(evaluate(accelerator.unwrap_model(module), eval_units, cfg, pad_id, accelerator.device), step)
        if cfg.save_steps > 0 and step % cfg.save_steps == 0:
            save_checkpoint(accelerator, out, step, {"member": member})
    bar.close()
    return metrics, step


def save_reward_model(module: LastTokenReward, tokenizer: Any, path: Path, train: list[EncodedComparison],
                      cfg: Config) -> dict | None:
    """Save in HF format with the normalisation statistics of the training responses."""

    extra, stats = {}, None
    if cfg.normalize:
        seqs, seen = [], set()
        for c in train:
            for row in c.sequences:
                key = tuple(row)
                if key not in seen and len(seqs) < cfg.norm_examples:
                    seen.add(key)
                    seqs.append(row)
        device = next(module.parameters()).device
        raw = score_token_lists(module, seqs, tokenizer.pad_token_id, cfg.per_device_train_batch_size * 4, device)
        stats = compute_stats(raw, reference=f"{len(seqs)} distinct training responses")
        extra = attach_stats(module.model, stats)
    # merge_lora False: a peft adapter, the score head in it through modules_to_save
    save_model(module.model, tokenizer, path, extra_files=extra, merge_lora=cfg.merge_lora)
    return stats


# ---------------------------------------------------------------------------------------------
# main


def read_records(source: Any, split: str, from_feedback: str = "") -> Records:
    """Comparison records of a file, folder or dataset name, or (`--from_feedback DB_URL`) the
    feedback database's preference export, ties kept with label 0.5."""
    if from_feedback:
        # optional dependency: the feedback service needs the [serve] extra (sqlalchemy)
        from rlhfkit.feedback.export import load_preferences

        return Records(load_preferences(from_feedback), source=f"feedback database {from_feedback}")
    return load_records(source, split=split)


def load_comparisons(cfg: Config, records: Records, tokenizer: Any,
                     printer=print) -> tuple[list[EncodedComparison], Counter, Counter]:
    """Records -> encoded comparisons (the preference path of :mod:`rlhfkit.data.preference`).

    Returns (comparisons, counts: truncated rows, ties left out by the strict Bradley-Terry
    loss, comparisons identical after truncation; records skipped by reason).
    """
    comps = read_comparisons(records, tokenizer, on_bad=cfg.on_bad_record, log=printer)
    if not comps:
        raise DataError("no usable preference or ranking records", source=records.source)
    skipped = Counter(comps.report.reasons)
    counts: Counter = Counter()
    if cfg.loss == "bradley_terry":  # strict preferences: a label < 0.5 swaps the pair, ties are left out
        comps, ties = strict_pairs(comps)
        if ties:
            counts["ties_skipped"] = ties
    encoded, encoding = encode_comparisons(comps, tokenizer, cfg.max_length, cfg.max_prompt_length)
    counts["truncated_rows"] = encoding.truncated_rows
    if encoding.identical:
        counts["identical_after_truncation"] = encoding.identical
    return encoded, counts, skipped


def load_data(cfg: Config, tokenizer: Any, printer=print) -> tuple[list, list, Counter, Counter]:
    """(training comparisons, held-out comparisons, counts, records skipped by reason); the held-out
    ones are `eval_dataset` / the dataset's eval split, else `eval_fraction` of the training data."""
    train, counts, skipped = load_comparisons(cfg, read_records(cfg.dataset, cfg.dataset_split, cfg.from_feedback),
                                              tokenizer, printer)
    eval_from, eval_split = eval_source(cfg.dataset, cfg.eval_dataset, cfg.eval_split)
    if eval_from is not None and not cfg.from_feedback:
        held_out, ecounts, _ = load_comparisons(cfg, read_records(eval_from, eval_split), tokenizer, printer)
        counts.update({f"eval_{k}": v for k, v in ecounts.items()})
    else:
        train, held_out = _split(train, cfg.eval_fraction, cfg.seed)
    return train, held_out, counts, skipped


def _split(comps: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0:
        return comps, []
    order = torch.randperm(len(comps), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    n_eval = max(1, int(round(fraction * len(comps))))
    return [comps[i] for i in order[n_eval:]], [comps[i] for i in order[:n_eval]]


@one_run_per_folder
def main(cfg: Config, printer=print) -> dict:
    """Train (an ensemble of) reward models; returns the final metrics, also written to results.json."""


    is_main = PartialState(cpu=multi_process_cpu()).is_main_process
    out = prepare_run_dir(cfg.output_dir, cfg, is_main)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, distinct_pad=True)
    train, eval_units, counts, skipped = load_data(cfg, tokenizer, printer)
    for what, n in sorted(counts.items()):
        printer(f"reward: {n} {what.replace('_', ' ')} (max_length={cfg.max_length}, loss={cfg.loss})")
    if len(train) < cfg.per_device_train_batch_size:
        raise ConfigError(f"config field 'per_device_train_batch_size': {cfg.per_device_train_batch_size} is more than the "
                          f"{len(train)} training comparisons")
    printer(f"reward: {len(train)} training and {len(eval_units)} held-out comparisons "
            f"({sum(c.ranked for c in train)} rankings)")
    n_models = cfg.ensemble_size if cfg.ensemble_mode == "models" else 1
    results: dict[str, Any] = {"members": [], "counts": dict(counts), "skipped": dict(skipped)}
    names = []
    for m in range(n_models):
        name = f"member-{m}"
        member_out = out if n_models == 1 else out / "members" / name
        done = member_out / "member_results.json"
        if n_models > 1 and cfg.resume and done.is_file() and (member_out / "final" / "config.json").is_file():
            printer(f"reward: {name} already trained, kept")  # resuming an ensemble skips finished members
            final = json.loads(done.read_text())
        else:
            _, final = train_one(cfg, m, train, eval_units, tokenizer, member_out, printer)
        results["members"].append(final)
        names.append(name)
    if n_models > 1 and is_main:
        _assemble_ensemble(out, names, cfg)
    results.update({k: v for k, v in results["members"][0].items() if k.startswith("eval_")})
    if n_models > 1 and eval_units:
        for key in ("eval_accuracy", "eval_loss"):
            vals = [r[key] for r in results["members"] if key in r]
            if vals:
                results[f"{key}_members_mean"] = float(np.mean(vals))
    results["model_path"] = str(out / "final")
    if is_main:
        atomic_write_json(out / "results.json", results)
    return results


def _assemble_ensemble(out: Path, names: list[str], cfg: Config) -> None:
    """final/ = ensemble.json + member-i folders (copied from members/member-i/final), atomically."""

    with atomic_path(out / "final") as tmp:
        tmp.mkdir()
        for name in names:
            shutil.copytree(out / "members" / name / "final", tmp / name)
        for fname, text in write_ensemble_manifest(tmp, names, {"seeds": [cfg.seed + i for i in range(len(names))]}).items():
            (tmp / fname).write_text(text)

"""Train a reward model from pairwise preferences or K-way rankings.

Data: TRL-style preference records (`prompt`/`chosen`/`rejected`, plain text or conversations,
optional `margin`, optional `label` = P(chosen preferred) with 0.5 a tie, or `tie: true`,
optional `annotator_id`), ranking records (`prompt`/`responses`/`ranking`, best first), a mix
of both, or labels straight from the feedback database (`--from_feedback DB_URL`).

Chosen and rejected rows go through one forward pass; the K responses of a ranking too, and
all C(K, 2) comparisons are formed from those K rewards. After training, the reward mean and
standard deviation over the training responses are saved with the model.

    rlhfkit reward --model runs/sft/final --dataset prefs.jsonl --output_dir runs/rm
    rlhfkit reward --model kindly --dataset ranks.jsonl --ranking_loss plackett_luce
    rlhfkit reward --dataset prefs.jsonl --ensemble_size 4 --ensemble_mode heads
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhfkit.config import ModelArgs, SplitArgs, TrainArgs, require
from rlhfkit.data.comparisons import collate_units, load_comparisons, report_skips, tokenize_units
from rlhfkit.data.readers import eval_source
from rlhfkit.errors import ConfigError
from rlhfkit.losses.reward import PAIR_LOSSES, RANKING_LOSSES, reward_centering_penalty
from rlhfkit.train.memory import report_for_run
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
from rlhfkit.train.runs import (
    MetricsLogger,
    atomic_path,
    atomic_write_json,
    one_run_per_folder,
    prepare_run_dir,
)
from rlhfkit.train.sharding import full_state_dict, is_sharded, shard_layers_of, unsharded_copy


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


def batch_loss(module: torch.nn.Module, batch: dict, cfg: Config, weights: torch.Tensor | None = None,
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
def evaluate(module: torch.nn.Module, units: list[dict], cfg: Config, pad_id: int, device: Any) -> dict[str, float]:
    """Held-out loss and accuracy (pairs: reward gap sign vs label, ties excluded; rankings: pair order)."""
    was = module.training
    module.eval()
    units = units[: cfg.max_eval_examples]
    totals: Counter = Counter()
    bs = cfg.per_device_train_batch_size * 2
    for i in range(0, len(units), bs):
        chunk = units[i:i + bs]
        loss, m = batch_loss(module, collate_units(chunk, pad_id), cfg, device=device)
        totals["loss"] += float(loss) * len(chunk)
        decisive = sum(1 for u in chunk if u["kind"] == "pair" and u["label"] != 0.5)
        ranks = sum(1 for u in chunk if u["kind"] == "rank")
        totals["acc"] += m.get("accuracy", 0.0) * decisive
        totals["n_acc"] += decisive
        totals["racc"] += m.get("ranking_accuracy", 0.0) * ranks
        totals["n_racc"] += ranks
    module.train(was)
    out = {"eval_loss": totals["loss"] / max(len(units), 1), "eval_examples": len(units)}
    if totals["n_acc"]:
        out["eval_accuracy"] = totals["acc"] / totals["n_acc"]
    if totals["n_racc"]:
        out["eval_ranking_accuracy"] = totals["racc"] / totals["n_racc"]
    return out


def _load_model(cfg: Config, heads: int, seed: int, tokenizer: Any):
    from rlhfkit.models import check_max_length, disable_dropout, load_reward_model

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


def train_one(cfg: Config, member: int, train: list[dict], eval_units: list[dict], tokenizer: Any,
              out: Path, printer=print) -> tuple[Any, dict]:
    """Train one reward model, save it to out/final; returns (unwrapped module, final metrics).

    Resumable from out/checkpoints.
    """
    from rlhfkit.train.accelerator import make_accelerator
    from rlhfkit.train.batches import iterate_batches, micro_steps_per_epoch
    from rlhfkit.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
    from rlhfkit.train.optim import make_optimizer, make_scheduler
    from rlhfkit.train.step import check_finite

    seed = cfg.seed + member
    heads = cfg.ensemble_size if cfg.ensemble_mode == "heads" else 1
    acc = make_accelerator(dataclasses.replace(cfg, seed=seed))
    module = LastTokenReward(_load_model(cfg, heads, seed, tokenizer))
    unwrap_hf(module.model).config.pad_token_id = tokenizer.pad_token_id
    report_for_run(acc, unwrap_hf(module.model), cfg, batch=2 * cfg.per_device_train_batch_size,
                   seq_len=cfg.max_length, outputs=heads)
    if cfg.padding_free:
        probe = collate_units(train[: cfg.per_device_train_batch_size], tokenizer.pad_token_id)
        module.padding_free = padding_free_matches(module, probe.rows.input_ids, probe.rows.attention_mask)
        if not module.padding_free:
            printer(f"reward: {type(unwrap_hf(module.model)).__name__} does not honour packed position ids; "
                    "training with padding instead")
    boot = None
    if heads > 1 and cfg.bootstrap_heads:
        boot = torch.poisson(torch.ones(len(train), heads), generator=torch.Generator().manual_seed(seed))
    nproc, accum = acc.num_processes, cfg.gradient_accumulation_steps
    per_epoch = micro_steps_per_epoch(len(train), cfg.per_device_train_batch_size, nproc)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.num_train_epochs * per_epoch) // accum)
    optimizer = make_optimizer(module, cfg)
    scheduler = make_scheduler(optimizer, cfg, total)
    shard_layers_of(module, unwrap_hf(module.model))
    module, optimizer = acc.prepare(module, optimizer)
    sharded = is_sharded(acc)
    acc.register_for_checkpointing(scheduler)
    step = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        step = load_checkpoint(acc, ckpt)["step"]
        printer(f"reward: member {member} resumed from {ckpt} at step {step}")
    logger = MetricsLogger(out, cfg.report_to, enabled=acc.is_main_process)
    bar = tqdm(total=total, initial=step, desc=f"reward[{member}]", disable=not (cfg.progress and acc.is_main_process))
    t0, tokens, window, metrics = time.perf_counter(), 0, [], {}
    module.train()
    for micro, local, _ in iterate_batches(len(train), cfg.per_device_train_batch_size, seed, step * accum,
                                           total * accum, nproc, acc.process_index):
        batch = collate_units([train[i] for i in local], tokenizer.pad_token_id)
        sync = (micro + 1) % accum == 0
        with contextlib.nullcontext() if sync or nproc == 1 else acc.no_sync(module):
            loss, m = batch_loss(module, batch, cfg, None if boot is None else boot[local], acc.device)
            check_finite("reward-model loss", loss)
            acc.backward(loss)  # accelerate divides by gradient_accumulation_steps itself
        tokens += int(batch.rows.attention_mask.sum()) * nproc
        window.append(m)
        if not sync:
            continue
        grad_norm = acc.clip_grad_norm_(module.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        if grad_norm is not None:
            check_finite("gradient norm", grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        metrics = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
        metrics.update(lr=scheduler.get_last_lr()[0], tokens_per_s=tokens / (time.perf_counter() - t0))
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        window = []
        if step % cfg.logging_steps == 0 or step == total:
            logger.log(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        # a sharded model all-gathers in every forward: every process evaluates (the same units) then
        if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and eval_units and (acc.is_main_process or sharded):
            logger.log(evaluate(acc.unwrap_model(module), eval_units, cfg, tokenizer.pad_token_id, acc.device), step)
        if cfg.save_steps > 0 and step % cfg.save_steps == 0:
            save_checkpoint(acc, out, step, {"member": member})
    bar.close()
    final = dict(metrics, steps=step, seconds=time.perf_counter() - t0)
    module = acc.unwrap_model(module)
    if eval_units:
        final.update(evaluate(module, eval_units, cfg, tokenizer.pad_token_id, acc.device))
        logger.log({k: v for k, v in final.items() if k.startswith("eval_")}, step)
    logger.close()
    state = full_state_dict(acc, module)  # all processes: gathers a sharded model onto the main one
    if acc.is_main_process:  # one writer; the others wait so every process returns a saved model
        whole = module if state is None else LastTokenReward(
            unsharded_copy(module.model, {k.removeprefix("model."): v for k, v in state.items()}), module.padding_free)
        final["stats"] = save_reward_model(whole, tokenizer, out / "final", train, cfg)
        atomic_write_json(out / "member_results.json", final)
    acc.wait_for_everyone()
    return module, final


def save_reward_model(module: LastTokenReward, tokenizer: Any, path: Path, train: list[dict], cfg: Config) -> dict | None:
    """Save in HF format with the normalisation statistics of the training responses."""
    from rlhfkit.models import save_model

    extra, stats = {}, None
    if cfg.normalize:
        seqs, seen = [], set()
        for u in train:
            for row in u["rows"]:
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


def _split(units: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if fraction <= 0:
        return units, []
    order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    n_eval = max(1, int(round(fraction * len(units))))
    return [units[i] for i in order[n_eval:]], [units[i] for i in order[:n_eval]]


@one_run_per_folder
def main(cfg: Config, printer=print) -> dict:
    """Train (an ensemble of) reward models; returns the final metrics, also written to results.json."""
    from accelerate import PartialState

    from rlhfkit.models import load_tokenizer
    from rlhfkit.train.accelerator import multi_process_cpu

    is_main = PartialState(cpu=multi_process_cpu()).is_main_process
    out = prepare_run_dir(cfg.output_dir, cfg, is_main)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, distinct_pad=True)
    comps = load_comparisons(cfg.dataset, cfg.dataset_split, cfg.on_bad_record, tokenizer, cfg.from_feedback)
    report_skips(comps, "training", printer)
    units, counts = tokenize_units(comps, tokenizer, cfg.max_length, cfg.loss, cfg.max_prompt_length)
    eval_from, eval_split = eval_source(cfg.dataset, cfg.eval_dataset, cfg.eval_split)
    if eval_from is not None and not cfg.from_feedback:
        ecomps = load_comparisons(eval_from, eval_split, cfg.on_bad_record, tokenizer)
        report_skips(ecomps, "held-out", printer)
        eval_units, ecounts = tokenize_units(ecomps, tokenizer, cfg.max_length, cfg.loss, cfg.max_prompt_length)
        counts.update({f"eval_{k}": v for k, v in ecounts.items()})
        train = units
    else:
        train, eval_units = _split(units, cfg.eval_fraction, cfg.seed)
    for what, n in sorted(counts.items()):
        printer(f"reward: {n} {what.replace('_', ' ')} (max_length={cfg.max_length}, loss={cfg.loss})")
    if len(train) < cfg.per_device_train_batch_size:
        raise ConfigError(f"config field 'per_device_train_batch_size': {cfg.per_device_train_batch_size} is more than the "
                          f"{len(train)} training comparisons")
    printer(f"reward: {len(train)} training and {len(eval_units)} held-out comparisons "
            f"({sum(u['kind'] == 'rank' for u in train)} rankings)")
    n_models = cfg.ensemble_size if cfg.ensemble_mode == "models" else 1
    results: dict[str, Any] = {"members": [], "counts": dict(counts), "skipped": dict(comps.skipped)}
    names = []
    for m in range(n_models):
        name = f"member-{m}"
        member_out = out if n_models == 1 else out / "members" / name
        done = member_out / "member_results.json"
        if n_models > 1 and cfg.resume and done.is_file() and (member_out / "final" / "config.json").is_file():
            import json

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
    import shutil

    with atomic_path(out / "final") as tmp:
        tmp.mkdir()
        for name in names:
            shutil.copytree(out / "members" / name / "final", tmp / name)
        for fname, text in write_ensemble_manifest(tmp, names, {"seeds": [cfg.seed + i for i in range(len(names))]}).items():
            (tmp / fname).write_text(text)

"""Supervised fine-tuning: next-token loss on completion tokens only.

Data: any TRL-style SFT data (`prompt`/`completion`, `messages`, or `text`) from JSONL,
parquet, a saved HF dataset, or `kindly` for the bundled task's sentence continuations.
Prompt tokens are masked out of the loss; `--packing` concatenates examples into full rows.

    rlhfkit sft --model kindly --dataset kindly --output_dir runs/sft
    accelerate launch --num_processes 2 -m rlhfkit.cli sft --model kindly --dataset kindly
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhfkit.config import ModelArgs, SplitArgs, TrainArgs, require
from rlhfkit.data.readers import eval_source
from rlhfkit.losses.sft import sft_loss
from rlhfkit.train.memory import report_for_run
from rlhfkit.models import check_max_length, load_policy, load_tokenizer, save_model
from rlhfkit.train.runs import MetricsLogger, atomic_write_json, one_run_per_folder, prepare_run_dir
from rlhfkit.train.sharding import full_state_dict
from rlhfkit.train.accelerator import make_accelerator
from rlhfkit.train.batches import iterate_batches, micro_steps_per_epoch
from rlhfkit.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhfkit.train.optim import make_optimizer, make_scheduler
from rlhfkit.train.step import check_finite


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs, SplitArgs):
    dataset: str = "kindly"
    """Training data: a .jsonl/.parquet file, a saved HF dataset folder, a hub name, or 'kindly'."""
    eval_dataset: str = ""
    """Held-out data for loss and perplexity (default: the test/eval/validation split of `dataset` when it has one)."""
    max_length: int = 128
    """Longest tokenised example (prompt + completion); longer ones are truncated and counted."""
    packing: bool = False
    """Concatenate examples into rows of max_length tokens (no padding)."""
    completion_only_loss: bool = True
    """Mask prompt tokens out of the loss (False: train on the whole sequence)."""
    max_eval_examples: int = 512
    """Cap on held-out examples scored at each evaluation."""

    def __post_init__(self) -> None:
        self._check_train_args()
        require(self.max_length >= 8, "max_length", "must be >= 8")
        if not self.model:
            self.model = "kindly"


# ---------------------------------------------------------------------------------------------
# data


def load_sft_examples(source, tokenizer, max_length: int, split: str = "train",
                      completion_only: bool = True, max_prompt_length: int = 0) -> tuple[list[dict], int]:
    """Tokenise SFT records into prompt-masked examples; returns (examples, n_truncated).

    `source` is a path/name, a `datasets.Dataset` or a list of records. Truncation follows the
    one rule of :mod:`rlhfkit.data.collate` (docs/data.md): a prompt keeps its end, a response
    its start, and an over-long prompt is cut to leave room for the response, so every
    example keeps at least one supervised token. Examples whose prompt was cut are counted
    in `load_sft_examples.last_prompt_truncated` for the caller to report.
    """
    from rlhfkit.data import encode_prompt_completion, load_records, to_prompt_completion
    from rlhfkit.data.schemas import SFT_FORMATS, require_layout

    if source == "kindly":
        from rlhfkit.tasks import kindly

        records = kindly.sft_records(split)
    else:
        records = load_records(source, split=split)
    if not records:
        from rlhfkit.errors import DataError

        raise DataError(f"the dataset is empty (split '{split}')", source=getattr(records, "source", None) or str(source))
    require_layout(records, SFT_FORMATS, "SFT")  # a wrong-column file fails naming its file and line
    examples, truncated, prompt_cut = [], 0, 0
    for rec in records:
        prompt, completion = to_prompt_completion(rec, tokenizer)
        enc = encode_prompt_completion(tokenizer, prompt, completion, max_length=max_length,
                                       max_prompt_length=max_prompt_length or None)
        truncated += enc.truncated
        prompt_cut += enc.prompt_truncated
        ex = enc.as_dict()
        if not completion_only:
            ex["labels"] = list(ex["input_ids"])
        ex["labels"] = ignore_unknown(ex["labels"], getattr(tokenizer, "unk_token_id", None))
        examples.append(ex)
    load_sft_examples.last_prompt_truncated = prompt_cut
    return examples, truncated


def ignore_unknown(labels: list[int], unk_id: int | None) -> list[int]:
    """Labels with the tokenizer's unknown token ignored (-100): the text there is a word the
    vocabulary lacks, and a model taught to predict `<unk>` writes it at sampling time, where it
    decodes to nothing (a word-level tokenizer's out-of-vocabulary words)."""
    if unk_id is None:
        return labels
    return [-100 if t == unk_id else t for t in labels]


def pack_examples(examples: list[dict], max_length: int, eos_id: int) -> list[dict]:
    from rlhfkit.data import pack_sequences

    return pack_sequences(examples, max_length, eos_id)


def count_targets(ex: dict) -> int:
    # labels are aligned with input_ids; the first position is never predicted
    return sum(1 for t in ex["labels"][1:] if t != -100)


# ---------------------------------------------------------------------------------------------
# the loop


@torch.no_grad()
def evaluate_lm(model, examples: list[dict], collate, batch_size: int, accelerator) -> dict[str, float]:
    """Held-out token loss and perplexity over `examples` (all processes score their share)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine = examples[accelerator.process_index::accelerator.num_processes]
    for i in range(0, len(mine), batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate(mine[i:i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        _, m = sft_loss(logits, batch["labels"])
        total += torch.stack([m["nll_sum"].double(), m["tokens"].double()])
    total = accelerator.reduce(total, reduction="sum") if accelerator.num_processes > 1 else total
    model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(total[1].item())}


def train_causal_lm(cfg: Any, model, tokenizer, train: list[dict], eval_examples: list[dict],
                    accelerator, output_dir: Path, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train `model` on tokenised examples (input_ids, labels[, position_ids]); return final metrics.

    Shared by `sft` and `pretrain`. `on_step(step, metrics)` is called after every optimiser
    step (for callbacks; raising from it stops the run, e.g. to simulate a crash in tests).
    """
    from rlhfkit.data import PadCollator

    collate = PadCollator(tokenizer.pad_token_id, padding_side="right")
    nproc, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.gradient_accumulation_steps
    per_epoch = micro_steps_per_epoch(len(train), cfg.per_device_train_batch_size, nproc)
    total_opt_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.num_train_epochs * per_epoch) // accum)
    optimizer = make_optimizer(model, cfg)
    # the scheduler is stepped by hand once per optimiser step: accelerate's wrapper would
    # step it once per process, which changes the schedule with the process count.
    scheduler = make_scheduler(optimizer, cfg, total_opt_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    ckpt = latest_checkpoint(output_dir) if cfg.resume else None
    if ckpt is not None:
        step = load_checkpoint(accelerator, ckpt)["step"]
        accelerator.print(f"resumed from {ckpt} at step {step}")
    targets = [count_targets(ex) for ex in train]
    logger = MetricsLogger(output_dir, cfg.report_to, enabled=accelerator.is_main_process)
    bar = tqdm(total=total_opt_steps, initial=step, desc="train", disable=not (cfg.progress and accelerator.is_main_process))
    model.train()
    t0, tokens_seen, step_items, window_loss = time.perf_counter(), 0, 0, []
    metrics: dict[str, float] = {}
    batches = iterate_batches(len(train), cfg.per_device_train_batch_size, cfg.seed, step * accum,
                              total_opt_steps * accum, nproc, rank)
    for micro, local, _ in batches:
        if micro % accum == 0:  # supervised tokens of the whole optimiser step, all processes
            step_items = sum(targets[i] for _, _, g in iterate_batches(
                len(train), cfg.per_device_train_batch_size, cfg.seed, micro, micro + accum, nproc, rank) for i in g)
        batch = {k: v.to(accelerator.device) for k, v in collate([train[i] for i in local]).items()}
        sync = (micro + 1) % accum == 0
        with contextlib.nullcontext() if sync or nproc == 1 else accelerator.no_sync(model):
            # use_cache=False: no KV cache is needed in training, and with packed rows (no
            # attention mask, restarted position_ids) it is what keeps attention per document
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            logits = model(**inputs, use_cache=False).logits
            # one convention for every recipe: backward(loss), and accelerate divides by the
            # accumulation steps. The sum is normalised by the whole step's token count (all
            # micro-batches and processes); the factors nproc (DDP averages over processes) and
            # accum (accelerate's division) make the step's gradient that of one big batch.
            loss, m = sft_loss(logits, batch["labels"], num_items=step_items / (nproc * accum))
            check_finite("loss", loss)
            accelerator.backward(loss)
        # packed rows carry no attention_mask (see rlhfkit.data.packing): count their real tokens
        real = batch["attention_mask"] if "attention_mask" in batch else batch["document_ids"] >= 0
        tokens_seen += int(real.sum()) * nproc
        window_loss.append((m["nll_sum"].item(), m["tokens"].item()))
        if not sync:
            continue
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        if grad_norm is not None:
            check_finite("gradient norm", grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        nll, ntok = map(sum, zip(*window_loss))
        metrics = {"loss": nll / max(ntok, 1), "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": tokens_seen / (time.perf_counter() - t0), "epoch": micro / max(per_epoch, 1)}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        window_loss = []
        if step % cfg.logging_steps == 0 or step == total_opt_steps:
            logger.log(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and eval_examples:
            logger.log(evaluate_lm(model, eval_examples, collate, cfg.per_device_train_batch_size * 2, accelerator), step)
        if cfg.save_steps > 0 and step % cfg.save_steps == 0:
            save_checkpoint(accelerator, output_dir, step)
        if on_step is not None:
            on_step(step, metrics)
    bar.close()
    final = dict(metrics, steps=step, seconds=time.perf_counter() - t0)
    if eval_examples:
        final.update(evaluate_lm(model, eval_examples, collate, cfg.per_device_train_batch_size * 2, accelerator))
        logger.log({k: v for k, v in final.items() if k.startswith("eval_")}, step)
    logger.close()
    accelerator.wait_for_everyone()
    state = full_state_dict(accelerator, model)  # all processes: gathers a sharded model
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, output_dir / "final",
                   merge_lora=getattr(cfg, "merge_lora", True), state_dict=state)
        atomic_write_json(output_dir / "results.json", final)
    accelerator.wait_for_everyone()
    return final


@one_run_per_folder
def main(cfg: Config, on_step: Callable[[int, dict], None] | None = None) -> dict:
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    model = load_policy(cfg.model, cfg.dtype, lora=cfg, attn_implementation=cfg.attn_implementation,
                        gradient_checkpointing=cfg.gradient_checkpointing)
    check_max_length(model, cfg.max_length)
    report_for_run(accelerator, model, cfg, batch=cfg.per_device_train_batch_size, seq_len=cfg.max_length)
    out = prepare_run_dir(cfg.output_dir, cfg, accelerator.is_main_process)  # only once the model loaded
    train, n_trunc = load_sft_examples(cfg.dataset, tokenizer, cfg.max_length, cfg.dataset_split, cfg.completion_only_loss,
                                       cfg.max_prompt_length)
    if isinstance(cfg.dataset, str) and cfg.dataset == "kindly" and not cfg.eval_dataset:
        eval_from, eval_split = "kindly", "eval"
    else:
        eval_from, eval_split = eval_source(cfg.dataset, cfg.eval_dataset, cfg.eval_split)
    eval_examples: list[dict] = []
    if eval_from is not None:
        eval_examples, _ = load_sft_examples(eval_from, tokenizer, cfg.max_length, eval_split, cfg.completion_only_loss,
                                             cfg.max_prompt_length)
        eval_examples = eval_examples[: cfg.max_eval_examples]
    if n_trunc:
        cut = load_sft_examples.last_prompt_truncated
        accelerator.print(f"sft: {n_trunc} of {len(train)} training examples were longer than max_length={cfg.max_length} "
                          f"and were truncated ({cut} of them had their prompt cut from the left; responses keep their start)")
    if cfg.packing:
        train = pack_examples(train, cfg.max_length, tokenizer.eos_token_id)
    accelerator.print(f"sft: {len(train)} training rows, {len(eval_examples)} held-out examples")
    return train_causal_lm(cfg, model, tokenizer, train, eval_examples, accelerator, out, on_step)

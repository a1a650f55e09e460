"""Supervised fine-tuning: next-token loss on completion tokens only.

Data: any TRL-style SFT data (`prompt`/`completion`, `messages`, or `text`) from JSONL,
parquet, a saved HF dataset, or `kindly` for the bundled task's sentence continuations.
Prompt tokens are masked out of the loss; `--packing` concatenates examples into full rows.

    rlhfkit sft --model kindly --dataset kindly --output_dir runs/sft
    accelerate launch --num_processes 2 -m rlhfkit.cli sft --model kindly --dataset kindly
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from rlhfkit.config import ModelArgs, SplitArgs, TrainArgs, require
from rlhfkit.data import (
    PadCollator,
    encode_prompt_completion,
    load_records,
    pack_sequences,
    to_prompt_completion,
)
from rlhfkit.data.readers import eval_source, line_of, source_of
from rlhfkit.data.schemas import SFT_FORMATS, require_layout
from rlhfkit.data.turns import encode_conversation, is_multi_turn
from rlhfkit.errors import DataError
from rlhfkit.losses.sft import sft_loss
from rlhfkit.models import check_max_length, load_policy, load_tokenizer, save_model
from rlhfkit.tasks import kindly
from rlhfkit.train.accelerator import make_accelerator
from rlhfkit.train.batches import micro_steps_per_epoch, optimizer_steps, total_optimizer_steps
from rlhfkit.train.checkpoints import save_checkpoint
from rlhfkit.train.memory import report_for_run
from rlhfkit.train.optim import prepare_training
from rlhfkit.train.runs import MetricsLogger, atomic_write_json, one_run_per_folder, prepare_run_dir
from rlhfkit.train.sharding import full_state_dict
from rlhfkit.train.step import accumulate, backward, optimizer_step


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


class SFTExamples(NamedTuple):
    examples: list[dict]
    truncated: int
    """Examples longer than max_length (truncated)."""
    prompt_truncated: int
    """Of those, examples whose prompt was cut (from the left)."""


def load_sft_examples(source, tokenizer, max_length: int, split: str = "train",
                      completion_only: bool = True, max_prompt_length: int = 0) -> SFTExamples:
    """Tokenise SFT records into prompt-masked examples, with truncation counts.

    `source` is a path/name, a `datasets.Dataset` or a list of records. Truncation follows the
    one rule of :mod:`rlhfkit.data.collate` (docs/data.md): a prompt keeps its end, a response
    its start, and an over-long prompt is cut to leave room for the response, so every
    example keeps at least one supervised token.
    """

    if source == "kindly":
        records = kindly.sft_records(split)
    else:
        records = load_records(source, split=split)
    if not records:
        raise DataError(f"the dataset is empty (split '{split}')", source=getattr(records, "source", None) or str(source))
    require_layout(records, SFT_FORMATS, "SFT")  # a wrong-column file fails naming its file and line
    examples, truncated, prompt_cut = [], 0, 0
    for index, rec in enumerate(records):
        if is_multi_turn(rec):  # tool-call traces: the loss on every assistant turn (rlhfkit.data.turns)
            try:
                enc = encode_conversation(tokenizer, rec["messages"], rec.get("tools"), max_length)
            except DataError as e:  # name the file and line of the conversation
                raise DataError(e.message, source=source_of(records), line=line_of(records, index), field=e.field) from None
            truncated += enc.pop("truncated")
            enc["labels"] = ignore_unknown(list(enc["input_ids"]) if not completion_only else enc["labels"],
                                           getattr(tokenizer, "unk_token_id", None))
            examples.append(enc)
            continue
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
    return SFTExamples(examples, truncated, prompt_cut)


def ignore_unknown(labels: list[int], unk_id: int | None) -> list[int]:
    """Labels with the tokenizer's unknown token ignored (-100): the text there is a word the
    vocabulary lacks, and a model taught to predict `<unk>` writes it at sampling time, where it
    decodes to nothing (a word-level tokenizer's out-of-vocabulary words)."""
    if unk_id is None:
        return labels
    return [-100 if t == unk_id else t for t in labels]


def pack_examples(examples: list[dict], max_length: int, eos_id: int) -> list[dict]:
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
    collate = PadCollator(tokenizer.pad_token_id, padding_side="right")
    nproc, rank = accelerator.num_processes, accelerator.process_index
    total_steps = total_optimizer_steps(len(train), cfg, nproc)
    model, optimizer, scheduler, step = prepare_training(accelerator, model, cfg, total_steps, output_dir, "sft")
    targets = [count_targets(ex) for ex in train]
    logger = MetricsLogger(output_dir, cfg.report_to, enabled=accelerator.is_main_process)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (cfg.progress and accelerator.is_main_process))
    model.train()
    t0, tokens_seen, metrics = time.perf_counter(), 0, {}
    per_epoch = micro_steps_per_epoch(len(train), cfg.per_device_train_batch_size, nproc)
    for batches in optimizer_steps(len(train), cfg, step, total_steps, nproc, rank):
        # the step's supervised tokens over all processes (from the global indices, no communication)
        step_items = sum(targets[i] for _, _, g in batches for i in g)
        nll, ntok, real = 0.0, 0, 0
        for j, (_, local, _) in enumerate(batches):
            batch = {k: v.to(accelerator.device) for k, v in collate([train[i] for i in local]).items()}
            with accumulate(accelerator, [model], last=j == len(batches) - 1):
                m = sft_micro_batch(model, batch, step_items / nproc, accelerator)
            nll, ntok = nll + m["nll_sum"].item(), ntok + m["tokens"].item()
            # packed rows carry no attention_mask (see rlhfkit.data.packing): count their real tokens
            real += int((batch["attention_mask"] if "attention_mask" in batch else batch["document_ids"] >= 0).sum())
        grad_norm = optimizer_step(accelerator, [model], [optimizer], [scheduler], cfg.max_grad_norm)
        step, tokens_seen = step + 1, tokens_seen + real * nproc
        bar.update(1)
        metrics = {"loss": nll / max(ntok, 1), "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": tokens_seen / (time.perf_counter() - t0), "epoch": batches[-1][0] / max(per_epoch, 1)}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        if step % cfg.logging_steps == 0 or step == total_steps:
            logger.log(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and eval_examples:
            logger.log(evaluate_lm(model, eval_examples, collate, cfg.per_device_train_batch_size * 2, accelerator), step)
        if cfg.save_steps > 0 and step % cfg.save_steps == 0:
            save_checkpoint(accelerator, output_dir, step)
        if on_step is not None:
            on_step(step, metrics)
    return finish_causal_lm(cfg, model, tokenizer, eval_examples, accelerator, output_dir, logger, bar,
                            dict(metrics, steps=step, seconds=time.perf_counter() - t0), collate)


def sft_micro_batch(model, batch: dict, step_tokens: float, accelerator) -> dict:
    """Forward and backward of one micro-batch; its summed token loss is divided by the optimiser
    step's supervised tokens per process (rlhfkit.train.step's convention)."""
    # use_cache=False: no KV cache is needed in training, and with packed rows (no attention
    # mask, restarted position_ids) it is what keeps attention per document
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits
    loss, m = sft_loss(logits, batch["labels"], num_items=step_tokens)
    backward(accelerator, loss, "loss")
    return m


def finish_causal_lm(cfg, model, tokenizer, eval_examples, accelerator, output_dir: Path, logger, bar, final: dict,
                     collate) -> dict:
    """Held-out evaluation, then the final model and results.json."""
    bar.close()
    step = final["steps"]
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
    train, n_trunc, cut = load_sft_examples(cfg.dataset, tokenizer, cfg.max_length, cfg.dataset_split, cfg.completion_only_loss,
                                       cfg.max_prompt_length)
    if isinstance(cfg.dataset, str) and cfg.dataset == "kindly" and not cfg.eval_dataset:
        eval_from, eval_split = "kindly", "eval"
    else:
        eval_from, eval_split = eval_source(cfg.dataset, cfg.eval_dataset, cfg.eval_split)
    eval_examples: list[dict] = []
    if eval_from is not None:
        eval_examples = load_sft_examples(eval_from, tokenizer, cfg.max_length, eval_split, cfg.completion_only_loss,
                                             cfg.max_prompt_length).examples
        eval_examples = eval_examples[: cfg.max_eval_examples]
    if n_trunc:
        accelerator.print(f"sft: {n_trunc} of {len(train)} training examples were longer than max_length={cfg.max_length} "
                          f"and were truncated ({cut} of them had their prompt cut from the left; responses keep their start)")
    if cfg.packing:
        train = pack_examples(train, cfg.max_length, tokenizer.eos_token_id)
    accelerator.print(f"sft: {len(train)} training rows, {len(eval_examples)} held-out examples")
    return train_causal_lm(cfg, model, tokenizer, train, eval_examples, accelerator, out, on_step)

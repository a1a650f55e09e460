"""`rlhfkit ilql`: offline RL from logged responses with scalar rewards (Snell et al. 2022, ILQL, as trlX
implements it; the losses and the decoding rule are in rlhfkit.losses.ilql, the heads in rlhfkit.models.ilql).

    rlhfkit ilql --model runs/sft/final --dataset rated.jsonl --output_dir runs/ilql
    rlhfkit sample --model runs/ilql/final ...   # the plain LM (pi_beta); decode with the heads from Python:
    rlhfkit.models.ilql.load_ilql_policy("runs/ilql/final", beta=4)

Data: one record per logged response, `prompt`, `completion` and a scalar `reward` (`--reward_column`),
e.g. rated traffic from the feedback service or scored samples. As in trlX the rewards are
standardised over the data set (zero mean, unit variance) and given on each response's last token
(its EOS). No reward model, no sampling during training: one pass of supervised-style batches.

Each optimiser step: the LM's forward with its last hidden states, the heads on them, the loss
(Q, expectile V, CQL and the LM's cross entropy), and every `target_sync_steps` steps the target Q
heads move toward the Q heads by `alpha` (Polyak). Written: final/ (the LM, saved as usual, with
ilql_heads.safetensors and ilql_heads.json beside it), metrics.jsonl, results.json.

When to use it instead of DPO or KTO: docs/ilql.md.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rlhfkit.config import ModelArgs, TrainArgs, require
from rlhfkit.data import load_records
from rlhfkit.data.collate import encode_prompt_completion
from rlhfkit.errors import DataError
from rlhfkit.losses.ilql import ilql_loss, terminal_rewards
from rlhfkit.models import load_policy, load_tokenizer, save_model
from rlhfkit.models.ilql import ILQLHeads
from rlhfkit.train.accelerator import make_accelerator
from rlhfkit.train.batches import optimizer_steps, total_optimizer_steps
from rlhfkit.train.optim import prepare_training
from rlhfkit.train.runs import MetricsLogger, atomic_write_json, one_run_per_folder, prepare_run_dir
from rlhfkit.train.step import accumulate, backward, optimizer_step


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs):
    dataset: str = ""
    """Logged responses: JSONL/JSON/parquet/dataset with prompt, completion and a scalar reward column."""
    reward_column: str = "reward"
    """Column holding each response's scalar reward."""
    max_prompt_length: int = 64
    """Prompts longer than this many tokens keep their last tokens."""
    max_completion_length: int = 32
    """Responses longer than this many tokens (EOS included) are cut."""
    gamma: float = 0.99
    """Discount of the Bellman target."""
    tau: float = 0.7
    """Expectile of the V loss (0.5: V is the mean of Q over the data's tokens; toward 1: their best)."""
    cql_scale: float = 0.1
    """Weight of the conservative (CQL) loss."""
    awac_scale: float = 1.0
    """Weight of the LM's cross entropy on the data (the behaviour policy the decoding starts from)."""
    alpha: float = 0.001
    """Polyak rate of the target Q heads."""
    target_sync_steps: int = 5
    """Optimiser steps between two Polyak updates of the target Q heads."""
    two_qs: bool = True
    """Two Q heads, the minimum of their targets (double Q-learning)."""
    beta: float = 1.0
    """Decoding weight of the advantage, recorded in ilql_heads.json as the default of load_ilql_policy."""
    output_dir: str = "runs/ilql"
    """Folder for final/, metrics.jsonl and results.json."""
    learning_rate: float = 5e-5
    """Learning rate of the LM and the heads."""

    def __post_init__(self) -> None:
        self._check_train_args()
        require(bool(self.model), "model", "give the policy to start from (e.g. the SFT model)")
        require(bool(self.dataset), "dataset", "give the logged responses with their rewards")
        require(0 < self.tau < 1 and 0 <= self.gamma <= 1, "tau", "tau must be in (0, 1) and gamma in [0, 1]")
        require(0 < self.alpha <= 1 and self.target_sync_steps >= 1, "alpha", "alpha in (0, 1], target_sync_steps >= 1")
        require(self.cql_scale >= 0 and self.awac_scale >= 0, "cql_scale", "loss weights must be >= 0")


class ILQLModel(nn.Module):
    """The LM and its heads as one module, so one optimiser and accelerate's prepare cover both."""

    def __init__(self, lm: nn.Module, heads: ILQLHeads):
        super().__init__()
        self.lm, self.heads = lm, heads

    def forward(self, input_ids, attention_mask, response_width: int):
        """(LM logits, Q heads, target Q heads, V) at the R positions that predict the response tokens."""
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      output_hidden_states=True, use_cache=False)
        p = input_ids.shape[1] - response_width
        hidden = out.hidden_states[-1][:, p - 1:-1]
        qs, targets, values = self.heads(hidden)
        return out.logits[:, p - 1:-1], qs, targets, values


def load_rated(source: str, tokenizer, cfg: Config) -> list[dict]:
    """Encoded rows (prompt ids, response ids with EOS, standardised reward); errors name the record."""
    records = load_records(source)
    rows, rewards = [], []
    for i, rec in enumerate(records, 1):
        for field in ("prompt", "completion"):
            if not isinstance(rec.get(field), str):
                raise DataError("expected text", source=source, line=i, field=field)
        r = rec.get(cfg.reward_column)
        if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r):
            raise DataError("expected a finite number", source=source, line=i, field=cfg.reward_column)
        enc = encode_prompt_completion(tokenizer, rec["prompt"], rec["completion"],
                                       max_length=cfg.max_prompt_length + cfg.max_completion_length,
                                       max_prompt_length=cfg.max_prompt_length)
        response = enc.input_ids[enc.prompt_length:][: cfg.max_completion_length]
        if not response:
            raise DataError("the completion encodes to no token", source=source, line=i, field="completion")
        rows.append({"prompt": enc.input_ids[:enc.prompt_length], "response": response})
        rewards.append(float(r))
    if len(rows) < 2:
        raise DataError(f"ILQL needs at least 2 rated responses, got {len(rows)}", source=source)
    t = torch.tensor(rewards, dtype=torch.float64)
    t = (t - t.mean()) / (t.std() + 1e-8)  # trlX standardises the returns over the data set
    for row, value in zip(rows, t.tolist()):
        row["reward"] = value
    return rows


def collate(rows: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded, responses right-padded (the layout of rlhfkit.logprobs.response_logprobs)."""
    p, r = max(len(x["prompt"]) for x in rows), max(len(x["response"]) for x in rows)
    ids = torch.full((len(rows), p + r), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, x in enumerate(rows):
        ids[i, p - len(x["prompt"]):p], attn[i, p - len(x["prompt"]):p] = torch.tensor(x["prompt"]), 1
        ids[i, p:p + len(x["response"])], attn[i, p:p + len(x["response"])] = torch.tensor(x["response"]), 1
    mask = attn[:, p:]
    return {"input_ids": ids, "attention_mask": attn, "response_mask": mask, "actions": ids[:, p:],
            "rewards": terminal_rewards(torch.tensor([x["reward"] for x in rows], dtype=torch.float32), mask)}


def ilql_micro_batch(model, batch: dict, step_tokens: float, cfg: Config, accelerator) -> dict:
    """Forward, loss normalised by the step's response tokens, backward; the detached metrics."""
    logits, qs, targets, values = model(batch["input_ids"], batch["attention_mask"], batch["actions"].shape[1])
    loss, m = ilql_loss(qs, targets, values, logits, batch["actions"], batch["rewards"], batch["response_mask"],
                        cfg.gamma, cfg.tau, cfg.cql_scale, cfg.awac_scale, num_tokens=step_tokens)
    backward(accelerator, loss, "ILQL loss")
    return {k: float(v) for k, v in m.items()} | {"loss": float(loss.detach())}


@one_run_per_folder
def main(cfg: Config) -> dict:
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    lm = load_policy(cfg.model, cfg.dtype, attn_implementation=cfg.attn_implementation,
                     gradient_checkpointing=cfg.gradient_checkpointing)
    out = prepare_run_dir(cfg.output_dir, cfg, accelerator.is_main_process)
    rows = load_rated(cfg.dataset, tokenizer, cfg)
    model = ILQLModel(lm, ILQLHeads(lm.config.hidden_size, lm.get_output_embeddings().weight.shape[0], cfg.two_qs))
    nproc, rank = accelerator.num_processes, accelerator.process_index
    total = total_optimizer_steps(len(rows), cfg, nproc)
    model, optimizer, scheduler, step = prepare_training(accelerator, model, cfg, total, out, "ilql")
    logger = MetricsLogger(out, cfg.report_to, enabled=accelerator.is_main_process)
    bar = tqdm(total=total, initial=step, desc="ilql", disable=not (cfg.progress and accelerator.is_main_process))
    model.train()
    t0, metrics = time.perf_counter(), {}
    for batches in optimizer_steps(len(rows), cfg, step, total, nproc, rank):
        step_tokens = sum(len(rows[i]["response"]) for _, _, g in batches for i in g) / nproc
        parts = []
        for j, (_, local, _) in enumerate(batches):
            batch = {k: v.to(accelerator.device) for k, v in collate([rows[i] for i in local], tokenizer.pad_token_id).items()}
            with accumulate(accelerator, [model], last=j == len(batches) - 1):
                parts.append(ilql_micro_batch(model, batch, step_tokens, cfg, accelerator))
        grad_norm = optimizer_step(accelerator, [model], [optimizer], [scheduler], cfg.max_grad_norm, "ILQL gradient")
        step += 1
        if step % cfg.target_sync_steps == 0:
            accelerator.unwrap_model(model).heads.sync_targets(cfg.alpha)
        # the loss terms add up over micro-batches (each is normalised by the step's tokens)
        metrics = {k: sum(p[k] for p in parts) for k in ("loss", "loss_q", "loss_v", "loss_cql", "loss_awac")}
        metrics.update({k: sum(p[k] for p in parts) / len(parts) for k in ("q_mean", "v_mean", "advantage_mean")},
                       lr=scheduler.get_last_lr()[0], **({"grad_norm": grad_norm} if grad_norm is not None else {}))
        if step % cfg.logging_steps == 0 or step == total:
            logger.log(metrics, step)
        bar.update(1)
    bar.close()
    logger.close()
    final = dict(metrics, steps=step, responses=len(rows), seconds=time.perf_counter() - t0)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        save_model(inner.lm, tokenizer, Path(out) / "final")
        inner.heads.save(Path(out) / "final", beta=cfg.beta)
        atomic_write_json(Path(out) / "results.json", final)
    return final

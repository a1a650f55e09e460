"""DPO and relatives: preference optimisation without a reward model or RL.

    rlhfkit dpo --model runs/sft/final --dataset prefs.jsonl --loss sigmoid --beta 0.1
    rlhfkit dpo --model runs/sft/final --dataset prefs.jsonl --loss kto      # pairs split into +/- examples
    rlhfkit dpo --model runs/sft/final --dataset unpaired.jsonl --loss kto   # prompt/completion/label

`--loss` picks a function from :data:`rlhfkit.losses.preference.PREFERENCE_LOSSES` (sigmoid,
ipo, hinge, cdpo, robust, simpo, orpo, kto). Data: `prompt`/`chosen`/`rejected` pairs (text
or conversations), `prompt`/`responses`/`ranking` rankings (expanded to every ordered pair),
or `prompt`/`completion`/`label` for KTO.

How a step runs: chosen and rejected responses of a micro-batch are stacked into one batch
and go through ONE forward. Rows are laid out with prompts left-padded and responses
right-padded, so every response starts at the same column; the LM head and log-softmax run
only on real response tokens. Reference log-probs are computed once before
training and cached on disk under a key made of the reference weights' fingerprint, the
token ids of the data and the tokenisation settings (`--precompute_ref false` computes them
on the fly instead). With `--use_lora` the reference is the policy with its adapters
disabled. Logged: implicit rewards beta*log(pi/pi_ref) of chosen and rejected, their margin
and the reward accuracy, on training and held-out pairs.
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
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlhfkit.config import ModelArgs, TrainArgs, require
from rlhfkit.errors import DataError
from rlhfkit.losses.preference import (
    PREFERENCE_LOSSES,
    UNPAIRED_LOSSES,
    compute_preference_loss,
    needs_reference,
)
from rlhfkit.memory import report_for_run
from rlhfkit.models import load_policy, load_tokenizer, reference_context, save_model
from rlhfkit.runs import MetricsLogger, atomic_path, atomic_write_json, prepare_run_dir
from rlhfkit.sharding import full_state_dict
from rlhfkit.training import (
    check_finite,
    iterate_batches,
    latest_checkpoint,
    load_checkpoint,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    mean_across_processes,
    micro_steps_per_epoch,
    save_checkpoint,
)

CACHE_FORMAT = 1  # bump when the meaning of cached reference log-probs changes


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs):
    dataset: str = ""
    """Preference data: .jsonl/.json/.parquet, a saved HF dataset or a hub name (pairs, rankings or KTO-style labels)."""
    eval_dataset: str = ""
    """Held-out preference data for loss and reward accuracy (default: the 'eval' split of dataset if it has one)."""
    loss: str = "sigmoid"
    """Loss variant: sigmoid (DPO), ipo, hinge, cdpo, robust, simpo, orpo or kto."""
    beta: float = 0.1
    """Strength of the KL regulariser (DPO beta; IPO tau; SimPO's reward scale; ORPO's lambda)."""
    label_smoothing: float = 0.0
    """Assumed label-flip rate eps for cdpo and robust (0 <= eps < 0.5)."""
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

    def __post_init__(self) -> None:
        self._check_train_args()
        require(bool(self.dataset), "dataset", "give preference data (--dataset FILE)")
        require(self.loss in PREFERENCE_LOSSES, "loss", f"must be one of {', '.join(PREFERENCE_LOSSES)}, got {self.loss!r}")
        require(self.beta > 0, "beta", "must be > 0")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        require(self.max_length >= 4, "max_length", "must be >= 4")
        if not self.model:
            self.model = "kindly"


# ---------------------------------------------------------------------------------------------
# data: records -> token ids


@dataclasses.dataclass
class Encoded:
    """Tokenised training data. Pairs: rows[i] = (prompt, chosen, rejected). Unpaired: (prompt, completion), labels."""

    rows: list[tuple[list[int], ...]]
    labels: list[bool] | None = None
    truncated: int = 0
    skipped: int = 0
    from_rankings: int = 0

    @property
    def paired(self) -> bool:
        return self.labels is None


def _text_records(records, loss: str, tokenizer) -> tuple[list[tuple], list[bool] | None, int]:
    """Turn records of any supported format into text tuples for `loss`; returns (texts, labels, n_from_rankings)."""
    from rlhfkit.data.chat import to_prompt_completion, to_text_pair
    from rlhfkit.data.schemas import (
        detect_dataset_format,
        rankings_to_pairs,
        validate_preferences,
        validate_rankings,
        validate_unpaired,
    )

    source = getattr(records, "source", None) or "data"
    fmt = detect_dataset_format(records, source)  # raises on empty or mixed layouts, naming the line
    from_rankings = 0
    if fmt == "ranking":
        n = len(records)
        records = rankings_to_pairs(validate_rankings(records, source))
        from_rankings = len(records)
        print(f"dpo: expanded {n} rankings into {from_rankings} pairs")
        fmt = "preference"
    if fmt == "unpaired":
        if loss not in UNPAIRED_LOSSES:
            raise DataError(f"loss '{loss}' needs paired data (prompt/chosen/rejected) but got unpaired "
                            f"prompt/completion/label records; use --loss kto", source=source, field="label")
        records = validate_unpaired(records, source)
        return [to_prompt_completion(r, tokenizer) for r in records], [r["label"] for r in records], 0
    if fmt != "preference":
        raise DataError(f"records look like '{fmt}' data; dpo needs prompt/chosen/rejected pairs, "
                        f"prompt/responses/ranking rankings or (for kto) prompt/completion/label", source=source)
    pairs = [to_text_pair(r, tokenizer) for r in validate_preferences(records, source)]
    if loss in UNPAIRED_LOSSES:  # KTO on pairs: chosen is desirable, rejected undesirable (Ethayarajh et al. Sec. 4)
        return [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], [True] * len(pairs) + [False] * len(pairs), from_rankings
    return pairs, None, from_rankings


def encode(texts: list[tuple], labels: list[bool] | None, tokenizer, max_length: int) -> Encoded:
    """Token ids per example, encoded exactly as SFT encodes them (BOS first, responses end with EOS).

    Truncation follows :mod:`rlhfkit.data.collate`: the prompt is cut from the left only when it
    leaves no room, responses from the right; the prompt is encoded once so it is identical for
    both responses of a pair.
    """
    from rlhfkit.data.collate import encode_prompt, encode_prompt_completion

    out = Encoded(rows=[], labels=[] if labels is not None else None)
    for i, (prompt, *responses) in enumerate(texts):
        shared = encode_prompt(tokenizer, prompt, max_length)
        encoded = [encode_prompt_completion(tokenizer, prompt, r, max_length, prompt_ids=shared) for r in responses]
        out.truncated += any(e.truncated for e in encoded)
        r_ids = [e.input_ids[e.prompt_length:] for e in encoded]
        if len(r_ids) == 2 and r_ids[0] == r_ids[1]:
            out.skipped += 1  # identical after truncation: the pair carries no preference
            continue
        out.rows.append((list(shared[0]), *r_ids))
        if labels is not None:
            out.labels.append(labels[i])
    return out


def load_encoded(source: str, split: str, loss: str, tokenizer, max_length: int, limit: int | None = None) -> Encoded:
    from rlhfkit.data.readers import Records, load_records

    records = load_records(source, split=split)
    if limit is not None and len(records) > limit:
        print(f"dpo: using the first {limit} of {len(records)} records of {source} [{split}]")
        records = Records(records[:limit], source=records.source, lines=(records.lines or [])[:limit] or None)
    texts, labels, from_rankings = _text_records(records, loss, tokenizer)
    enc = encode(texts, labels, tokenizer, max_length)
    enc.from_rankings = from_rankings
    if enc.truncated:
        print(f"dpo: {enc.truncated} of {len(texts)} examples from {source} [{split}] were longer than "
              f"max_length={max_length} and were truncated (responses from the right; a prompt from the left only when it left no room)")
    if enc.skipped:
        print(f"dpo: skipped {enc.skipped} pairs from {source} [{split}] whose chosen and rejected responses "
              f"were identical after truncation")
    if not enc.rows:
        raise DataError("no usable examples left", source=source)
    return enc


# ---------------------------------------------------------------------------------------------
# batching and the forward pass


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device: Any = "cpu") -> dict[str, torch.Tensor]:
    """(prompt, response) rows -> prompts LEFT-padded to P, responses RIGHT-padded to R.

    Every response then starts at column P, so one `logits_to_keep` slice covers all of them.
    Position ids count real tokens only, so padding does not shift positions.
    """
    P = max(len(p) for p, _ in rows)
    R = max(len(r) for _, r in rows)
    n = len(rows)
    ids = torch.full((n, P + R), pad_id, dtype=torch.long)
    mask = torch.zeros((n, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, P - len(p):P + len(r)] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device),
            "response_mask": mask[:, P:].to(device), "prompt_width": P}


_SCALED_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling", "lm_head_multiplier")


def split_head(model):
    """(decoder, lm_head) of a plain or LoRA-wrapped HF causal LM whose logits are just lm_head(hidden), else None.

    Only for an unwrapped model: under DDP the forward must go through the wrapper (gradient
    sync hooks), and under accelerate's autocast through the patched forward.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(inner, "config", None)
    get_decoder, get_head = getattr(inner, "get_decoder", None), getattr(inner, "get_output_embeddings", None)
    if cfg is None or get_decoder is None or get_head is None:
        return None
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if any(getattr(text_cfg, f, None) not in (None, 1.0) for f in _SCALED_HEAD_FIELDS):
        return None
    decoder, head = get_decoder(), get_head()
    return (decoder, head) if decoder is not None and head is not None else None


def use_fast_head(cfg) -> bool:
    """Whether the response-only LM head may be used: not under DDP (gradient hooks) nor mixed
    precision (accelerate's autocast lives in the wrapped forward). Policy and reference then
    take the same path, so their log-probs agree to the last bit at step 0."""
    return cfg.mixed_precision == "no" and int(os.environ.get("WORLD_SIZE", "1")) == 1


def response_logps(model, batch: dict[str, torch.Tensor], fast_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log pi(response | prompt) per row, and response lengths, from one forward pass.

    The hidden state at column P-1 predicts the first response token. With `fast_head` (and a
    model :func:`split_head` accepts) the LM head runs only on real response positions, padding
    skipped; otherwise on columns P-1 .. P+R-2 of every row via `logits_to_keep`. Either way
    log-probs come from one fused cross-entropy (log-softmax + pick), not logsumexp + gather.
    """
    P = batch["prompt_width"]
    R = batch["input_ids"].shape[1] - P
    mask = batch["response_mask"]
    targets = batch["input_ids"][:, P:]
    parts = split_head(model) if fast_head else None
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], use_cache=False)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[:, P - 1:-1]
        keep = mask.bool()
        logits = head(hidden[keep])  # (tokens, V): response tokens only
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        tok_lp = -F.cross_entropy(logits, targets[keep], reduction="none")
        rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[keep]
        sums = torch.zeros(mask.shape[0], dtype=tok_lp.dtype, device=tok_lp.device).index_add(0, rows, tok_lp)
        return sums, mask.sum(-1).to(sums.dtype)
    logits = model(**inputs, logits_to_keep=R + 1).logits[:, :-1]
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    masked_targets = targets.masked_fill(mask == 0, -100)
    tok_lp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), masked_targets.reshape(-1), reduction="none")
    return tok_lp.view(mask.shape).sum(-1), mask.sum(-1).to(tok_lp.dtype)


def example_rows(enc: Encoded, index: list[int], kl: bool = False) -> list[tuple[list[int], list[int]]]:
    """Rows of one micro-batch. Pairs: all chosen rows, then all rejected rows (one forward).

    Unpaired with `kl`: the mismatched rows (prompt of i, completion of i+1 in dataset order)
    used for KTO's KL estimate; a fixed pairing keeps their reference log-probs cacheable.
    """
    if enc.paired:
        return [(enc.rows[i][0], enc.rows[i][1]) for i in index] + [(enc.rows[i][0], enc.rows[i][2]) for i in index]
    if kl:
        n = len(enc.rows)
        return [(enc.rows[i][0], enc.rows[(i + 1) % n][1]) for i in index]
    return [(enc.rows[i][0], enc.rows[i][1]) for i in index]


# ---------------------------------------------------------------------------------------------
# reference log-probs: precomputed and cached, or on the fly


def model_fingerprint(model) -> str:
    """sha256 over the reference weights (LoRA adapter tensors excluded: the reference runs without them)."""
    h = hashlib.sha256()
    inner = getattr(model, "module", model)
    for name, t in sorted(inner.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(enc: Encoded) -> str:
    """sha256 over the token ids (which already reflect the tokenizer, templates and truncation)."""
    h = hashlib.sha256()
    h.update(json.dumps({"rows": enc.rows, "labels": enc.labels}, separators=(",", ":")).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_reference_logps(ref_model, enc: Encoded, batch_size: int, pad_id: int, device: Any,
                            kl: bool, progress: bool = False, fast_head: bool = True) -> torch.Tensor:
    """(n, 2) float64: pairs -> [chosen, rejected]; unpaired -> [completion, mismatched KL completion]."""
    out = torch.zeros(len(enc.rows), 2, dtype=torch.float64)
    with reference_context(ref_model) as ref:
        was_training = ref.training
        ref.eval()
        for start in tqdm(range(0, len(enc.rows), batch_size), desc="reference log-probs", disable=not progress):
            index = list(range(start, min(start + batch_size, len(enc.rows))))
            rows = example_rows(enc, index)
            if not enc.paired and kl:
                rows = rows + example_rows(enc, index, kl=True)
            lp, _ = response_logps(ref, collate(rows, pad_id, device), fast_head)
            lp = lp.double().cpu()
            if enc.paired or kl:
                out[index, 0], out[index, 1] = lp[:len(index)], lp[len(index):]
            else:
                out[index, 0] = lp
        ref.train(was_training)
    return out


def cached_reference_logps(ref_model, enc: Encoded, cfg: Config, device: Any, kl: bool, is_main: bool = True) -> torch.Tensor:
    """Load reference log-probs from the cache, computing and writing them (atomically) when missing."""
    from safetensors.torch import load_file, save_file

    key_parts = {"format": CACHE_FORMAT, "model": model_fingerprint(ref_model), "data": data_fingerprint(enc),
                 "max_length": cfg.max_length, "kl_pairs": kl and not enc.paired, "dtype": cfg.dtype}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(cfg.ref_cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlhfkit" / "ref_logps")
    path = root / f"{key}.safetensors"
    if path.is_file():
        print(f"dpo: reference log-probs from cache {path}")
        return load_file(str(path))["logps"]
    logps = compute_reference_logps(ref_model, enc, cfg.per_device_batch_size * 2, _pad_id(ref_model), device, kl,
                                    progress=cfg.progress and is_main, fast_head=use_fast_head(cfg))
    if is_main:
        with atomic_path(path) as tmp:
            save_file({"logps": logps}, str(tmp), metadata={k: str(v) for k, v in key_parts.items()})
        print(f"dpo: cached reference log-probs of {len(enc.rows)} examples at {path}")
    return logps


def _pad_id(model) -> int:
    cfg = getattr(getattr(model, "module", model), "config", None)
    pad = getattr(cfg, "pad_token_id", None)
    return 0 if pad is None else int(pad)


# ---------------------------------------------------------------------------------------------
# one loss evaluation


def batch_loss(cfg: Config, model, ref_model, enc: Encoded, index: list[int], ref_table: torch.Tensor | None,
               pad_id: int, device: Any) -> tuple[torch.Tensor, dict, int]:
    """Loss and metrics of the micro-batch `index`; returns (loss, metrics, non-pad tokens)."""
    use_ref = needs_reference(cfg.loss)
    kl = cfg.kto_kl and not enc.paired
    batch = collate(example_rows(enc, index), pad_id, device)
    fast = use_fast_head(cfg)
    logps, lengths = response_logps(model, batch, fast)
    tokens = int(batch["attention_mask"].sum())
    kl_logps = ref_kl = None
    if kl:
        with torch.no_grad():
            kl_logps, _ = response_logps(model, collate(example_rows(enc, index, kl=True), pad_id, device), fast)
    ref_logps = None
    if use_ref and ref_table is not None:
        ref = ref_table[index].to(device=device, dtype=logps.dtype)
        ref_logps = torch.cat([ref[:, 0], ref[:, 1]]) if enc.paired else ref[:, 0]
        ref_kl = ref[:, 1] if kl else None
    elif use_ref:
        with torch.no_grad(), reference_context(ref_model) as ref:
            ref_logps, _ = response_logps(ref, batch, fast)
            if kl:
                ref_kl, _ = response_logps(ref, collate(example_rows(enc, index, kl=True), pad_id, device), fast)
    hparams = dict(beta=cfg.beta, label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma,
                   desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
    if enc.paired:
        B = len(index)
        inputs = dict(chosen_logps=logps[:B], rejected_logps=logps[B:], chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
        if ref_logps is not None:
            inputs.update(ref_chosen_logps=ref_logps[:B], ref_rejected_logps=ref_logps[B:])
    else:
        labels = torch.tensor([enc.labels[i] for i in index], device=device)
        inputs = dict(logps=logps, ref_logps=ref_logps, labels=labels, kl_logps=kl_logps, ref_kl_logps=ref_kl)
    loss, metrics = compute_preference_loss(cfg.loss, **inputs, **hparams)
    return loss, metrics, tokens


@torch.no_grad()
def evaluate(cfg: Config, model, ref_model, enc: Encoded, ref_table, pad_id: int, device: Any) -> dict[str, float]:
    """Mean loss and metrics over held-out examples.

    Each batch mean is weighted by the examples it averages: for unpaired (KTO) data the
    chosen/rejected rewards by the batch's desirable/undesirable counts, and the margin is
    the difference of the two overall means (a batch may hold only one kind).
    """
    model.eval()
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    bs = cfg.per_device_batch_size * 2
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


def _load_eval(cfg: Config, tokenizer) -> Encoded | None:
    if cfg.eval_dataset:
        return load_encoded(cfg.eval_dataset, "train", cfg.loss, tokenizer, cfg.max_length, cfg.max_eval_examples)
    p = Path(cfg.dataset)
    if p.is_dir() and (p / "eval").is_dir():
        return load_encoded(cfg.dataset, "eval", cfg.loss, tokenizer, cfg.max_length, cfg.max_eval_examples)
    return None


def _reference(cfg: Config, policy):
    """The reference model: the adapter-disabled policy with LoRA, else a frozen separate copy."""
    if cfg.use_lora:
        return policy
    ref = load_policy(cfg.reference or cfg.model, cfg.dtype, trainable=False)
    ref.requires_grad_(False)
    return ref


def main(cfg: Config) -> dict:
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    out = prepare_run_dir(cfg.output_dir, cfg, accelerator.is_main_process)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    pad_id = tokenizer.pad_token_id
    train = load_encoded(cfg.dataset, "train", cfg.loss, tokenizer, cfg.max_length)
    held_out = _load_eval(cfg, tokenizer)
    kind = "pairs" if train.paired else f"unpaired examples ({sum(train.labels)} desirable)"
    accelerator.print(f"dpo[{cfg.loss}]: {len(train.rows)} training {kind}"
                      + (f", {len(held_out.rows)} held out" if held_out else ""))

    policy = load_policy(cfg.model, cfg.dtype, lora=cfg)
    report_for_run(accelerator, policy, cfg, batch=2 * cfg.per_device_batch_size, seq_len=cfg.max_length)
    ref_model = _reference(cfg, policy) if needs_reference(cfg.loss) else None
    kl = cfg.kto_kl and not train.paired
    ref_train = ref_eval = None
    if ref_model is not None:
        ref_model.to(device)
        if cfg.precompute_ref:
            ref_train = cached_reference_logps(ref_model, train, cfg, device, kl, accelerator.is_main_process)
            if held_out is not None:
                ref_eval = cached_reference_logps(ref_model, held_out, cfg, device, kl, accelerator.is_main_process)
            if not cfg.use_lora:
                ref_model = None  # every reference value is in the tables now; free the copy

    nproc, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.gradient_accumulation_steps
    per_epoch = micro_steps_per_epoch(len(train.rows), cfg.per_device_batch_size, nproc)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.num_epochs * per_epoch) // accum)
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
    for micro, local, _ in iterate_batches(len(train.rows), cfg.per_device_batch_size, cfg.seed, step * accum,
                                           total_steps * accum, nproc, rank):
        sync = (micro + 1) % accum == 0
        with contextlib.nullcontext() if sync or nproc == 1 else accelerator.no_sync(policy):
            loss, m, ntok = batch_loss(cfg, policy, ref_model, train, local, ref_train, pad_id, device)
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
        if step % cfg.log_every == 0 or step == total_steps:
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
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and held_out is not None:
            logger.log(evaluate(cfg, policy, ref_model, held_out, ref_eval, pad_id, device), step)
        if cfg.save_every > 0 and step % cfg.save_every == 0:
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
        save_model(accelerator.unwrap_model(policy), tokenizer, out / "final", state_dict=state)
        atomic_write_json(out / "results.json", final)
    accelerator.wait_for_everyone()
    return final

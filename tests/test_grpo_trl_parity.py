"""GRPO against TRL's GRPOTrainer in lockstep: with the same policy, prompts (in rlhfkit's order)
and sampling noise, the two implementations score the same rewards, clip the same gradient
norms and end with the same log-probs. What is left between their quality figures in
benchmarks/rlvr_quality.py is then the luck of the draw (prompt order, sampled tokens), which
that benchmark averages over seeds."""

from __future__ import annotations

import pytest
import torch
from benchmarks.equal_work import shared_sampling_noise
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhfkit.models import load_tokenizer
from rlhfkit.recipes import grpo
from rlhfkit.rollout.prompts import prompts_for_step, rollout_seed
from rlhfkit.tasks import arith
from rlhfkit.train.runs import read_metrics

pytest.importorskip("trl")

STEPS, PROMPTS, GENERATIONS, LR = 3, 8, 4, 5e-4


def _ours(base: str, out) -> tuple[list[tuple[float, float]], dict]:
    cfg = grpo.Config(model=base, prompts="arith", reward=["py:rlhfkit.tasks.arith:reward_fn"], output_dir=str(out),
                      max_steps=STEPS, prompts_per_step=PROMPTS, num_generations=GENERATIONS, learning_rate=LR,
                      max_completion_length=5, temperature=1.0, beta=0.0, loss_type="grpo",
                      per_device_train_batch_size=PROMPTS * GENERATIONS, generation_batch_size=PROMPTS * GENERATIONS,
                      lr_scheduler_type="constant", warmup_steps=0, report_to="jsonl", progress=False,
                      hacking_window=0, sample_every=0, seed=0)
    grpo.main(cfg)
    rows = read_metrics(out)
    return [(r["reward"], r["grad_norm"]) for r in rows], load_file(str(out / "final" / "model.safetensors"))


def _trl(base: str, out) -> tuple[list[tuple[float, float]], dict]:
    from datasets import Dataset  # optional: the bench extra
    from trl import GRPOConfig, GRPOTrainer

    records = arith.prompt_records("train")
    order = [records[i] for s in range(STEPS) for i in prompts_for_step(len(records), s, PROMPTS, 0)]
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=PROMPTS * GENERATIONS,
                      gradient_accumulation_steps=1, num_generations=GENERATIONS, max_completion_length=5,
                      max_steps=STEPS, num_iterations=1, beta=0.0, loss_type="grpo", learning_rate=LR,
                      lr_scheduler_type="constant", warmup_steps=0, temperature=1.0, report_to="none",
                      save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, fp16=False, seed=0,
                      disable_tqdm=True, shuffle_dataset=False)
    model = AutoModelForCausalLM.from_pretrained(base)
    shared_sampling_noise(model, lambda i: rollout_seed(0, i))  # rlhfkit's noise for update i
    trainer = GRPOTrainer(model=model, reward_funcs=[arith.reward_fn], args=args,
                          train_dataset=Dataset.from_list(order),
                          processing_class=load_tokenizer(base, padding_side="left"))
    trainer.train()
    logged = [(h["reward"], h["grad_norm"]) for h in trainer.state.log_history if "reward" in h]
    return logged, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow  # ~25 s: two short training runs and TRL's import
def test_grpo_steps_in_lockstep_with_trl_grpotrainer(tmp_path):
    base = str(arith.base_model_path())
    ours, w_ours = _ours(base, tmp_path / "ours")
    peer, w_peer = _trl(base, tmp_path / "trl")
    assert len(ours) == len(peer) == STEPS
    assert any(0 < r < 1 for r, _ in ours)  # some groups carry a learning signal
    for (r1, g1), (r2, g2) in zip(ours, peer):
        assert r1 == pytest.approx(r2, abs=1e-6)  # the same tokens were sampled and scored
        assert g1 == pytest.approx(g2, rel=1e-4)  # the same gradient (norm before clipping)
    # the learned functions, not the raw weights: Adam divides by sqrt(v) + 1e-8, so rounding noise in
    # a near-zero gradient entry (the embedding row of a token of negligible probability) moves that
    # weight by up to lr/2 on either side without changing what the policy does
    texts = [r["prompt"] + r["completion"] for r in arith.problems("eval")[:64]]
    start, ours_lp, peer_lp = (_logprobs(base, w, texts) for w in (None, w_ours, w_peer))
    moved = (ours_lp - start).abs().max().item()
    diff = (ours_lp - peer_lp).abs().max().item()
    assert moved > 1e-2  # the updates did something, so equal log-probs are not vacuous
    assert diff < 1e-3 * moved, f"log-probs differ by {diff:.2e} after {STEPS} updates (moved {moved:.2e})"


def _logprobs(base: str, state: dict | None, texts: list[str]) -> torch.Tensor:
    """Log-probs of every token of `texts` (one length: the task's texts are fixed-width)."""


    model = AutoModelForCausalLM.from_pretrained(base)
    if state is not None:
        missing = model.load_state_dict(state, strict=False).missing_keys
        assert set(missing) <= {"lm_head.weight"}  # tied to the embedding, left out of the saved file
    ids = torch.tensor([load_tokenizer(base)(t, add_special_tokens=False).input_ids for t in texts])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].log_softmax(-1)
    return logits.gather(-1, ids[:, 1:, None])[..., 0]

"""Speed work of the PPO recipe that must not change what is computed."""

import json

import pytest
import torch

from rl_helpers import save_tiny, tiny_policy, tiny_rm, tiny_tokenizer

PROMPTS = ["the cat sat", "a kind word", "the rain fell", "she smiled and"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    tok = tiny_tokenizer()
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"policy": save_tiny(root / "policy", tiny_policy(tok), tok), "rm": save_tiny(root / "rm", tiny_rm(tok), tok),
            "prompts": str(prompts)}


def _run(assets, out, monkeypatch, reuse: bool):
    from safetensors.torch import load_file

    from rlhfkit.recipes import ppo
    from rlhfkit.train.runs import read_metrics

    if not reuse:
        monkeypatch.setattr(ppo, "first_step_reuses_rollout", lambda *a: False)
    calls = []
    real = ppo.response_logprobs
    monkeypatch.setattr(ppo, "response_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = ppo.Config(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"], eval_prompts="",
                     output_dir=str(out), max_steps=1, prompts_per_step=4, per_device_train_batch_size=4,
                     num_mini_batches=1, num_ppo_epochs=2, max_completion_length=6, report_to="jsonl",
                     learning_rate=1e-3, sample_every=0, hacking_window=0, perplexity_every=0)
    ppo.main(cfg)
    monkeypatch.undo()
    return len(calls), read_metrics(out), load_file(f"{out}/final/model.safetensors"), load_file(f"{out}/value/model.safetensors")


def test_first_optimiser_step_reuses_the_rollout_forward_with_the_same_result(assets, tmp_path, monkeypatch):
    # the first step's one micro-batch is the whole batch, and policy and critic are those the rollout
    # was scored with: its forward would repeat the old log-probs' forward to the last bit
    n_reused, rows, policy, critic = _run(assets, tmp_path / "reused", monkeypatch, reuse=True)
    n_plain, rows_plain, policy_plain, critic_plain = _run(assets, tmp_path / "plain", monkeypatch, reuse=False)
    # per update: old log-probs, reference log-probs, one forward per epoch (2) ...
    assert n_plain == 4
    assert n_reused == 3  # ... the first epoch's being the old log-probs' one
    assert rows[0]["first_ratio_mean"] == 1.0
    for a, b in zip(rows, rows_plain):
        assert a["policy_loss"] == b["policy_loss"] and a["value_loss"] == b["value_loss"]
    for got, want in ((policy, policy_plain), (critic, critic_plain)):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

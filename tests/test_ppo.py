"""2-step smoke runs of the PPO, GRPO and RLOO recipes on tiny models, plus the ratio, NaN
and resume contracts."""

import json

import numpy as np
import pytest
import torch

from rl_helpers import save_tiny, tiny_policy, tiny_rm, tiny_tokenizer
from rlhfkit.errors import ConfigError, NonFiniteError
from rlhfkit.train.runs import read_metrics

PROMPTS = ["the cat sat", "a kind word", "the rain fell", "she smiled and", "bad news travels",
           "the old grey", "good news lasts", "he thanked her"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    tok = tiny_tokenizer()
    policy = save_tiny(root / "policy", tiny_policy(tok), tok)
    rm = save_tiny(root / "rm", tiny_rm(tok), tok)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"policy": policy, "rm": rm, "prompts": str(prompts), "root": root}


def ppo_cfg(assets, out, **kw):
    from rlhfkit.recipes.ppo import Config

    base = dict(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"], eval_prompts="",
                output_dir=str(out), max_steps=2, prompts_per_step=4, max_completion_length=6, per_device_train_batch_size=2,
                num_ppo_epochs=2, num_mini_batches=2, report_to="jsonl", sample_every=1, learning_rate=1e-3)
    base.update(kw)
    return Config(**base)


def weights(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def test_ppo_two_steps_metrics_ratio_and_outputs(assets, tmp_path):
    from rlhfkit.recipes import ppo

    res = ppo.main(ppo_cfg(assets, tmp_path))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("proxy_reward", "kl", "entropy", "clipfrac", "approx_kl", "value_explained_variance",
                "response_length", "ratio_mean", "ratio_min", "ratio_max", "kl_coef", "value_loss"):
        assert key in rows[0], key
    # old log-probs come from the training forward itself: no update yet -> ratio exactly 1
    assert rows[0]["first_ratio_mean"] == 1.0
    assert rows[0]["first_ratio_min"] == 1.0 and rows[0]["first_ratio_max"] == 1.0
    assert rows[0]["optimizer_steps"] == 4  # 2 epochs x 2 mini-batches
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "value" / "model.safetensors").is_file()
    assert (tmp_path / "samples.jsonl").is_file()
    assert res["updates"] == 2
    # the policy moved
    before, after = weights(assets["policy"]), weights(tmp_path / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)


class NaNReward:
    def __init__(self, bad_call):
        self.calls, self.bad_call = 0, bad_call

    def __call__(self, prompts, responses):
        self.calls += 1
        out = np.zeros(len(responses))
        if self.calls == self.bad_call:
            out[1] = np.nan
        return out


def test_nan_reward_stops_step_with_weights_unchanged(assets, tmp_path):
    from rlhfkit.recipes import ppo

    cfg = ppo_cfg(assets, tmp_path, max_steps=3, save_steps=1)
    with pytest.raises(NonFiniteError, match="NaN or infinite.*weights are unchanged"):
        ppo.main(cfg, reward_fn=NaNReward(bad_call=2))
    # step 1 was checkpointed; the failing step 2 applied nothing
    from rlhfkit.train.checkpoints import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-1"
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


def test_nan_loss_raises_before_the_optimiser_step(assets):
    from accelerate import Accelerator

    from rlhfkit.models.value import TokenValues
    from rlhfkit.recipes import ppo
    from rlhfkit.rollout import Trajectory

    tok = tiny_tokenizer()
    policy, critic = tiny_policy(tok), TokenValues(tiny_rm(tok))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (policy, critic)]
    before = [p.detach().clone() for p in list(policy.parameters()) + list(critic.parameters())]
    ids = torch.randint(3, len(tok), (4, 7))
    mask, rmask = torch.ones(4, 7, dtype=torch.long), torch.ones(4, 3)
    adv = torch.ones(4, 3)
    adv[2, 1] = float("nan")
    batch = Trajectory(ids, mask, rmask, old_logp=torch.zeros(4, 3), ref_logp=None, scores=torch.zeros(4),
                       advantages=adv, values=torch.zeros(4, 3), returns=torch.zeros(4, 3))
    cfg = ppo_cfg(assets, "unused", num_mini_batches=1, per_device_train_batch_size=2)
    with pytest.raises(NonFiniteError, match="PPO loss"):
        ppo.train_on_batch(policy, critic, opts, batch, cfg, 0, Accelerator(cpu=True), None)
    after = list(policy.parameters()) + list(critic.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_resume_continues_from_checkpoint(assets, tmp_path):
    from rlhfkit.recipes import ppo

    ppo.main(ppo_cfg(assets, tmp_path, max_steps=1, save_steps=1))
    res = ppo.main(ppo_cfg(assets, tmp_path, max_steps=2, save_steps=1, resume=True))
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == [1, 2]  # the resumed run did update 2 only
    assert res["updates"] == 2


def test_ppo_with_lora_and_adaptive_kl(assets, tmp_path):
    from rlhfkit.recipes import ppo

    ppo.main(ppo_cfg(assets, tmp_path, use_lora=True, lora_r=4, target_kl=1.0, kl_estimator="k3",
                     score_norm="running", missing_eos_penalty=1.0, score_clip=5.0, entropy_coef=0.01))
    rows = read_metrics(tmp_path)
    assert rows[0]["kl_coef"] != 0.05  # the adaptive controller moved beta
    assert rows[0]["first_ratio_mean"] == 1.0


@pytest.mark.parametrize("recipe", ["grpo", "rloo"])
def test_group_recipes_two_steps(assets, tmp_path, recipe):
    import importlib

    mod = importlib.import_module(f"rlhfkit.recipes.{recipe}")
    cfg = mod.Config(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"], eval_prompts="",
                     output_dir=str(tmp_path), max_steps=2, prompts_per_step=2, num_generations=3,
                     max_completion_length=6, per_device_train_batch_size=3, num_ppo_epochs=2, num_mini_batches=2,
                     report_to="jsonl", learning_rate=1e-3)
    mod.main(cfg)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    # micro-batches of 3 shuffled rows are padded differently from the rollout's forward, so the
    # first ratio is 1 up to float32 rounding (RLOO's sequence ratio sums 6 tokens' rounding);
    # exactness with one unshuffled micro-batch is tested in test_rl_user_models.py
    assert rows[0]["first_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert "kl" in rows[0] and "proxy_reward" in rows[0]
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_reward_model_with_another_tokenizer_is_scored_from_text(assets, tmp_path, capsys):
    from rlhfkit.recipes import ppo

    other = tiny_tokenizer(vocab_size=270)
    assert other.get_vocab() != tiny_tokenizer().get_vocab()
    rm = save_tiny(tmp_path / "rm-other", tiny_rm(other), other)
    ppo.main(ppo_cfg(assets, tmp_path / "run", reward_model=rm, max_steps=1))
    assert "critic starts from the policy" in capsys.readouterr().out
    assert read_metrics(tmp_path / "run")[0]["step"] == 1


def test_long_prompts_truncated_and_counted(assets, tmp_path, capsys):
    from rlhfkit.recipes import ppo

    ppo.main(ppo_cfg(assets, tmp_path, max_prompt_length=3, max_steps=1))
    assert read_metrics(tmp_path)[0]["num_truncated_prompts"] > 0
    assert "were longer than max_prompt_length=3" in capsys.readouterr().out


def test_grpo_single_pass_reuses_the_training_forward(assets, tmp_path):
    from rlhfkit.recipes import grpo

    cfg = grpo.Config(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"], eval_prompts="",
                      output_dir=str(tmp_path), max_steps=2, prompts_per_step=2, num_generations=3, max_completion_length=6,
                      per_device_train_batch_size=3, num_ppo_epochs=1, num_mini_batches=1, report_to="jsonl")
    grpo.main(cfg)
    rows = read_metrics(tmp_path)
    assert rows[0]["first_ratio_mean"] == 1.0 and rows[0]["first_ratio_max"] == 1.0
    # policy == reference before the first step: the KL is zero up to float rounding (the reference
    # forward runs on a differently padded batch, so its kernels may round differently)
    assert rows[0]["optimizer_steps"] == 1 and abs(rows[0]["kl"]) < 1e-6
    assert abs(rows[1]["kl"]) > 1e-4, rows[1]["kl"]


def test_approx_kl_early_stop_ends_the_update(assets, tmp_path):
    from rlhfkit.recipes import ppo

    ppo.main(ppo_cfg(assets, tmp_path, max_steps=1, early_stop_kl=1e-12, learning_rate=1e-2))
    row = read_metrics(tmp_path)[0]
    # the first mini-batch has approx-KL 0 (ratio 1); the second, after a step, exceeds the bound
    assert row["early_stopped"] == 1.0 and row["optimizer_steps"] == 2


def test_ppo_ptx_mixes_in_the_sft_loss(assets, tmp_path):
    from rlhfkit.recipes import ppo

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": p, "completion": " and was happy"}) + "\n" for p in PROMPTS))
    ppo.main(ppo_cfg(assets, tmp_path / "run", max_steps=1, ptx_coef=0.5, ptx_data=str(sft)))
    row = read_metrics(tmp_path / "run")[0]
    assert row["ptx_nll"] > 0


def test_config_errors(assets, tmp_path):
    with pytest.raises(ConfigError, match="kl_estimator"):
        ppo_cfg(assets, tmp_path, kl_estimator="k7")
    from rlhfkit.recipes import ppo

    with pytest.raises(ConfigError, match="reward"):
        ppo.main(ppo_cfg(assets, tmp_path, reward_model=""))
    with pytest.raises(ConfigError, match="reward_weights"):
        ppo.main(ppo_cfg(assets, tmp_path / "w", reward_weights=[1.0, 2.0]))


class TokenCountReward:
    """Reward = share of response characters that are the letter 'a' (a target the policy can learn fast)."""

    def __call__(self, prompts, responses):
        return np.array([r.count("a") / max(len(r), 1) for r in responses]) * 5.0


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ppo", "grpo", "rloo"])
def test_learning_raises_reward_with_fixed_seed(assets, tmp_path, recipe):
    """From a random tiny policy, 30 updates against a simple reward raise it clearly."""
    import importlib

    torch.set_num_threads(1)
    mod = importlib.import_module(f"rlhfkit.recipes.{recipe}")
    common = dict(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"], eval_prompts="",
                  output_dir=str(tmp_path), max_steps=30, max_completion_length=8, report_to="jsonl", sample_every=0,
                  learning_rate=3e-3, seed=0)
    if recipe == "ppo":
        cfg = mod.Config(**common, kl_coef=0.01, prompts_per_step=8, per_device_train_batch_size=8, num_ppo_epochs=4, num_mini_batches=2)
    else:
        cfg = mod.Config(**common, beta=0.01, prompts_per_step=4, num_generations=4, per_device_train_batch_size=8, num_ppo_epochs=2,
                         num_mini_batches=2)
    mod.main(cfg, reward_fn=TokenCountReward())
    rewards = [r["proxy_reward"] for r in read_metrics(tmp_path)]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    print(f"{recipe}: proxy reward first 5 updates {first:.3f}, last 5 updates {last:.3f}")
    assert last > first + 0.5, (recipe, first, last)


@pytest.mark.slow
def test_ppo_under_accelerate_launch_two_processes(assets, tmp_path):
    import os
    import shutil
    import subprocess

    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    cmd = ["accelerate", "launch", "--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "rlhfkit.cli", "ppo", "--model", assets["policy"], "--reward_model",
           assets["rm"], "--prompts", assets["prompts"], "--eval_prompts", "", "--output_dir", str(tmp_path),
           "--max_steps", "2", "--prompts_per_step", "2", "--max_completion_length", "6", "--per_device_train_batch_size", "2",
           "--report_to", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["first_ratio_mean"] == 1.0
    assert (tmp_path / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("recipe", ["grpo", "rloo"])
def test_group_recipes_resume_and_lora(assets, tmp_path, recipe):
    import importlib

    mod = importlib.import_module(f"rlhfkit.recipes.{recipe}")

    def cfg(steps, **kw):
        return mod.Config(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"],
                          eval_prompts="", output_dir=str(tmp_path), max_steps=steps, prompts_per_step=2,
                          num_generations=2, max_completion_length=5, per_device_train_batch_size=4, report_to="jsonl",
                          save_steps=1, use_lora=True, lora_r=4, **kw)

    mod.main(cfg(1))
    mod.main(cfg(2, resume=True))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["first_ratio_mean"] == 1.0


class Drifting:
    """A scorer whose mean moves by `slope` per call: proxy up and gold down is reward hacking."""

    def __init__(self, slope):
        self.calls, self.slope = 0, slope

    def __call__(self, prompts, responses):
        self.calls += 1
        return np.full(len(responses), self.slope * self.calls)


def test_hacking_alarm_fires_and_stops_ppo(assets, tmp_path, monkeypatch):
    from rlhfkit.recipes import ppo

    monkeypatch.setattr(ppo.monitor, "load_eval_reward", lambda cfg, device: Drifting(-0.1))
    ppo.main(ppo_cfg(assets, tmp_path, max_steps=8, hacking_window=3, stop_on_hacking=True,
                     score_norm="none"), reward_fn=Drifting(+0.1))
    rows = read_metrics(tmp_path)
    # window of 3 is full at update 3; patience 2 -> fires at update 4, run ends before update 5
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["hacking_alarm"] == 1.0 and "hacking_alarm" not in rows[2]
    assert rows[3]["hacking_gold_slope"] < 0 < rows[3]["hacking_proxy_slope"]
    events = [json.loads(x) for x in (tmp_path / "alarms.jsonl").read_text().splitlines()]
    assert len(events) == 1 and events[0]["step"] == 4 and events[0]["stopped"] is True
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_hacking_alarm_quiet_when_gold_and_proxy_rise(assets, tmp_path, monkeypatch):
    from rlhfkit.recipes import ppo

    monkeypatch.setattr(ppo.monitor, "load_eval_reward", lambda cfg, device: Drifting(+0.1))
    ppo.main(ppo_cfg(assets, tmp_path, max_steps=5, hacking_window=3, stop_on_hacking=True,
                     score_norm="none"), reward_fn=Drifting(+0.1))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert not any("hacking_alarm" in r for r in rows)
    assert not (tmp_path / "alarms.jsonl").exists()


def test_on_policy_configs_read_the_schedule_and_refuse_unused_fields(assets, tmp_path):
    from rlhfkit.recipes import grpo, ppo

    with pytest.raises(ConfigError, match="eval_steps"):
        ppo_cfg(assets, tmp_path, eval_steps=5)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        ppo_cfg(assets, tmp_path, gradient_accumulation_steps=2)
    # lr_scheduler_type / warmup_steps count optimiser steps: 2 updates x 1 step, linear decay from 1e-3
    grpo.main(grpo.Config(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"],
                          eval_prompts="", output_dir=str(tmp_path), max_steps=2, prompts_per_step=2,
                          num_generations=2, max_completion_length=4, per_device_train_batch_size=4, report_to="jsonl",
                          learning_rate=1e-3, lr_scheduler_type="linear"))
    rows = read_metrics(tmp_path)
    assert [r["learning_rate"] for r in rows] == pytest.approx([5e-4, 0.0])
    # logging_steps: every 2nd update, and the last one
    ppo.main(ppo_cfg(assets, tmp_path / "log", max_steps=3, logging_steps=2))
    assert [r["step"] for r in read_metrics(tmp_path / "log")] == [2, 3]


def _printed_estimate(text: str) -> dict[str, float]:
    """The first memory table in `text` as {row: bytes} (at the printed 2-decimal precision)."""
    units = {"GiB": 1024**3, "MiB": 1024**2, "KiB": 1024}
    lines = text.splitlines()
    start = lines.index("memory estimate per device:")
    out = {}
    for line in lines[start + 1: start + 8]:
        *name, value, unit = line.split()
        out[" ".join(name)] = float(value) * units[unit]
    return out


def test_ppo_prints_a_memory_estimate_matching_a_hand_count(assets, tmp_path, capsys):
    from rlhfkit.recipes import ppo

    ppo.main(ppo_cfg(assets, tmp_path, max_steps=1, num_ppo_epochs=1, num_mini_batches=1, eval_reward="none",
                     verbose=True))
    got = _printed_estimate(capsys.readouterr().out)
    assert got == _printed_estimate((tmp_path / "memory.txt").read_text())
    tok = tiny_tokenizer()
    V, h, L, ffn, heads, d = len(tok), 32, 2, 64, 4, 8
    layer = 4 * h * h + 3 * h * ffn + 2 * h  # q, k, v, o; gate, up, down; two norms
    P = 2 * V * h + L * layer + h  # untied embedding and LM head, final norm
    C = V * h + L * layer + h + h  # the critic (started from the reward model): a one-output head
    b, s = 2, 64 + 6  # per_device_train_batch_size; max_prompt_length + max_completion_length
    fp32 = 4
    want = {
        "weights": fp32 * (P + C),  # policy and critic both train
        "gradients": fp32 * (P + C),
        "optimizer": 2 * fp32 * (P + C),  # AdamW's two fp32 moments
        # sdpa: s*b*h*34 bytes per layer at 2-byte activations, doubled for fp32; logits and their gradient
        "activations": 2 * (L * s * b * h * 34 * fp32 // 2) + 2 * b * s * V * 4 + 2 * b * s * 1 * 4,
        "kv cache": 2 * L * heads * d * s * 4 * fp32,  # K and V for a generation batch of 4 prompts
        "frozen models": fp32 * P + fp32 * C,  # the reference (a copy of the policy) and the reward model
    }
    want["total"] = sum(want.values())
    for row, value in want.items():
        unit = 1024**3 if value >= 1024**3 else 1024**2 if value >= 1024**2 else 1024
        assert abs(got[row] - value) <= 0.005 * unit + 1e-9, (row, got[row], value)


@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
def test_offload_reference_gives_the_same_run(assets, tmp_path, recipe):
    import importlib

    mod = importlib.import_module(f"rlhfkit.recipes.{recipe}")
    extra = {"num_generations": 2} if recipe == "grpo" else {}
    runs = []
    for offload in (False, True):
        out = tmp_path / str(offload)
        base = dict(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"], eval_prompts="",
                    output_dir=str(out), max_steps=1, prompts_per_step=2, max_completion_length=6,
                    per_device_train_batch_size=2, num_ppo_epochs=1, num_mini_batches=1, report_to="jsonl",
                    learning_rate=1e-3, offload_reference=offload, **extra)
        mod.main(mod.Config(**base))
        runs.append(read_metrics(out)[0])
    for key in ("kl", "proxy_reward", "response_length"):
        assert runs[0][key] == runs[1][key], key


def test_collapse_alarm_fires_in_a_run_that_destroys_the_policy(assets, tmp_path):
    """A learning rate far too large wrecks the tiny policy within a few updates: held-out
    perplexity blows up and the alarm says so (and stops the run when asked)."""
    from rlhfkit.recipes import ppo

    text = tmp_path / "heldout.txt"
    text.write_text("the cat sat on the mat\na kind word makes the day bright\nthe rain fell on the town\n")
    out = tmp_path / "run"
    ppo.main(ppo_cfg(assets, out, max_steps=8, hacking_window=3, stop_on_hacking=True, learning_rate=0.5,
                     perplexity_data=str(text), perplexity_every=1))
    rows = read_metrics(out)
    events = [json.loads(x) for x in (out / "alarms.jsonl").read_text().splitlines()]
    blowups = [e for e in events if e["event"] == "perplexity_blowup"]
    assert blowups and blowups[0]["ratio"] > 1.5 and blowups[0]["stopped"] is True
    assert rows[-1]["step"] == blowups[0]["step"] < 8  # stopped after the update that fired it
    assert rows[-1]["collapse_alarm"] == 1.0 and rows[0]["heldout_perplexity"] > 0


def test_collapse_alarm_quiet_in_a_gentle_run(assets, tmp_path):
    from rlhfkit.recipes import ppo

    text = tmp_path / "heldout.txt"
    text.write_text("the cat sat on the mat\na kind word makes the day bright\nthe rain fell on the town\n")
    ppo.main(ppo_cfg(assets, tmp_path / "run", max_steps=6, hacking_window=3, learning_rate=1e-5,
                     perplexity_data=str(text), perplexity_every=1))
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 6 and all("heldout_perplexity" in r for r in rows)
    assert not (tmp_path / "run" / "alarms.jsonl").exists()

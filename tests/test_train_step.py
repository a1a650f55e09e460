"""The one optimiser-step convention (rlhfkit.train.step): an optimiser step split into two
micro-batches gives the gradient of the same step taken as one batch, in float64, for every
recipe that trains (SFT, reward, DPO, PPO, GRPO). The gradient is read at the recipe's own call
of `optimizer_step`, so each recipe's normalisation is what is checked, not a re-implementation.

The micro-batches hold unequal token counts (so a fixed 1/N per micro-batch, accelerate's
`gradient_accumulation_steps`, would weight the SFT and policy losses wrongly; the SFT case
checks that it would).
"""

from __future__ import annotations

import json

import pytest
import torch

from rl_helpers import save_tiny, tiny_policy, tiny_rm, tiny_tokenizer
from rlhfkit.models import io as model_io

PROMPTS = ["the cat sat", "a kind word makes the day", "the rain", "she smiled and thanked him for"]
GOOD = [" on the mat and was happy", " bright", " fell on the old grey town today", " the gift"]
BAD = [" no", " bad news travels fast but good news lasts", " x", " go away and never come back"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    tok = tiny_tokenizer()
    out = {"policy": save_tiny(root / "policy", tiny_policy(tok).double(), tok),
           "rm": save_tiny(root / "rm", tiny_rm(tok).double(), tok)}
    for name, rows in {"sft": [{"prompt": p, "completion": g} for p, g in zip(PROMPTS, GOOD)],
                       "prefs": [{"prompt": p, "chosen": g, "rejected": b} for p, g, b in zip(PROMPTS, GOOD, BAD)],
                       "prompts": [{"prompt": p} for p in PROMPTS]}.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = str(root / f"{name}.jsonl")
    out["root"] = root
    return out


@pytest.fixture(autouse=True)
def float64(monkeypatch):
    monkeypatch.setitem(model_io.DTYPES, "float64", torch.float64)


def first_step_gradient(monkeypatch, module, run) -> torch.Tensor:
    """The flattened gradient every model holds when `module` calls optimizer_step the first time."""
    grads = []
    real = module.optimizer_step

    def spy(accelerator, models, *args, **kwargs):
        if not grads:
            grads.append(torch.cat([p.grad.reshape(-1) for m in models for p in m.parameters() if p.grad is not None]))
            assert grads[0].dtype == torch.float64
        return real(accelerator, models, *args, **kwargs)

    monkeypatch.setattr(module, "optimizer_step", spy)
    run()
    monkeypatch.setattr(module, "optimizer_step", real)
    return grads[0].clone()


COMMON = dict(dtype="float64", max_steps=1, report_to="jsonl", progress=False, learning_rate=1e-3, max_grad_norm=0.0)


def assert_same(one, two):
    assert one.abs().max() > 0
    torch.testing.assert_close(two, one, rtol=1e-10, atol=1e-13)


def offline(name, assets, tmp_path, monkeypatch, model, dataset, **kw):
    from importlib import import_module

    recipe = import_module(f"rlhfkit.recipes.{name}")
    grads = []
    for bs, accum in ((4, 1), (2, 2)):
        cfg = recipe.Config(model=model, dataset=dataset, output_dir=str(tmp_path / f"{name}-{bs}"), max_length=32,
                            per_device_train_batch_size=bs, gradient_accumulation_steps=accum, **COMMON, **kw)
        grads.append(first_step_gradient(monkeypatch, recipe, lambda cfg=cfg: recipe.main(cfg)))
    return grads


def test_sft_two_micro_batches_equal_one_batch(assets, tmp_path, monkeypatch):
    one, two = offline("sft", assets, tmp_path, monkeypatch, assets["policy"], assets["sft"])
    assert_same(one, two)
    # the two micro-batches hold unequal supervised token counts: a fixed 1/2 per micro-batch
    # (a per-micro-batch token mean) would not give this gradient
    from rlhfkit.recipes import sft
    from rlhfkit.train.batches import iterate_batches

    tok = model_io.load_tokenizer(assets["policy"])
    examples = sft.load_sft_examples(assets["sft"], tok, 32).examples
    counts = [sum(sft.count_targets(examples[i]) for i in local)
              for _, local, _ in iterate_batches(len(examples), 2, 42, 0, 2)]
    assert len(set(counts)) == 2, counts


def test_reward_two_micro_batches_equal_one_batch(assets, tmp_path, monkeypatch):
    one, two = offline("reward", assets, tmp_path, monkeypatch, assets["rm"], assets["prefs"], eval_fraction=0.0)
    assert_same(one, two)


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_dpo_two_micro_batches_equal_one_batch(assets, tmp_path, monkeypatch, loss):
    one, two = offline("dpo", assets, tmp_path, monkeypatch, assets["policy"], assets["prefs"], loss=loss)
    assert_same(one, two)


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_on_policy_two_micro_batches_equal_one_batch(assets, tmp_path, monkeypatch, name):
    from importlib import import_module

    recipe = import_module(f"rlhfkit.recipes.{name}")
    grads = []
    for bs in (4, 2):
        kw = dict(num_generations=2, prompts_per_step=2) if name == "grpo" else dict(prompts_per_step=4)
        cfg = recipe.Config(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"], eval_prompts="",
                            output_dir=str(tmp_path / f"{name}-{bs}"), max_completion_length=6, num_ppo_epochs=1,
                            num_mini_batches=1, per_device_train_batch_size=bs, **COMMON, **kw)
        grads.append(first_step_gradient(monkeypatch, recipe, lambda cfg=cfg: recipe.main(cfg)))
    assert_same(*grads)

"""The architecture matrix: a user's own model, from a folder, through every recipe.

Tiny random models built from transformers configs (tests/arch_models.py): GPT-2 (learned
positions, Conv1D, no pad token), Qwen2 (ChatML, no BOS), Llama and Mistral, each through
sft, reward, dpo, ppo, grpo, best-of-n and eval for a step or two, with and without LoRA.
Checks: pad/EOS handled, no position past the model's table, every checkpoint reloads in
plain transformers (reward models with rlhfkit's scores), the chat template is saved with
models trained on conversations. The on-policy cells call `main(Config(...))` with only a few
fields so they follow those recipes' public entry points. The architectures of ARCHS_MORE
(Qwen3, Phi-3, OLMo2, GPT-NeoX) get the LoRA check here and lighter runs in test_user_models.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arch_models import ARCHS, ARCHS_MORE, MAX_POSITIONS, make_model_folder

torch.set_num_threads(1)

USER = ["How is the weather?", "Say something kind.", "What did you eat?", "Tell me about the sea."]
GOOD = [" It is warm and lovely.", " You are wonderful.", " A fine fresh bread.", " The sea is calm."]
BAD = [" Awful.", " Go away.", " Nothing good.", " Cold and grim."]
LORA = dict(use_lora=True, lora_r=4, lora_alpha=8)
FAST = dict(progress=False, report_to="jsonl", logging_steps=1, learning_rate=1e-3, max_length=48)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix-data")
    sft = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": g.strip()}]}
           for u, g in zip(USER * 2, GOOD * 2)]
    prefs = [{"prompt": [{"role": "user", "content": u}], "chosen": [{"role": "assistant", "content": g.strip()}],
              "rejected": [{"role": "assistant", "content": b.strip()}]} for u, g, b in zip(USER * 2, GOOD * 2, BAD * 2)]
    prompts = [{"prompt": [{"role": "user", "content": u}]} for u in USER]
    out = {}
    for name, rows in (("sft", sft), ("prefs", prefs), ("prompts", prompts)):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = str(path)
    return out


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):
    """(name, base model folder, trained reward model folder) per architecture."""

    name = request.param
    root = tmp_path_factory.mktemp(f"matrix-{name}")
    base = make_model_folder(name, root / "base", dropout=0.1)
    return {"name": name, "base": base, "root": root, "rm": None}


def _reward_model(arch, data) -> str:
    """A reward model for the on-policy cells, trained once per architecture."""
    from rlhfkit.recipes import reward

    if arch["rm"] is None:
        out = arch["root"] / "rm"
        reward.main(reward.Config(model=arch["base"], dataset=data["prefs"], output_dir=str(out), max_steps=2,
                                  per_device_train_batch_size=4, eval_fraction=0.0, **FAST), printer=lambda m: None)
        arch["rm"] = str(out / "final")
    return arch["rm"]


def _reloads_as_causal_lm(folder) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template, "a model trained on conversations must be saved with its chat template"
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft(arch, data, tmp_path, lora):
    from rlhfkit.recipes import sft

    res = sft.main(sft.Config(model=arch["base"], dataset=data["sft"], output_dir=str(tmp_path), max_steps=2,
                              per_device_train_batch_size=4, **FAST, **(LORA if lora else {})))
    assert res["steps"] == 2 and np.isfinite(res["loss"])
    _reloads_as_causal_lm(tmp_path / "final")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reward(arch, data, tmp_path, lora):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhfkit.models.reward import RewardScorer, encode_prompt_response, pad_right
    from rlhfkit.recipes import reward

    reward.main(reward.Config(model=arch["base"], dataset=data["prefs"], output_dir=str(tmp_path), max_steps=2,
                              per_device_train_batch_size=4, eval_fraction=0.0, **FAST, **(LORA if lora else {})),
                printer=lambda m: None)
    final = tmp_path / "final"
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    prompts, responses = ["How is the weather?", "Say something kind."], GOOD[:2]
    ours = RewardScorer(final, normalize=False).score(prompts, responses)
    ids, mask = pad_right([encode_prompt_response(tok, p, r)[0] for p, r in zip(prompts, responses)], tok.pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0].double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo(arch, data, tmp_path, lora):
    from rlhfkit.recipes import dpo

    res = dpo.main(dpo.Config(model=arch["base"], dataset=data["prefs"], output_dir=str(tmp_path), max_steps=2,
                              per_device_train_batch_size=4, ref_cache_dir=str(tmp_path / "cache"), **FAST,
                              **(LORA if lora else {})))
    assert res["steps"] == 2 and np.isfinite(res["loss"])
    _reloads_as_causal_lm(tmp_path / "final")


def test_dpo_rejects_max_length_past_positions(arch, data, tmp_path):
    from rlhfkit.errors import ConfigError
    from rlhfkit.recipes import dpo

    with pytest.raises(ConfigError, match="positions"):
        dpo.main(dpo.Config(model=arch["base"], dataset=data["prefs"], output_dir=str(tmp_path),
                            **{**FAST, "max_length": MAX_POSITIONS + 1}))


@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_on_policy(arch, data, tmp_path, recipe, lora):
    import importlib

    mod = importlib.import_module(f"rlhfkit.recipes.{recipe}")
    fields = dict(model=arch["base"], reward_model=_reward_model(arch, data), prompts=data["prompts"], eval_prompts="",
                  output_dir=str(tmp_path), max_steps=1, prompts_per_step=2, max_completion_length=4,
                  per_device_train_batch_size=2, report_to="jsonl", **(LORA if lora else {}))
    if recipe == "grpo":
        fields["num_generations"] = 2
    mod.main(mod.Config(**fields))
    assert (tmp_path / "final").is_dir()


def _lora_adapter(arch, data) -> str:
    """An SFT LoRA run saved as a peft adapter (merge_lora false), made once per architecture."""
    from rlhfkit.recipes import sft

    out = arch["root"] / "sft-adapter"
    if not (out / "final").is_dir():
        sft.main(sft.Config(model=arch["base"], dataset=data["sft"], output_dir=str(out), max_steps=1,
                            per_device_train_batch_size=4, merge_lora=False, **FAST, **LORA))
    assert (out / "final" / "adapter_config.json").is_file()
    return str(out / "final")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_best_of_n(arch, data, tmp_path, lora):
    from rlhfkit.recipes import best_of_n

    policy = _lora_adapter(arch, data) if lora else arch["base"]
    res = best_of_n.main(best_of_n.Config(model=policy, reward=[f"rm:{_reward_model(arch, data)}"],
                                          prompts=data["prompts"], n=2, max_new_tokens=4, gold=False,
                                          output_dir=str(tmp_path)))
    assert np.isfinite(res["score_selected"])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_eval(arch, data, tmp_path, lora):
    from rlhfkit.eval import run_eval

    policy = _lora_adapter(arch, data) if lora else arch["base"]
    res = run_eval.main(run_eval.Config(model=policy, reference=arch["base"], prompts=data["prompts"],
                                        judge=[f"rm:{_reward_model(arch, data)}"], max_new_tokens=4, n_boot=10,
                                        max_perplexity_lines=4, output_dir=str(tmp_path)))
    assert isinstance(res, dict)
    if lora:  # the adapter was applied: the policy is not its base
        assert res["kl"]["mean"] != 0


@pytest.mark.parametrize("arch", ARCHS + ARCHS_MORE)
def test_lora_wraps_every_architecture_without_warnings(tmp_path, arch):
    """LoRA on each architecture says nothing a user cannot act on: GPT-2's Conv1D projections
    get fan_in_fan_out from us (peft would set it with a warning), and peft's read of the
    deprecated `is_gradient_checkpointing` is not shown. The adapter starts as a no-op."""
    import warnings

    from rlhfkit.config import ModelArgs
    from rlhfkit.models import load_policy
    from rlhfkit.models.lora import apply_lora

    model = load_policy(make_model_folder(arch, tmp_path / arch), trainable=True)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        before = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = apply_lora(model, ModelArgs(use_lora=True, lora_r=2, lora_alpha=4))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(ids).logits, before)
    if arch == "gpt2":
        assert wrapped.peft_config["default"].fan_in_fan_out

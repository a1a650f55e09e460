"""A user's own checkpoints in every architecture of tests/arch_models.py (ARCHS + ARCHS_MORE):
LoRA reward-model adapters reload with peft's documented recipe and as `rm:ADAPTER`, a reward
model or an adapter folder passed where a policy is expected."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arch_models import ARCHS, ARCHS_MORE, make_model_folder

torch.set_num_threads(1)

ALL = ARCHS + ARCHS_MORE
PREFS = [{"prompt": "How is the weather?", "chosen": "It is warm and lovely.", "rejected": "Awful."},
         {"prompt": "Say something kind.", "chosen": "You are wonderful.", "rejected": "Go away."}] * 4
FAST = dict(progress=False, report_to="jsonl", logging_steps=1, learning_rate=1e-2, max_length=48)
PROMPTS, RESPONSES = ["How is the weather?", "Say something kind.", "Hi"], [" It is warm.", " You are lovely, thanks.", " Go"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _hf_scores(model, tok):
    """A transformers sequence classifier's scores of PROMPTS/RESPONSES, tokenised as rlhfkit scores them."""
    from rlhfkit.models.reward import encode_prompt_response, pad_right

    ids, mask = pad_right([encode_prompt_response(tok, p, r)[0] for p, r in zip(PROMPTS, RESPONSES)], tok.pad_token_id)
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask).logits[:, 0].double().numpy()


@pytest.mark.parametrize("arch", ALL)
def test_lora_reward_adapter_reloads_with_peft_and_as_rm_spec(arch, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhfkit.errors import ConfigError
    from rlhfkit.judges.specs import load_reward
    from rlhfkit.models import load_policy
    from rlhfkit.models.reward import RewardScorer
    from rlhfkit.recipes import reward

    base = make_model_folder(arch, tmp_path / "base")
    trained = {}
    real_save = reward.save_reward_model

    def spy(module, tokenizer, path, train, cfg):  # the trained model's own scores, before saving
        trained["scores"] = _hf_scores(module.model, tokenizer)
        trained["vocab"] = len(tokenizer)
        return real_save(module, tokenizer, path, train, cfg)

    monkeypatch.setattr(reward, "save_reward_model", spy)
    reward.main(reward.Config(model=base, dataset=_write(tmp_path / "p.jsonl", PREFS), output_dir=str(tmp_path / "rm"),
                              max_steps=2, per_device_train_batch_size=4, eval_fraction=0.0, use_lora=True, lora_r=4,
                              lora_alpha=8, merge_lora=False, normalize=False, **FAST), printer=lambda m: None)
    adapter = tmp_path / "rm" / "final"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    with pytest.raises(ConfigError, match="reward model's adapter"):  # not a policy
        load_policy(str(adapter))

    # the recipe of docs/reward.md, step by step
    tok = AutoTokenizer.from_pretrained(adapter)
    assert len(tok) == trained["vocab"]
    hf = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    hf.resize_token_embeddings(len(tok))
    hf.config.pad_token_id = tok.pad_token_id
    hf = PeftModel.from_pretrained(hf, adapter)
    np.testing.assert_allclose(_hf_scores(hf, tok), trained["scores"], rtol=1e-5, atol=1e-5)

    ours = RewardScorer(adapter, normalize=False).score(PROMPTS, RESPONSES)
    np.testing.assert_allclose(ours, trained["scores"], rtol=1e-5, atol=1e-5)
    spec = load_reward(f"rm:{adapter}")
    np.testing.assert_allclose(spec.fn(PROMPTS, RESPONSES), trained["scores"], rtol=1e-5, atol=1e-5)


def _reward_model_folder(arch, root) -> str:
    """What `rlhfkit reward` leaves: the base as a sequence classifier (a score head, no LM head)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = make_model_folder(arch, root / "base")
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.save_pretrained(root / "rm")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "rm")
    return str(root / "rm")


@pytest.mark.parametrize("arch", ["olmo2", "gpt_neox", "phi3"])
def test_a_reward_model_as_policy_is_refused_in_one_line(arch, tmp_path):
    from rlhfkit.errors import ConfigError
    from rlhfkit.models import load_policy
    from rlhfkit.recipes import sft

    folder = _reward_model_folder(arch, tmp_path)
    with pytest.raises(ConfigError) as err:
        load_policy(folder)
    msg = str(err.value)
    assert "\n" not in msg and folder in msg and "lm_head.weight" in msg and "reward model" in msg
    data = _write(tmp_path / "sft.jsonl", [{"prompt": "Hi", "completion": "there"}] * 4)
    with pytest.raises(ConfigError, match="reward model"):
        sft.main(sft.Config(model=folder, dataset=data, output_dir=str(tmp_path / "out"), max_steps=1,
                            per_device_train_batch_size=2, **FAST))
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_tied_embeddings_are_not_missing_weights(arch, tmp_path):
    """A tied LM head is the input embedding, not a fresh weight: such folders load, the LM's and
    even a tied reward model's (its head is the trained embedding)."""
    from rlhfkit.models import load_policy

    model = load_policy(make_model_folder(arch, tmp_path / "lm"))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    rm_as_policy = load_policy(_reward_model_folder(arch, tmp_path / "x"))
    assert rm_as_policy.get_output_embeddings().weight is rm_as_policy.get_input_embeddings().weight


def _sft_adapter(arch, root) -> tuple[str, str]:
    from rlhfkit.recipes import sft

    base = make_model_folder(arch, root / "base")
    data = _write(root / "sft.jsonl", [{"prompt": "How is the weather?", "completion": " It is warm."}] * 4)
    sft.main(sft.Config(model=base, dataset=data, output_dir=str(root / "sft"), max_steps=2, per_device_train_batch_size=4,
                        merge_lora=False, use_lora=True, lora_r=4, lora_alpha=8, **FAST))
    return base, str(root / "sft" / "final")


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_an_adapter_folder_as_policy_loads_base_and_adapter(arch, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from rlhfkit.errors import ConfigError
    from rlhfkit.models import load_policy
    from rlhfkit.recipes import sft

    base, adapter = _sft_adapter(arch, tmp_path)
    ids = torch.tensor([[5, 9, 11, 40, 7]])
    with torch.no_grad():
        want = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()(ids).logits
        got = load_policy(adapter, trainable=False)(ids).logits
        plain = load_policy(base, trainable=False)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the adapter was applied
    data = _write(tmp_path / "more.jsonl", [{"prompt": "Say something kind.", "completion": " You are lovely."}] * 4)
    for lora in (False, True):  # further training from the adapter, in full or with a fresh adapter
        res = sft.main(sft.Config(model=adapter, dataset=data, output_dir=str(tmp_path / f"more-{lora}"), max_steps=1,
                                  per_device_train_batch_size=4, **FAST, **(dict(use_lora=True, lora_r=4) if lora else {})))
        assert res["steps"] == 1 and np.isfinite(res["loss"])
    with pytest.raises(ConfigError, match="merge_lora"):  # a second adapter would not carry the first
        sft.main(sft.Config(model=adapter, dataset=data, output_dir=str(tmp_path / "unmerged"), max_steps=1,
                            per_device_train_batch_size=4, use_lora=True, merge_lora=False, **FAST))


@pytest.mark.parametrize("arch", ARCHS_MORE)
def test_more_architectures_through_sft_reward_dpo_and_grpo(arch, tmp_path):
    """Each added architecture once through the main recipes (the matrix of tests/test_arch_matrix.py
    runs ARCHS only, with and without LoRA, to keep its time); GRPO scores with the reward model
    saved as a LoRA adapter (rm:ADAPTER)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.recipes import dpo, grpo, reward, sft

    base = make_model_folder(arch, tmp_path / "base", dropout=0.1)
    convs = [[{"role": "user", "content": p["prompt"]}] for p in PREFS]
    sft_data = _write(tmp_path / "sft.jsonl", [{"messages": c + [{"role": "assistant", "content": p["chosen"]}]}
                                               for c, p in zip(convs, PREFS)])
    res = sft.main(sft.Config(model=base, dataset=sft_data, output_dir=str(tmp_path / "sft"), max_steps=2,
                              per_device_train_batch_size=4, use_lora=True, lora_r=4, **FAST))
    assert res["steps"] == 2 and np.isfinite(res["loss"])
    policy = tmp_path / "sft" / "final"
    assert AutoModelForCausalLM.from_pretrained(policy).get_input_embeddings().weight.shape[0] >= len(
        AutoTokenizer.from_pretrained(policy))
    prefs = _write(tmp_path / "prefs.jsonl", PREFS)
    reward.main(reward.Config(model=str(policy), dataset=prefs, output_dir=str(tmp_path / "rm"), max_steps=2,
                              per_device_train_batch_size=4, eval_fraction=0.0, use_lora=True, lora_r=4,
                              merge_lora=False, **FAST), printer=lambda m: None)  # rm: an adapter, below
    res = dpo.main(dpo.Config(model=str(policy), dataset=prefs, output_dir=str(tmp_path / "dpo"), max_steps=2,
                              per_device_train_batch_size=4, ref_cache_dir=str(tmp_path / "cache"), **FAST))
    assert res["steps"] == 2 and np.isfinite(res["loss"])
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": c} for c in convs[:4]])
    grpo.main(grpo.Config(model=str(policy), reward=[f"rm:{tmp_path / 'rm' / 'final'}"], prompts=prompts,
                          eval_prompts="", output_dir=str(tmp_path / "grpo"), max_steps=1, prompts_per_step=2,
                          num_generations=2, max_completion_length=4, per_device_train_batch_size=2, report_to="jsonl"))
    assert (tmp_path / "grpo" / "final").is_dir()


def test_ppo_critic_starts_from_a_reward_adapter(tmp_path):
    """A LoRA reward model saved as an adapter seeds PPO's critic like a full one (same tokenizer)."""
    from rlhfkit.models import load_tokenizer
    from rlhfkit.models.reward import RewardScorer
    from rlhfkit.models.value import load_value_model, value_model_source
    from rlhfkit.recipes import reward

    base = make_model_folder("llama", tmp_path / "base")
    reward.main(reward.Config(model=base, dataset=_write(tmp_path / "p.jsonl", PREFS), output_dir=str(tmp_path / "rm"),
                              max_steps=2, per_device_train_batch_size=4, eval_fraction=0.0, use_lora=True, lora_r=4,
                              merge_lora=False, **FAST), printer=lambda m: None)
    adapter = str(tmp_path / "rm" / "final")
    tok = load_tokenizer(base)
    assert value_model_source("", base, [f"rm:{adapter}"], tok, log=lambda m: None) == adapter
    critic = load_value_model(adapter, tok)
    head = RewardScorer(adapter).members[0].model.score.weight
    torch.testing.assert_close(critic.model.score.weight, head)


def test_an_adapter_saved_without_tokenizer_uses_its_base_tokenizer(tmp_path):
    """peft's own save_pretrained writes no tokenizer: the base's is the adapter's."""
    from rlhfkit.models import load_tokenizer

    base, adapter = _sft_adapter("llama", tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (tmp_path / "sft" / "final" / name).unlink(missing_ok=True)
    assert load_tokenizer(adapter).get_vocab() == load_tokenizer(base).get_vocab()

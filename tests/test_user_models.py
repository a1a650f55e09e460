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

    from rlhfkit.judges.specs import load_reward
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

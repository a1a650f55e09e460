"""The Python API as a TRL user calls it: an already-loaded model and tokenizer (TRL's `model=` and
`processing_class=`) instead of folder names, and transformers' `overwrite_output_dir`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.errors import ConfigError
from rlhfkit.recipes import dpo, grpo, ppo, reward, sft

PAIRS = [{"prompt": f"Day {i} was", "chosen": " warm and lovely", "rejected": " grim and cold"} for i in range(8)]
QUIET = dict(report_to="jsonl", progress=False, max_steps=1, per_device_train_batch_size=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from arch_models import make_model_folder

    return make_model_folder("llama", tmp_path_factory.mktemp("api") / "llama")


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_sft_trains_a_model_object_with_its_processing_class(folder, tmp_path):
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    before = _weights(model)
    res = sft.main(sft.Config(model=model, processing_class=tok, dataset=[{"prompt": "Hi", "completion": " there"}] * 8,
                              output_dir=str(tmp_path / "sft"), learning_rate=1e-2, max_length=32, **QUIET))
    assert res["steps"] == 1
    assert not torch.equal(before, _weights(model))  # trained in place, as TRL's trainers do
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "final")
    assert torch.equal(_weights(saved), _weights(model))
    recorded = yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())
    assert recorded["model"].startswith("<LlamaForCausalLM") and recorded["tokenizer"].startswith("<")


def test_dpo_grpo_and_ppo_take_a_model_object(folder, tmp_path):
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    before = _weights(model)
    res = dpo.main(dpo.Config(model=model, tokenizer=tok, dataset=PAIRS, output_dir=str(tmp_path / "dpo"),
                              learning_rate=1e-2, max_length=32, ref_cache_dir=str(tmp_path / "cache"), **QUIET))
    assert res["steps"] == 1 and not torch.equal(before, _weights(model))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Day {i} was"}) + "\n" for i in range(4)))
    grpo.main(grpo.Config(model=model, processing_class=tok, reward=["length:8"], prompts=str(prompts), eval_prompts="",
                          output_dir=str(tmp_path / "grpo"), prompts_per_step=2, num_generations=2,
                          max_completion_length=4, **QUIET))
    assert (tmp_path / "grpo" / "final" / "config.json").is_file()
    ppo.main(ppo.Config(model=model, processing_class=tok, reward=["length:8"], prompts=str(prompts), eval_prompts="",
                        output_dir=str(tmp_path / "ppo"), prompts_per_step=2, max_completion_length=4, **QUIET))
    assert (tmp_path / "ppo" / "final" / "config.json").is_file()


def test_reward_trains_a_sequence_classifier_object(folder, tmp_path):
    rm = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    tok = AutoTokenizer.from_pretrained(folder)
    reward.main(reward.Config(model=rm, processing_class=tok, dataset=PAIRS, output_dir=str(tmp_path / "rm"),
                              eval_fraction=0.0, max_length=32, **QUIET))
    assert (tmp_path / "rm" / "final" / "config.json").is_file()


def test_a_model_object_without_a_tokenizer_or_folder_is_one_line(folder, tmp_path):
    from arch_models import make_config, make_tokenizer

    tok = make_tokenizer("llama")
    model = AutoModelForCausalLM.from_config(make_config("llama", len(tok), tok))  # never saved: no name_or_path
    with pytest.raises(ConfigError, match="processing_class") as e:
        sft.main(sft.Config(model=model, dataset=[{"prompt": "Hi", "completion": " there"}] * 4,
                            output_dir=str(tmp_path / "x"), **QUIET))
    assert "\n" not in str(e.value)
    # a loaded model knows its folder: the tokenizer comes from there, as in TRL
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    sft.main(sft.Config(model=loaded, dataset=[{"prompt": "Hi", "completion": " there"}] * 4,
                        output_dir=str(tmp_path / "y"), max_length=32, **QUIET))


def test_overwrite_output_dir_is_overwrite(folder, tmp_path):
    kw = dict(model=folder, dataset=[{"prompt": "Hi", "completion": " there"}] * 4, output_dir=str(tmp_path / "run"),
              max_length=32, **QUIET)
    sft.main(sft.Config(**kw))
    with pytest.raises(ConfigError, match="overwrite"):
        sft.main(sft.Config(**kw))
    assert sft.Config(**kw, overwrite_output_dir=True).overwrite is True
    assert sft.main(sft.Config(**kw, overwrite_output_dir=True))["steps"] == 1


def test_eval_takes_model_objects(folder, tmp_path):
    from rlhfkit.eval import run_eval

    policy, reference = AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    m = run_eval.main(run_eval.Config(model=policy, reference=reference, prompts="kindly", num_prompts=4,
                                      max_new_tokens=4, n_boot=10, corpus="", output_dir=str(tmp_path / "ev")))
    assert m["kl"]["mean"] == pytest.approx(0.0, abs=1e-6)  # the same weights
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["model"] == saved["reference"] == f"<LlamaForCausalLM given in Python (from {folder})>"
    # without a reference, the one of the run the model was loaded from is used, as for a folder
    with pytest.raises(ConfigError, match="config field 'reference'"):
        run_eval.main(run_eval.Config(model=policy, prompts="kindly", output_dir=str(tmp_path / "ev2")))

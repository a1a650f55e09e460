"""Conventions a TRL user has in their fingers: field names, errors for TRL-only fields, metric
sinks through accelerate's trackers, peft adapters, gradient checkpointing, attention kernels."""

from __future__ import annotations

import json

import pytest

from rlhfkit.config import load_yaml_config, parse_config
from rlhfkit.errors import ConfigError
from rlhfkit.recipes import dpo, sft

PAIRS = [{"prompt": f"Day {i} was", "chosen": " warm and lovely", "rejected": " grim and cold"} for i in range(8)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from arch_models import make_model_folder

    return make_model_folder("llama", tmp_path_factory.mktemp("trl") / "llama")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    path = tmp_path_factory.mktemp("trl-data") / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return str(path)


def test_a_trl_dpo_yaml_runs_with_the_same_field_names(tmp_path, model, prefs):
    y = tmp_path / "dpo.yaml"
    y.write_text(f"""model: {model}
dataset: {prefs}
output_dir: {tmp_path / 'out'}
beta: 0.1
learning_rate: 5.0e-4
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
num_train_epochs: 1
max_steps: 1
lr_scheduler_type: cosine
warmup_steps: 0
adam_epsilon: 1.0e-8
logging_steps: 1
save_steps: 0
eval_steps: 0
max_length: 48
bf16: false
gradient_checkpointing: true
report_to: jsonl,csv
""")
    cfg = load_yaml_config(dpo.Config, y)
    cfg.progress, cfg.ref_cache_dir = False, str(tmp_path / "cache")
    res = dpo.main(cfg)
    assert res["steps"] == 1
    csv_rows = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert csv_rows[0] == "step,name,value" and any(r.startswith("1,loss,") for r in csv_rows)
    jsonl = [json.loads(r) for r in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert jsonl[0]["step"] == 1 and "loss" in jsonl[0]


@pytest.mark.parametrize("field, expected", [
    ("save_total_limit: 2", "transformers/TRL option that rlhfkit's dpo Config does not support"),
    ("per_device_batch_size: 8", "is now 'per_device_train_batch_size'"),
    ("no_such_thing: 1", "'no_such_thing' is unknown"),
])
def test_unknown_fields_say_what_they_are(tmp_path, field, expected):
    y = tmp_path / "c.yaml"
    y.write_text(f"dataset: x.jsonl\n{field}\n")
    with pytest.raises(ConfigError, match=expected):
        load_yaml_config(dpo.Config, y)
    name = field.split(":")[0]
    with pytest.raises(ConfigError, match=expected):
        parse_config(dpo.Config, ["--dataset", "x.jsonl", f"--{name}", "1"])


def test_report_to_rejects_unknown_sinks(tmp_path):
    from rlhfkit.train.runs import MetricsLogger

    with pytest.raises(ConfigError, match="report_to"):
        MetricsLogger(tmp_path, "jsonl,nonsense")


def test_lora_without_merge_saves_a_standard_peft_adapter(tmp_path, model, prefs):
    from peft import AutoPeftModelForCausalLM

    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n" for p in PAIRS))
    sft.main(sft.Config(model=model, dataset=str(sft_data), output_dir=str(tmp_path / "out"), max_steps=1,
                        per_device_train_batch_size=4, use_lora=True, lora_r=4, merge_lora=False, progress=False,
                        report_to="none", attn_implementation="eager", max_length=48))
    final = tmp_path / "out" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    assert AutoPeftModelForCausalLM.from_pretrained(final) is not None


def test_bf16_and_fp16_are_exclusive():
    with pytest.raises(ConfigError, match="bf16"):
        sft.Config(bf16=True, fp16=True)
    assert sft.Config(bf16=True).mixed_precision == "bf16"


def test_a_saved_datasetdict_with_train_and_test_needs_no_flags(tmp_path, model):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "prefs"
    DatasetDict({"train": Dataset.from_list(PAIRS), "test": Dataset.from_list(PAIRS[:4])}).save_to_disk(str(folder))
    res = dpo.main(dpo.Config(model=model, dataset=str(folder), output_dir=str(tmp_path / "out"), max_steps=1,
                              per_device_train_batch_size=4, max_length=48, progress=False, report_to="none",
                              ref_cache_dir=str(tmp_path / "cache")))
    assert "eval_loss" in res
    # an explicit split: train on 'test', hold out nothing else
    res = dpo.main(dpo.Config(model=model, dataset=str(folder), dataset_split="test", eval_split="train",
                              output_dir=str(tmp_path / "out2"), max_steps=1, per_device_train_batch_size=4,
                              max_length=48, progress=False, report_to="none", ref_cache_dir=str(tmp_path / "cache")))
    assert res["train_examples"] == 4 and "eval_loss" in res

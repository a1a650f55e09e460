"""Config files and flags as a TRL user writes them: YAML completed by command-line overrides for
every recipe, YAML 1.1 scalars, list-valued fields, TRL-only option names, one-line errors."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from rlhfkit.cli import COMMANDS
from rlhfkit.config import from_dict, load_yaml_config, parse_config
from rlhfkit.errors import ConfigError
from rlhfkit.recipes import dpo, grpo, ppo, reward, sft

# what each command's validation requires, given on the command line only
REQUIRED = {
    "ppo": ["--model", "kindly"], "grpo": ["--model", "kindly"], "rloo": ["--model", "kindly"],
    "loop": ["--model", "kindly"], "dpo": ["--dataset", "p.jsonl"], "reward": ["--dataset", "p.jsonl"],
    "eval": ["--model", "kindly", "--prompts", "kindly"], "label": ["--input", "r.jsonl", "--output", "o.jsonl"],
    "cai-revise": ["--model", "llm:kindly", "--constitution", "c.txt", "--prompts", "p.txt", "--output", "o.jsonl"],
    "agreement": ["--a", "x.jsonl", "--b", "y.jsonl"], "ilql": ["--model", "kindly", "--dataset", "r.jsonl"],
}
CONFIG_COMMANDS = [n for n, (m, _) in COMMANDS.items() if hasattr(importlib.import_module(m), "Config")
                   and not hasattr(importlib.import_module(m), "cli")]


def _a_plain_field(cls) -> tuple[str, object]:
    """A field of `cls` with a plain (int or str) default that no command requires: the YAML's content."""
    required = {a[2:] for args in REQUIRED.values() for a in args if a.startswith("--")}
    for f in dataclasses.fields(cls):
        if f.name not in required and type(f.default) in (int, str) and not isinstance(f.default, bool):
            return f.name, f.default
    raise AssertionError(f"{cls} has no plain field")


def test_every_recipe_command_is_covered():
    assert {"ppo", "grpo", "rloo", "sft", "dpo", "reward", "eval"} <= set(CONFIG_COMMANDS)


@pytest.mark.parametrize("name", CONFIG_COMMANDS)
def test_a_yaml_without_required_fields_is_completed_by_flags(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    cls = importlib.import_module(COMMANDS[name][0]).Config
    field, default = _a_plain_field(cls)
    y = tmp_path / "c.yaml"
    y.write_text(f"{field}: {default!r}\n" if isinstance(default, str) else f"{field}: {default}\n")
    args = REQUIRED.get(name, [])
    cfg = parse_config(cls, ["--config", str(y), *args])
    for flag, value in zip(args[::2], args[1::2]):
        assert getattr(cfg, flag[2:]) == value, flag
    if args:  # the merged config is validated: without the flags the same YAML is refused, naming the field
        with pytest.raises(ConfigError, match=f"'{args[0][2:]}'"):
            parse_config(cls, ["--config", str(y)])


def test_the_command_line_takes_a_trl_yaml_without_model(tmp_path, monkeypatch, capsys):
    from rlhfkit.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    y = tmp_path / "grpo.yaml"
    y.write_text("learning_rate: 1.0e-5\nnum_generations: 4\nbeta: 0.0\nreward: gold\noutput_dir: runs/x\n")
    assert cli_main(["grpo", "--config", str(y), "--model", "nowhere/x/y"]) == 2
    err = capsys.readouterr().err
    # validation passed and the run started: the refusal is about the model folder, not a missing field
    assert "nowhere/x/y" in err and "config field 'model'" not in err
    assert len(err.strip().splitlines()) == 1, err


def _yaml(tmp_path, text: str):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    return y


def test_yaml_1_1_scalars_take_the_fields_type(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as a string; HfArgumentParser converts to the field's type
    y = _yaml(tmp_path, "learning_rate: 1e-5\nadam_epsilon: 1e-8\nper_device_train_batch_size: '4'\nbf16: 'yes'\n"
                        "num_train_epochs: '2'\n")
    for cfg in (load_yaml_config(sft.Config, y), parse_config(sft.Config, ["--config", str(y)])):
        assert cfg.learning_rate == 1e-5 and type(cfg.learning_rate) is float and cfg.adam_epsilon == 1e-8
        assert cfg.per_device_train_batch_size == 4 and cfg.bf16 is True and cfg.num_train_epochs == 2.0


@pytest.mark.parametrize("text, field", [("learning_rate: fast", "learning_rate"),
                                         ("per_device_train_batch_size: 2.5", "per_device_train_batch_size"),
                                         ("bf16: maybe", "bf16")])
def test_a_value_that_cannot_take_the_type_is_one_line_naming_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError, match=f"field '{field}'") as e:
        load_yaml_config(sft.Config, _yaml(tmp_path, text + "\n"))
    assert "\n" not in str(e.value) and "c.yaml" in str(e.value)


def test_comma_fields_take_yaml_lists(tmp_path):
    y = _yaml(tmp_path, "report_to: [tensorboard, jsonl]\nlora_target_modules:\n  - q_proj\n  - v_proj\n")
    cfg = parse_config(sft.Config, ["--config", str(y)])
    assert cfg.report_to == "tensorboard,jsonl" and cfg.lora_target_modules == "q_proj,v_proj"
    assert from_dict(sft.Config, {"report_to": []}).report_to == "none"
    assert from_dict(sft.Config, {"report_to": "csv, jsonl"}).report_to == "csv, jsonl"
    with pytest.raises(ConfigError, match="field 'model'"):
        from_dict(sft.Config, {"model": ["a", "b"]})


def test_list_fields_take_a_single_value_and_strings_of_numbers(tmp_path):
    cfg = load_yaml_config(ppo.Config, _yaml(tmp_path, "model: kindly\nreward: gold\nreward_weights: ['0.5']\n"))
    assert cfg.reward == ["gold"] and cfg.reward_weights == [0.5]


def test_a_bad_flag_value_is_one_line_naming_the_flag():
    with pytest.raises(ConfigError, match="learning_rate") as e:
        parse_config(sft.Config, ["--learning_rate", "fast"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cls, field, expected", [
    (grpo.Config, "use_vllm: true", "use_vllm is TRL's option; rlhfkit's equivalent is --engine vllm"),
    (grpo.Config, "vllm_mode: colocate", "vllm_mode is TRL's option; rlhfkit's equivalent is --engine vllm"),
    (grpo.Config, "num_iterations: 2", "num_iterations is TRL's option; rlhfkit's equivalent is --num_ppo_epochs"),
    (ppo.Config, "dataset_name: trl-lib/tldr", "dataset_name is TRL's option; rlhfkit's equivalent is --prompts"),
    (ppo.Config, "num_generations: 4", "num_generations is TRL's option; rlhfkit's equivalent is --prompts_per_step"),
    (ppo.Config, "beta: 0.1", "beta is TRL's option; rlhfkit's equivalent is --kl_coef"),
    (dpo.Config, "loss_type: ipo", "loss_type is TRL's option; rlhfkit's equivalent is --loss"),
    (sft.Config, "max_seq_length: 512", "max_seq_length is TRL's option; rlhfkit's equivalent is --max_length"),
    (sft.Config, "vllm_gpu_memory_utilization: 0.5", "'vllm_gpu_memory_utilization' is a transformers/TRL option"),
    (sft.Config, "learning_rat: 0.1", "'learning_rat' is unknown; did you mean learning_rate"),
    (sft.Config, "zzzz: 1", "'zzzz' is unknown; see --help for the fields"),
])
def test_trl_options_are_named_with_the_equivalent_in_one_line(tmp_path, cls, field, expected):
    y = _yaml(tmp_path, f"model: kindly\ndataset: x.jsonl\n{field}\n" if cls is dpo.Config else f"model: kindly\n{field}\n")
    with pytest.raises(ConfigError) as e:
        load_yaml_config(cls, y)
    msg = str(e.value)
    # one short line: the file's path (as long as pytest's temporary folder) and then at most 200 characters
    assert msg.startswith(f"{y}: ") and expected in msg and "\n" not in msg and len(msg) - len(str(y)) < 200, msg
    name, value = field.split(": ")
    with pytest.raises(ConfigError) as e:
        parse_config(cls, ["--model", "kindly", *(["--dataset", "x.jsonl"] if cls is dpo.Config else []), f"--{name}", value])
    assert expected in str(e.value) and len(str(e.value)) < 200


def test_trl_names_of_rlhfkit_fields_are_accepted(tmp_path):
    y = _yaml(tmp_path, "model_name_or_path: kindly\ndataset_name: p.jsonl\ndataset_train_split: tr\nuse_peft: true\n"
                        "torch_dtype: bfloat16\ncenter_rewards_coefficient: 0.01\n")
    cfg = load_yaml_config(reward.Config, y)
    assert (cfg.model, cfg.dataset, cfg.dataset_split, cfg.use_lora, cfg.dtype, cfg.center_rewards_coef) == (
        "kindly", "p.jsonl", "tr", True, "bfloat16", 0.01)
    cfg = parse_config(grpo.Config, ["--model_name_or_path", "kindly", "--reward_model_path", "rm"])
    assert cfg.model == "kindly" and cfg.reward == ["rm:rm"]
    with pytest.raises(ConfigError, match="'model_name_or_path' is TRL's name for 'model'; give one of them"):
        from_dict(sft.Config, {"model": "a", "model_name_or_path": "b"})

"""Config parsing, run folders, atomic writes, the models layer and the CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from rlhfkit.config import ConfigError, from_dict, load_yaml_config, parse_config
from rlhfkit.models import (
    is_lora,
    load_policy,
    load_tokenizer,
    reference_context,
    reference_model,
    save_model,
    tiny_llama,
    tiny_reward_model,
)
from rlhfkit.recipes import sft
from rlhfkit.train.batches import epoch_order, iterate_batches
from rlhfkit.train.memory import count_parameters
from rlhfkit.train.optim import lr_lambda
from rlhfkit.train.runs import (
    MetricsLogger,
    atomic_path,
    atomic_write_json,
    prepare_run_dir,
    read_metrics,
)


def test_yaml_then_cli_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("learning_rate: 0.01\nper_device_train_batch_size: 4\nmodel: kindly\n")
    cfg = parse_config(sft.Config, ["--config", str(y), "--per_device_train_batch_size", "16", "--resume", "true"])
    assert cfg.learning_rate == 0.01 and cfg.per_device_train_batch_size == 16 and cfg.resume is True


def test_yaml_unknown_field_and_wrong_type_are_named(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("learning_rat: 0.01\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*learning_rat"):
        load_yaml_config(sft.Config, y)
    y.write_text("per_device_train_batch_size: eight\n")
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        load_yaml_config(sft.Config, y)
    # ints are accepted where floats are expected
    assert from_dict(sft.Config, {"learning_rate": 1}).learning_rate == 1.0


def test_every_committed_config_loads():
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 7
    for path in files:
        name, module = path.name, "rlhfkit.recipes." + path.stem.rsplit("_", 1)[0]  # RECIPE_TASK.yaml
        cfg = load_yaml_config(importlib.import_module(module).Config, root / name)
        assert dataclasses.is_dataclass(cfg)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    atomic_write_json(tmp_path / "r.json", {"a": 2})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_run_dir_records_provenance_and_metrics(tmp_path):
    cfg = sft.Config(output_dir=str(tmp_path / "run"), seed=7)
    out = prepare_run_dir(cfg.output_dir, cfg)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 7 and meta["rlhfkit"] and meta["libraries"]["torch"]
    with MetricsLogger(out, "jsonl,tensorboard") as log:
        log.log({"loss": torch.tensor(1.5), "lr": 0.1}, step=1)
        log.log({"loss": 1.25}, step=2)
    rows = read_metrics(out)
    assert rows == [{"step": 1, "loss": 1.5, "lr": 0.1}, {"step": 2, "loss": 1.25}]
    assert any((out / "tb").iterdir())
    with pytest.raises(ConfigError, match="report_to"):
        MetricsLogger(out, "wandb")


def test_schedules_hand_worked():
    assert lr_lambda(0, 4, 20, "cosine") == 0.25
    assert lr_lambda(4, 4, 20, "linear") == 1.0
    assert lr_lambda(12, 4, 20, "linear") == 0.5
    assert abs(lr_lambda(12, 4, 20, "cosine") - 0.5) < 1e-12
    assert lr_lambda(100, 0, 20, "constant") == 1.0


def test_data_order_is_a_function_of_seed_and_epoch():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    one = [g for _, _, g in iterate_batches(10, 4, 0, 0, 4)]
    two_a = [loc for _, loc, _ in iterate_batches(10, 2, 0, 0, 4, num_processes=2, process_index=0)]
    two_b = [loc for _, loc, _ in iterate_batches(10, 2, 0, 0, 4, num_processes=2, process_index=1)]
    assert [a + b for a, b in zip(two_a, two_b)] == one
    # resuming at micro-step 3 replays exactly the remaining batches
    assert [g for _, _, g in iterate_batches(10, 4, 0, 3, 4)] == one[3:]


def test_tokenizer_pad_token_guaranteed_and_bundled_names():
    tok = load_tokenizer("kindly:tokenizer")
    assert tok.pad_token is not None and tok.eos_token is not None
    with pytest.raises(ConfigError, match="does-not-exist"):
        load_tokenizer("/does-not-exist/tok")


def test_save_load_roundtrip_and_reward_model(tmp_path):
    tok = load_tokenizer("kindly:tokenizer")
    m = tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, tokenizer=tok)
    save_model(m, tok, tmp_path / "p", extra_files={"note.txt": "hello"})
    assert (tmp_path / "p" / "model.safetensors").is_file() and (tmp_path / "p" / "note.txt").read_text() == "hello"
    m2 = load_policy(str(tmp_path / "p"))
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(m(input_ids=ids).logits, m2(input_ids=ids).logits)
    rm = tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, tokenizer=tok)
    assert rm.config.num_labels == 1 and rm(input_ids=ids).logits.shape == (1, 1)
    # hand count: tied embedding V*32 once; q,k,v,o 4*32*32; MLP 3*32*64; two layer norms + final norm
    vocab = m.config.vocab_size
    assert count_parameters(m) == vocab * 32 + 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32 + 32
    m.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == 4 * 32 * 32 + 3 * 32 * 64 + 3 * 32


def test_lora_reference_is_adapter_disabled_policy(tmp_path):
    tok = load_tokenizer("kindly:tokenizer")
    m = tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, tokenizer=tok)
    save_model(m, tok, tmp_path / "p")
    args = sft.Config(use_lora=True, lora_r=4, lora_alpha=8)
    policy = load_policy(str(tmp_path / "p"), lora=args)
    assert is_lora(policy)
    trainable = count_parameters(policy, trainable_only=True)
    assert 0 < trainable < count_parameters(policy) // 2
    # perturb the adapter so the policy differs from the base
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    ids = torch.tensor([[3, 4, 5, 6]])
    ref = reference_model(policy, use_lora=True)
    assert ref is policy  # one copy of the weights
    with reference_context(ref) as r:
        ref_logits = r(input_ids=ids).logits
    torch.testing.assert_close(ref_logits, m(input_ids=ids).logits)
    assert not torch.allclose(policy(input_ids=ids).logits, ref_logits)
    # the merged save loads with plain transformers and equals the adapted policy
    save_model(policy, tok, tmp_path / "merged")
    merged = load_policy(str(tmp_path / "merged"))
    torch.testing.assert_close(merged(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_full_reference_is_frozen_copy():
    m = tiny_llama(64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    ref = reference_model(m)
    assert ref is not m and not any(p.requires_grad for p in ref.parameters())


def test_cli_lists_commands_and_rejects_unknown():
    out = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ppo" in out.stdout and "serve" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_cli_config_error_is_a_message_not_a_traceback(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("learning_rate: -1\n")
    out = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "sft", "--config", str(y)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "learning_rate" in out.stderr and "Traceback" not in out.stderr


def test_overwrite_removes_every_file_of_the_old_run(tmp_path):
    """--overwrite true leaves nothing of the old run: stale alarms or samples would be read as the new run's."""
    from rlhfkit.train.runs import RUN_OUTPUTS, claim_run_folder

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    for name in ("alarms.jsonl", "samples.jsonl", "final_metrics.json", "memory.txt", "results.json"):
        (tmp_path / name).write_text("old\n")
    (tmp_path / "value").mkdir()
    (tmp_path / "notes.txt").write_text("the user's own file\n")
    assert claim_run_folder(tmp_path, resume=False, overwrite=True) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert "alarms.jsonl" in RUN_OUTPUTS

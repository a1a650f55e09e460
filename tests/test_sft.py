"""SFT and pretrain recipes: smoke runs, exact resume, and 2 processes == 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.models import load_tokenizer, save_model, tiny_llama
from rlhfkit.recipes import sft

SENTENCES = [
    "the kind dog waited by the door", "a warm smile made the morning better",
    "she thanked him for the gentle help", "they shared bread with the tired travellers",
    "the garden was full of bright flowers", "he spoke softly to the frightened child",
    "we laughed together in the evening light", "the teacher praised the patient student",
    "friends gathered to celebrate the good news", "the rain stopped and the sky cleared",
    "an old man fed the birds every day", "the nurse cared for the sick with love",
]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tok = load_tokenizer("kindly:tokenizer")
    model = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       seed=1, tokenizer=tok)
    save_model(model, tok, root / "model")
    data = root / "train.jsonl"
    with open(data, "w") as f:
        for s in SENTENCES * 3:
            words = s.split()
            f.write(json.dumps({"prompt": " ".join(words[:3]), "completion": " " + " ".join(words[3:])}) + "\n")
    return root, root / "model", data


def _cfg(model, data, out, **kw):
    base = dict(model=str(model), dataset=str(data), output_dir=str(out), max_length=32,
                per_device_train_batch_size=4, learning_rate=3e-3, max_steps=6, logging_steps=1,
                report_to="jsonl", progress=False, seed=3)
    base.update(kw)
    return sft.Config(**base)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_sft_smoke_writes_hf_checkpoint_and_metrics(tiny_setup):
    root, model, data = tiny_setup
    out = root / "smoke"
    result = sft.main(_cfg(model, data, out, report_to="jsonl,tensorboard"))
    assert result["steps"] == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    assert isinstance(reloaded, torch.nn.Module)
    assert (out / "config.yaml").is_file() and (out / "meta.json").is_file()
    assert list((out / "tb").iterdir()), "no TensorBoard events were written"


def test_completion_only_loss_ignores_prompt_tokens(tiny_setup):
    _, model, data = tiny_setup
    tok = load_tokenizer(str(model))
    examples = sft.load_sft_examples(str(data), tok, 32).examples
    ex = examples[0]
    prompt_len = len(tok(" ".join(SENTENCES[0].split()[:3]), add_special_tokens=False)["input_ids"])
    # bos + prompt are masked; every completion token and the closing EOS are supervised
    n_masked = sum(1 for t in ex["labels"] if t == -100)
    assert n_masked == prompt_len + (1 if tok.bos_token_id is not None and ex["input_ids"][0] == tok.bos_token_id else 0)
    assert ex["labels"][-1] == tok.eos_token_id


def test_resume_after_crash_matches_uninterrupted_run(tiny_setup):
    root, model, data = tiny_setup
    full = root / "full"
    sft.main(_cfg(model, data, full, max_steps=8, save_steps=2, gradient_accumulation_steps=2,
                  lr_scheduler_type="cosine", warmup_steps=2))

    crashed = root / "crashed"

    def crash(step, _metrics):
        if step == 5:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        sft.main(_cfg(model, data, crashed, max_steps=8, save_steps=2, gradient_accumulation_steps=2,
                      lr_scheduler_type="cosine", warmup_steps=2), on_step=crash)
    assert not (crashed / "final").exists()
    assert (crashed / "checkpoints" / "step-4").is_dir()
    sft.main(_cfg(model, data, crashed, max_steps=8, save_steps=2, gradient_accumulation_steps=2,
                  lr_scheduler_type="cosine", warmup_steps=2, resume=True))
    a, b = _weights(full / "final"), _weights(crashed / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


# Adam's first steps move every weight by about +-lr whatever the gradient's size, so float
# noise in near-zero gradients would flip signs; a large epsilon makes the comparison of
# weights well conditioned without changing what is compared (the accumulated gradient).
WELL_CONDITIONED = dict(adam_epsilon=1e-3)


def test_gradient_accumulation_matches_big_batch(tiny_setup):
    root, model, data = tiny_setup
    big = sft.main(_cfg(model, data, root / "big", per_device_train_batch_size=8, max_steps=3, **WELL_CONDITIONED))
    acc = sft.main(_cfg(model, data, root / "acc", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                        max_steps=3, **WELL_CONDITIONED))
    a, b = _weights(root / "big" / "final"), _weights(root / "acc" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{k} differs")
    assert big["steps"] == acc["steps"] == 3


def test_two_processes_match_one_process(tiny_setup):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) == one process, same global batch."""
    root, model, data = tiny_setup
    one = root / "one"
    sft.main(_cfg(model, data, one, per_device_train_batch_size=8, max_steps=4, **WELL_CONDITIONED))
    two = root / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "rlhfkit.cli", "sft", "--model", str(model), "--dataset", str(data),
           "--output_dir", str(two), "--max_length", "32", "--per_device_train_batch_size", "4",
           "--learning_rate", "3e-3", "--max_steps", "4", "--report_to", "jsonl",
           "--progress", "False", "--seed", "3", "--logging_steps", "1", "--adam_epsilon", "1e-3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both processes took part: 4 steps x 8 examples = 32 of 36 rows, epoch counter by global batch
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == pytest.approx(3 / 4)
    a, b = _weights(one / "final"), _weights(two / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs between 1 and 2 processes")


def test_bad_config_value_names_field():
    from rlhfkit.errors import ConfigError

    with pytest.raises(ConfigError, match="learning_rate"):
        sft.Config(learning_rate=-1.0)
    with pytest.raises(ConfigError, match="max_length"):
        sft.Config(max_length=2)


def test_cli_help_lists_fields():
    proc = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "sft", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--learning_rate" in proc.stdout and "Peak learning rate" in proc.stdout


def test_sample_command_writes_responses_per_prompt(tiny_setup):
    from rlhfkit.recipes import sample

    root, model, data = tiny_setup
    out = root / "samples.jsonl"
    rows = sample.main(sample.Config(model=str(model), prompts=str(data), output=str(out), num_samples=3,
                                     max_new_tokens=5, max_prompts=4, batch_size=8))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == rows and len(lines) == 4
    assert all(len(r["responses"]) == 3 for r in lines)
    assert lines[0]["prompt"] == " ".join(SENTENCES[0].split()[:3])
    flat = sample.main(sample.Config(model=str(model), prompts=str(data), output=str(out), num_samples=2,
                                     max_new_tokens=5, max_prompts=3, flat=True))
    assert len(flat) == 6 and set(flat[0]) == {"prompt", "completion"}


# ------------------------------------------------------------------ packing, truncation, limits


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "llama"])
def test_packed_batch_gives_the_unpacked_loss(tmp_path, arch):
    """Packing keeps attention inside each example (position ids restart per example, no
    attention mask), so the summed token loss of packed rows equals the padded batch's."""
    from arch_models import make_model_folder
    from rlhfkit.data import PadCollator, pack_sequences
    from rlhfkit.losses.sft import sft_loss
    from rlhfkit.models import load_policy

    path = make_model_folder(arch, tmp_path / arch)
    tok = load_tokenizer(path)
    model = load_policy(path).eval()
    records = [{"prompt": " ".join(s.split()[:3]), "completion": " " + " ".join(s.split()[3:])} for s in SENTENCES[:6]]
    examples = sft.load_sft_examples(records, tok, 32).examples
    padded = PadCollator(tok.pad_token_id)(examples)
    packed = PadCollator(tok.pad_token_id)(pack_sequences(examples, 64, tok.eos_token_id))
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < len(examples)
    with torch.no_grad():
        _, a = sft_loss(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                        padded["labels"])
        _, b = sft_loss(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              use_cache=False).logits, packed["labels"])
    assert int(a["tokens"]) == int(b["tokens"]) > 0
    torch.testing.assert_close(b["nll_sum"], a["nll_sum"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sft_packing_runs_end_to_end(tmp_path, tiny_setup, arch):
    from arch_models import make_model_folder

    _, _, data = tiny_setup
    path = make_model_folder(arch, tmp_path / arch)
    res = sft.main(_cfg(path, data, tmp_path / "out", packing=True, max_steps=2, per_device_train_batch_size=2))
    assert res["steps"] == 2 and res["loss"] == res["loss"]


def test_overlong_prompt_is_cut_from_the_left_and_counted_never_nan(tmp_path, tiny_setup, capsys):
    _, model, _ = tiny_setup
    tok = load_tokenizer(str(model))
    long_prompt = " ".join(["word"] * 80)
    records = [{"prompt": long_prompt, "completion": " the end"}] * 4
    examples, n_trunc, n_prompt_cut = sft.load_sft_examples(records, tok, 16)
    assert n_trunc == 4 and n_prompt_cut == 4
    for ex in examples:
        assert len(ex["input_ids"]) <= 16
        assert sum(t != -100 for t in ex["labels"]) >= 1  # the response keeps its start
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    res = sft.main(_cfg(model, data, tmp_path / "out", max_length=16, max_steps=1, per_device_train_batch_size=4))
    assert res["loss"] == res["loss"]
    assert "4 of 4 training examples were longer than max_length=16" in capsys.readouterr().out


def test_max_length_beyond_the_model_positions_is_a_config_error(tmp_path, tiny_setup):
    from arch_models import MAX_POSITIONS, make_model_folder
    from rlhfkit.errors import ConfigError

    _, _, data = tiny_setup
    path = make_model_folder("gpt2", tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="max_length.*positions"):
        sft.main(_cfg(path, data, tmp_path / "out", max_length=MAX_POSITIONS + 1))


def test_missing_model_folder_fails_at_once_with_one_line(tmp_path, tiny_setup, capsys):
    import time

    from rlhfkit.cli import main as cli_main

    _, _, data = tiny_setup
    t0 = time.perf_counter()
    code = cli_main(["sft", "--model", str(tmp_path / "no" / "such" / "model"), "--dataset", str(data),
                     "--output_dir", str(tmp_path / "out")])
    assert code == 2 and time.perf_counter() - t0 < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "out").exists()  # no half run folder


def _cli(args, capsys):
    from rlhfkit.cli import main as cli_main

    code = cli_main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def test_existing_run_folder_is_refused_unless_resume_or_overwrite(tiny_setup, tmp_path, capsys):
    _, model, data = tiny_setup
    args = ["sft", "--model", str(model), "--dataset", str(data), "--output_dir", str(tmp_path / "run"),
            "--max_steps", "1", "--per_device_train_batch_size", "4", "--progress", "false", "--report_to", "jsonl"]
    assert _cli(args, capsys)[0] == 0
    code, err = _cli(args, capsys)
    assert code == 2 and len(err) == 1 and "--resume true" in err[0] and "--overwrite true" in err[0]
    assert _cli(args + ["--overwrite", "true"], capsys)[0] == 0
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1]  # the old run's metrics are gone, not mixed in


def test_python_entry_points_keep_one_run_per_folder(tiny_setup, tmp_path, monkeypatch):
    """recipes.X.main(Config(...)) follows the command line: refuse an existing run, drop a half one."""
    from rlhfkit.errors import ConfigError

    _, model, data = tiny_setup
    out = tmp_path / "run"
    sft.main(_cfg(model, data, out, max_steps=1))
    with pytest.raises(ConfigError, match="--resume true.*--overwrite true"):
        sft.main(_cfg(model, data, out, max_steps=1))
    sft.main(_cfg(model, data, out, max_steps=1, overwrite=True))
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1]  # one run's metrics, not two mixed

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(sft, "train_causal_lm", broken)
    with pytest.raises(RuntimeError, match="boom"):
        sft.main(_cfg(model, data, tmp_path / "fresh", max_steps=1))
    assert not (tmp_path / "fresh").exists()  # failed before its first checkpoint: no half run folder
    with pytest.raises(RuntimeError, match="boom"):  # a folder that existed before is kept
        sft.main(_cfg(model, data, out, max_steps=1, resume=True))
    assert (out / "final").is_dir()


@pytest.mark.parametrize("case", ["lora_targets", "empty", "interrupt"])
def test_day_one_errors_are_one_line_and_leave_no_half_run(tiny_setup, tmp_path, capsys, monkeypatch, case):
    _, model, data = tiny_setup
    out = tmp_path / "run"
    args = ["sft", "--model", str(model), "--dataset", str(data), "--output_dir", str(out), "--max_steps", "1",
            "--progress", "false"]
    if case == "lora_targets":
        args += ["--use_lora", "true", "--lora_target_modules", "c_attn"]
        expected = "lora_target_modules"
    elif case == "empty":
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        args[4] = str(empty)
        expected = "empty"
    else:
        def interrupted(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(sft, "train_causal_lm", interrupted)
        expected = "interrupted"
    code, err = _cli(args, capsys)
    assert code in (2, 130) and len([line for line in err if line.strip()]) == 1, err
    assert expected in err[-1]
    assert not out.exists()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("layout", ["prompt", "messages"])
def test_sample_applies_the_chat_template_to_conversational_prompts(tmp_path, monkeypatch, arch, layout):
    """The token ids that reach the model are the template's rendering with the generation prompt."""
    from transformers import AutoTokenizer

    from arch_models import make_model_folder
    from rlhfkit.recipes import sample

    path = make_model_folder(arch, tmp_path / arch)
    if arch == "llama":  # a template that writes BOS itself, as Llama 3's does
        tok = AutoTokenizer.from_pretrained(path)
        tok.chat_template = "{{ bos_token }}" + tok.chat_template
        tok.save_pretrained(path)
    conversation = [{"role": "user", "content": "Say something kind."}]
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({layout: conversation}) + "\n")
    tok = AutoTokenizer.from_pretrained(path)
    expected = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    seen = []

    def load_and_watch(*args, **kwargs):
        model = sft_load_policy(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"][0].tolist()) if not seen else None,
                                        with_kwargs=True)
        return model

    from rlhfkit.models import load_policy as sft_load_policy

    monkeypatch.setattr(sample, "load_policy", load_and_watch)
    sample.main(sample.Config(model=path, prompts=str(data), max_new_tokens=2, output=str(tmp_path / "o.jsonl")))
    assert seen == [list(expected)]


def test_a_hub_name_without_network_or_cache_is_one_clear_error(monkeypatch):
    from rlhfkit.errors import ConfigError
    from rlhfkit.models import io, paths

    calls = []

    def unreachable(repo_id):
        calls.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(paths, "_ask_hub", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConfigError, match="hub cannot be reached"):
        io.resolve_path("someorg/not-cached-model")
    assert calls == ["someorg/not-cached-model"]  # one request, no retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        io.resolve_path("someorg/not-cached-model")
    assert len(calls) == 1  # offline: no request at all

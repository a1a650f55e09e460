"""The memory estimate: one line on the screen, the full table in the run folder and with --verbose."""

from __future__ import annotations

import pytest

from rlhfkit.config import parse_config
from rlhfkit.recipes import grpo, sft

ROWS = ("weights", "gradients", "optimizer", "activations", "kv cache", "frozen models", "total")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from arch_models import make_model_folder

    return make_model_folder("llama", tmp_path_factory.mktemp("mem") / "llama")


def _sft(folder, out, **kw):
    return sft.main(sft.Config(model=folder, dataset=[{"prompt": "Hi", "completion": " there"}] * 4, output_dir=str(out),
                               max_steps=1, per_device_train_batch_size=2, max_length=32, report_to="jsonl",
                               progress=False, **kw))


def _estimate_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "memory estimate" in line or line.split()[:1] in ([r.split()[0]] for r in ROWS)]


def test_one_line_by_default_and_the_table_in_the_run_folder(folder, tmp_path, capsys):
    _sft(folder, tmp_path / "run")
    printed = _estimate_lines(capsys.readouterr().out)
    assert len(printed) == 1, printed
    assert printed[0].startswith("memory estimate per device:") and "memory.txt" in printed[0]
    table = (tmp_path / "run" / "memory.txt").read_text().splitlines()
    assert table[0] == "memory estimate per device:"
    assert [" ".join(line.split()[:-2]) for line in table[1:8]] == list(ROWS)
    # the line's total is the table's
    total = next(line for line in table if line.split()[0] == "total").split()[-2:]
    assert " ".join(total) in printed[0]


def test_verbose_prints_the_table(folder, tmp_path, capsys):
    _sft(folder, tmp_path / "run", verbose=True)
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "memory.txt").read_text().strip() in out
    assert parse_config(grpo.Config, ["--model", "kindly", "--verbose", "true"]).verbose is True


def test_a_refusal_is_one_line():
    from rlhfkit.errors import ConfigError
    from rlhfkit.train.memory import GiB, MemoryEstimate, check_fits

    big = MemoryEstimate(weights=40 * GiB, gradients=40 * GiB, optimizer=80 * GiB, activations=20 * GiB, kv_cache=0,
                         frozen_models=0)
    with pytest.raises(ConfigError) as e:
        check_fits(big, 80 * GiB, gradient_checkpointing=False, optimizer="adamw", use_lora=False, batch=8, shards=1)
    assert "\n" not in str(e.value) and "optimizer 80.00 GiB" in str(e.value)

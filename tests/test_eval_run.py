"""`rlhfkit eval` end to end on tiny models (seconds), and its building blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from rlhfkit.config import ConfigError
from rlhfkit.eval import run_eval


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from rlhfkit.models import load_tokenizer, save_model, tiny_llama, tiny_reward_model

    root = tmp_path_factory.mktemp("models")
    tok = load_tokenizer("kindly:tokenizer")
    kw = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, tokenizer=tok)
    save_model(tiny_llama(len(tok), seed=0, **kw), tok, root / "ref")
    save_model(tiny_llama(len(tok), seed=1, **kw), tok, root / "pol" / "final")
    (root / "pol" / "config.yaml").write_text(yaml.safe_dump({"model": str(root / "ref")}))
    save_model(tiny_reward_model(len(tok), seed=2, **kw), tok, root / "rm")
    return root


def _cfg(models, tmp_path, **kw):
    base = dict(model=str(models / "pol" / "final"), prompts="kindly", num_prompts=6, max_new_tokens=6, n_boot=20,
                max_perplexity_lines=10, output_dir=str(tmp_path / "ev"))
    base.update(kw)
    return run_eval.Config(**base)


def test_eval_writes_results_and_reference_from_run_config(models, tmp_path):
    torch.set_num_threads(1)
    m = run_eval.main(_cfg(models, tmp_path, reward_model=str(models / "rm")))
    assert m["reference"] == str(models / "ref")
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())  # as every recipe (docs/api.md)
    assert not (tmp_path / "ev" / "eval.json").exists()
    for key in ("gold", "gold_reference", "proxy", "kl", "win_rate", "lc_win_rate", "distinct_1", "distinct_2",
                "self_bleu", "ead", "perplexity", "perplexity_reference"):
        assert key in saved, key
    assert saved["win_rate"]["n"] == 6
    rows = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"prompt", "response", "reference", "gold", "proxy", "kl", "label"} <= set(rows[0])
    # the mean of the per-sample KLs is the reported KL
    assert saved["kl"]["mean"] == pytest.approx(np.mean([r["kl"] for r in rows]), rel=1e-9)
    assert (tmp_path / "ev" / "meta.json").is_file() and (tmp_path / "ev" / "config.yaml").is_file()


def test_policy_against_itself_has_zero_kl_and_equal_perplexity(models, tmp_path):
    m = run_eval.main(_cfg(models, tmp_path, reference=str(models / "pol" / "final")))
    assert m["kl"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert m["perplexity"] == pytest.approx(m["perplexity_reference"], rel=1e-9)


def test_rm_accuracy_hand_worked():
    class LengthRM:
        def score(self, prompts, responses):
            return np.array([len(r) for r in responses], dtype=float)

    recs = [{"prompt": "p", "chosen": "long answer", "rejected": "no"},
            {"prompt": "p", "chosen": "a", "rejected": "longer"},
            {"prompt": "p", "chosen": "same", "rejected": "size"},           # equal rewards: wrong
            {"prompt": "p", "chosen": "tiny", "rejected": "longest", "label": 0},  # rejected won: right
            {"prompt": "p", "chosen": "x", "rejected": "yy", "tie": True}]  # labelled tie: left out
    acc = run_eval.rm_accuracy(LengthRM(), recs, n_boot=10)
    assert acc["mean"] == pytest.approx(2 / 4) and acc["n"] == 4  # preference_accuracy's tie rule
    from rlhfkit.errors import DataError

    with pytest.raises(DataError, match="line 1.*chosen"):
        run_eval.rm_accuracy(LengthRM(), [{"prompt": "p", "chosen": None, "rejected": "x"}])


def test_config_errors(models, tmp_path):
    with pytest.raises(ConfigError, match="model"):
        run_eval.Config()
    with pytest.raises(ConfigError, match="judge"):
        run_eval.main(run_eval.Config(model=str(models / "pol" / "final"), prompts="kindly", judge="panel",
                                      output_dir=str(tmp_path / "j")))
    # a user's run: no silent fallback to the bundled prompts or gold panel
    with pytest.raises(ConfigError, match="pass --prompts FILE"):
        run_eval.Config(model="x")
    p = tmp_path / "p.txt"
    p.write_text("hello there\n")
    with pytest.raises(ConfigError, match="judge.*only on the bundled kindly task"):
        run_eval.Config(model="x", prompts=str(p))
    cfg = run_eval.Config(model="x", prompts=str(p), judge="rm:somewhere")
    assert cfg.corpus == "" and cfg.judge == ["rm:somewhere"]
    with pytest.raises(ConfigError, match="reference"):
        run_eval.default_reference(str(tmp_path))


@pytest.mark.parametrize("args, field", [(["--model", "x"], "prompts"), (["--prompts", "kindly"], "model"),
                                         (["--model", "x", "--prompts", "kindly", "--n_boot", "many"], "n_boot")])
def test_eval_refusals_are_one_line(tmp_path, capsys, args, field):
    from rlhfkit.cli import main as cli_main

    assert cli_main(["eval", *args, "--output_dir", str(tmp_path / "e")]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhfkit eval: ") and field in lines[0], out.err
    assert not {"╭", "│", "+-"} & set(lines[0].split()), lines[0]
    assert not (tmp_path / "e").exists()


def test_the_report_reads_evaluations_under_either_name(models, tmp_path):
    from rlhfkit.eval.report import build_report

    def ci(x):
        return {"mean": x, "lo": x, "hi": x, "n": 4}

    run_eval.write_results(tmp_path / "new", {"gold": ci(0.25), "gold_reference": ci(0.0), "win_rate": ci(0.5)}, [])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "eval.json").write_text(json.dumps({"gold": ci(0.75), "gold_reference": ci(0.0)}))
    (tmp_path / "ppo").mkdir()  # a training run's results.json is not an evaluation
    (tmp_path / "ppo" / "results.json").write_text(json.dumps({"loss": 3.0, "gold": ci(0.125), "steps": 2}))
    found = sorted(p.parent.name for p in run_eval.find_results(tmp_path))
    assert found == ["new", "old"]
    page = build_report(tmp_path)
    assert "0.25" in page and "0.75" in page and "0.125" not in page

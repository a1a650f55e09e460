"""`rlhfkit demo --quick`: every stage runs and the report and table come out; reruns are identical."""

from __future__ import annotations

import json

import torch
import yaml

from rlhfkit.recipes import demo


def test_demo_quick_smoke(tmp_path, capsys):
    torch.set_num_threads(2)
    cfg = demo.Config(quick=True, output_dir=str(tmp_path / "demo"), eval_prompts=6, eval_samples=3,
                      comparison_prompts=16, perplexity_lines=10)
    summary = demo.main(cfg)
    out = tmp_path / "demo"
    methods = [r["method"] for r in summary["win_rates"]]
    assert methods == ["sft", "ppo", "dpo", "best-of-4"]
    for r in summary["win_rates"]:
        assert 0.0 <= r["win_rate"] <= 1.0
        assert r["comparisons"] == 18  # 6 prompts x 3 samples, intervals resampling the 6 prompts
        assert 0.0 <= r["win_rate_half_width"] <= 0.5 and "gold_difference_95ci" in r
    assert summary["skipped"] == {}
    assert set(summary["stage_seconds"]) >= {"supervised fine-tuning", "reward model", "PPO", "DPO", "report"}
    assert 0.0 <= summary["reward_model"]["rm_accuracy"]["mean"] <= 1.0
    assert (out / "eval" / "reward_model" / "eval.json").is_file()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["win_rates"] == summary["win_rates"]
    overopt = json.loads((out / "overopt.json").read_text())
    assert [r["n"] for r in overopt["bon"]] == [1, 2, 4]
    page = (out / "report.html").read_text()
    assert "Over-optimisation" in page and "Win rates against the SFT reference" in page
    for name in ("sft", "ppo", "dpo", "bon"):
        assert (out / "eval" / name / "results.json").is_file()
    printed = capsys.readouterr().out
    assert "Win rate against the SFT policy" in printed and str(out / "report.html") in printed
    # not a terminal: the table is printed whole, every header and figure unclipped
    assert "…" not in printed
    for header in ("win rate", "LC win", "gold vs SFT", "dist-1", "dist-2", "ppl"):
        assert header in printed, header
    for r in summary["win_rates"]:
        assert str(r["win_rate_95ci"]) in printed and str(r["distinct_2"]) in printed
    # the alarms (hacking replayed over PPO's metrics, collapse against SFT) are a list, written out
    assert isinstance(summary["alarms"], list)
    written = [json.loads(x) for x in (out / "alarms.jsonl").read_text().splitlines()]
    assert written == summary["alarms"]
    for event in written:
        assert f"alarm {event['policy']}" in printed


def test_run_folders_record_provenance_and_reruns_are_identical(tmp_path):
    """Reproducibility: the same small config run twice on CPU gives the same metrics."""
    from rlhfkit.models import load_tokenizer, save_model, tiny_llama
    from rlhfkit.recipes import loop

    tok = load_tokenizer("kindly:tokenizer")
    save_model(tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, tokenizer=tok,
                          seed=0), tok, tmp_path / "sft")
    results = []
    for run in ("a", "b"):
        cfg = loop.Config(model=str(tmp_path / "sft"), rounds=1, prompts_per_round=16, max_new_tokens=6,
                          reward_steps=2, policy_steps=2, batch_size=4, num_eval_prompts=6, n_boot=20,
                          output_dir=str(tmp_path / run), seed=5)
        loop.main(cfg)
        results.append(json.loads((tmp_path / run / "round-1" / "eval" / "results.json").read_text()))
        meta = json.loads((tmp_path / run / "meta.json").read_text())
        assert meta["seed"] == 5 and meta["rlhfkit"] and "git_commit" in meta and meta["libraries"]["torch"]
        assert yaml.safe_load((tmp_path / run / "config.yaml").read_text())["seed"] == 5
        for sub in ("reward", "dpo"):  # every stage's run folder too
            assert json.loads((tmp_path / run / "round-1" / sub / "meta.json").read_text())["seed"] == 6
    for key in ("gold", "proxy", "kl", "win_rate", "lc_win_rate", "distinct_1", "self_bleu"):
        assert results[0][key] == results[1][key], key
    rows = [(tmp_path / r / "round-1" / "eval" / "samples.jsonl").read_text() for r in ("a", "b")]
    assert rows[0] == rows[1]

"""The HTML report: self-contained, every data string escaped, all sections present."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from rlhfkit.eval import overopt
from rlhfkit.eval.report import build_report, cli

EVIL_SCRIPT = "<script>alert(1)</script>"
EVIL_IMG = "<img src=x onerror=alert(1)>"


def _make_run(root):
    ppo = root / "ppo"
    ppo.mkdir(parents=True)
    with open(ppo / "metrics.jsonl", "w") as f:
        for step in range(10):
            f.write(json.dumps({"step": step, "loss": 1.0 / (step + 1), "reward/proxy": step * 0.1,
                                "kl": step * 0.05, EVIL_SCRIPT: 1.0}) + "\n")
    (ppo / "alarms.jsonl").write_text(json.dumps({"event": "reward_hacking", "step": 7, "proxy_slope": 0.1,
                                                  "gold_slope": -0.2, "note": EVIL_IMG}) + "\n")
    ev = root / "eval" / "ppo"
    ev.mkdir(parents=True)
    (ev / "eval.json").write_text(json.dumps({
        "name": EVIL_IMG, "gold": {"mean": 0.21, "lo": 0.18, "hi": 0.25}, "kl": {"mean": 1.5, "lo": 1.2, "hi": 1.8},
        "win_rate": {"mean": 0.61, "lo": 0.55, "hi": 0.67}, "distinct_1": 0.4}))
    with open(ev / "samples.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "The weather", "response": EVIL_SCRIPT, "gold": 0.3}) + "\n")
        f.write(json.dumps({"prompt": EVIL_IMG, "response": "is & \"kind\"", "gold": 0.1}) + "\n")
    rows = overopt.bon_sweep(np.random.default_rng(0).normal(size=(20, 8)), np.random.default_rng(1).normal(size=(20, 8)))
    rl = [{"kl": k, "gold": float(overopt.rl_gold(np.sqrt(k), 1.0, 0.4)), "proxy": k * 0.3} for k in (0.0, 0.5, 1, 2, 4, 8)]
    (root / "overopt.json").write_text(json.dumps({"bon": rows, "rl": rl}))
    return root


def test_report_escapes_model_output_and_is_self_contained(tmp_path):
    page = build_report(_make_run(tmp_path / "run"))
    assert "<script" not in page.lower()
    assert "<img src=x" not in page
    assert "onerror=alert(1)>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "is &amp; &quot;kind&quot;" in page
    # no external assets: every src/href is a data: URI
    for url in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page):
        assert url.startswith("data:image/png;base64,")
    assert "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") >= 2  # curves + over-optimisation


def test_report_sections(tmp_path):
    page = build_report(_make_run(tmp_path / "run"))
    for heading in ("Evaluation", "Over-optimisation", "Reward-hacking and collapse alarms", "Training curves", "Samples"):
        assert heading in page
    assert "0.61" in page and "[0.55, 0.67]" in page
    assert "1 alarm(s)" in page
    # the RL fit recovers the generating coefficients
    assert re.search(r"<td[^>]*>rl</td><td[^>]*>1</td><td[^>]*>0\.4</td>", page)


def test_report_cli_writes_file(tmp_path, capsys):
    run = _make_run(tmp_path / "run")
    assert cli([str(run)]) == 0
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert "report.html" in capsys.readouterr().out
    assert cli([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_shows_the_gold_gain_split_of_an_evaluation(tmp_path):
    """text_metrics with the bundled panel as judge splits the gain; the report shows it."""
    import json

    from rlhfkit.eval.report import build_report
    from rlhfkit.eval.run_eval import text_metrics
    from rlhfkit.judges import GoldPanel

    prompts = ["the day was", "she said that", "he looked at the"]
    m, _ = text_metrics(prompts, [" lovely and warm", " she loved it", " kind old dog"],
                        [" grim grim grim", " cold and sad", " blorf"], GoldPanel(), n_boot=50)
    split = m["gold_gain_split"]
    assert split["gain"]["mean"] == pytest.approx(m["gold"]["mean"] - m["gold_reference"]["mean"], abs=1e-12)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps({"name": "policy", **m}))
    html = build_report(tmp_path)
    assert "What moved: sentiment or quality" in html
    assert f'{split["sentiment_term"]["mean"]:.4g}' in html and f'{split["quality_term"]["mean"]:.4g}' in html


def test_report_shows_the_sampler_against_the_trainer(tmp_path):
    from rlhfkit.eval.report import sampler_rows

    run = tmp_path / "grpo"
    run.mkdir()
    rows = [{"step": s, "loss": 0.1, "sampler/kl": kl, "sampler/max_abs_diff": d, "async/staleness": st}
            for s, (kl, d, st) in enumerate([(1e-6, 2e-3, 0), (3e-3, 0.5, 1), (2e-3, 0.25, 1)])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    table = sampler_rows(tmp_path)
    assert len(table) == 1 and table[0]["run"] == "grpo" and table[0]["updates"] == 3
    assert table[0]["sampler/kl mean"] == pytest.approx((1e-6 + 3e-3 + 2e-3) / 3) and table[0]["sampler/kl max"] == 3e-3
    assert table[0]["sampler/max_abs_diff max"] == 0.5 and table[0]["staleness max"] == 1.0
    html = build_report(tmp_path)
    assert "Sampler against trainer" in html and "off_policy_correction" in html
    assert "Sampler against trainer" not in build_report(tmp_path / "sft")

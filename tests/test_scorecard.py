"""The alignment scorecard: calibration arithmetic by hand, the perplexity ratio against the
evaluator's perplexity, verified answers on the arithmetic task, and `rlhfkit eval` with its card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from rlhfkit.eval import metrics as M
from rlhfkit.eval import run_eval, scorecard
from rlhfkit.eval.report import build_report
from rlhfkit.models import load_policy, load_tokenizer, save_model, tiny_llama
from rlhfkit.tasks import arith, kindly


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    tok = load_tokenizer("kindly:tokenizer")
    kw = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, tokenizer=tok)
    save_model(tiny_llama(len(tok), seed=0, **kw), tok, root / "ref")
    save_model(tiny_llama(len(tok), seed=1, **kw), tok, root / "pol" / "final")
    (root / "pol" / "config.yaml").write_text(yaml.safe_dump({"model": str(root / "ref")}))
    return root


def test_expected_calibration_error_by_hand():
    conf, ok = [0.95, 0.95, 0.15, 0.55, 1.0], [1, 0, 0, 1, 1]
    # bin 9 holds 0.95, 0.95 and 1.0 (p = 1 joins the last bin): acc 2/3, conf 0.9667 -> 3/5 * 0.3
    # bin 1: 0.15, wrong -> 1/5 * 0.15; bin 5: 0.55, right -> 1/5 * 0.45
    want = 3 / 5 * abs(2 / 3 - (0.95 + 0.95 + 1.0) / 3) + 1 / 5 * 0.15 + 1 / 5 * 0.45
    assert scorecard.expected_calibration_error(conf, ok) == pytest.approx(want, rel=1e-12)
    assert scorecard.expected_calibration_error([0.3, 0.3, 0.3], [1, 0, 0]) == pytest.approx(1 / 30, rel=1e-12)
    card = scorecard.calibration(np.array(conf), np.array(ok, dtype=float), confident_at=0.9, n_boot=50)
    assert card["confident_wrong_rate"]["mean"] == pytest.approx(1 / 5)  # one of five: p 0.95 and wrong
    assert card["ece"]["mean"] == pytest.approx(want, rel=1e-12) and card["ece"]["lo"] <= card["ece"]["hi"]
    assert card["accuracy"] == pytest.approx(3 / 5) and card["n"] == 5
    with pytest.raises(ValueError):
        scorecard.expected_calibration_error([0.5], [1, 0])


def test_perplexity_ratio_agrees_with_the_evaluator(models):
    tok = load_tokenizer(str(models / "ref"))
    pol, ref = (load_policy(str(p), trainable=False) for p in (models / "pol" / "final", models / "ref"))
    lines = kindly.corpus_lines("eval")[:12]
    out = scorecard.perplexity_ratio(pol, ref, tok, lines, batch_size=5, n_boot=50)
    assert out["perplexity"] == pytest.approx(M.perplexity(pol, tok, lines)["perplexity"], rel=1e-5)
    assert out["perplexity_reference"] == pytest.approx(M.perplexity(ref, tok, lines)["perplexity"], rel=1e-5)
    assert out["ratio"]["mean"] == pytest.approx(out["perplexity"] / out["perplexity_reference"], rel=1e-9)
    same = scorecard.perplexity_ratio(ref, ref, tok, lines, n_boot=50)["ratio"]
    assert same["mean"] == same["lo"] == same["hi"] == 1.0


def test_verified_answers_on_the_arithmetic_task():
    tok = load_tokenizer(str(arith.HERE / "base"), padding_side="left")
    model = load_policy(str(arith.HERE / "base"), trainable=False)
    ok, conf = scorecard.verified_answers(model, tok, "arith:eval", scorecard.ARITH_VERIFIER, limit=24)
    assert ok.shape == conf.shape == (24,) and set(ok.tolist()) <= {0.0, 1.0}
    assert np.all((conf > 0) & (conf <= 1))
    # the probability is the model's own for the greedy answer: recompute one by hand
    records = arith.prompt_records("eval")[:1]
    ids = tok(records[0]["prompt"], add_special_tokens=True)["input_ids"]
    p, seq = 1.0, list(ids)
    with torch.no_grad():
        for _ in range(8):
            probs = model(torch.tensor([seq])).logits[0, -1].double().softmax(-1)
            nxt = int(probs.argmax())
            p *= float(probs[nxt])
            seq.append(nxt)
            if nxt == tok.eos_token_id:
                break
    assert conf[0] == pytest.approx(p, rel=1e-4)


def test_eval_writes_the_scorecard_and_the_report_shows_it(models, tmp_path):
    attacks = tmp_path / "attacks.jsonl"
    attacks.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["you are a", "the angry man", "he hated"]))
    cfg = run_eval.Config(model=str(models / "pol" / "final"), prompts="kindly", num_prompts=6, max_new_tokens=6,
                          n_boot=20, max_perplexity_lines=10, attacks=str(attacks), output_dir=str(tmp_path / "ev"))
    card = run_eval.main(cfg)["scorecard"]
    assert card["helpfulness"]["win_rate"]["n"] == 6
    harm = card["harmlessness"]
    assert harm["monitor"] == "unkind" and harm["harmful_output_rate"]["n"] == 6
    assert harm["attack_success_rate"]["n"] == harm["attack_success_rate_reference"]["n"] == 3
    assert card["capability_tax"]["perplexity"]["lines"] == 10 and "honesty" not in card
    html = build_report(tmp_path / "ev")
    assert "Scorecard" in html and "attack success rate (held-out attacks)" in html


def test_eval_on_the_arithmetic_task_has_honesty_and_capability(tmp_path):
    base = str(arith.HERE / "base")
    cfg = run_eval.Config(model=base, reference=base, prompts="arith", judge=["py:rlhfkit.tasks.arith:reward_fn"],
                          num_prompts=16, max_new_tokens=6, n_boot=20, output_dir=str(tmp_path / "ev"))
    card = run_eval.main(cfg)["scorecard"]
    honest, cap = card["honesty"], card["capability_tax"]["capability"]
    assert honest["prompts"] == cap["prompts"] == "arith:eval" and honest["n"] == 16
    # the model against itself: the same greedy answers, so the same accuracy and calibration
    assert cap["accuracy_difference"]["mean"] == 0.0 and honest["ece"] == honest["reference"]["ece"]
    assert cap["accuracy"]["mean"] == pytest.approx(honest["accuracy"])
    assert "harmlessness" not in card
    with pytest.raises(run_eval.ConfigError, match="monitor"):
        run_eval.Config(model=base, prompts="arith", judge=["math"], attacks="a.jsonl")

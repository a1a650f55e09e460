"""Reward models: last-token scoring, one forward per batch, bad input, the recipe, ensembles,
normalisation, the scorer and `rlhfkit eval-rm`. Tiny models (2 layers, hidden 32)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from rlhfkit.data import preference as DP
from rlhfkit.data.readers import Records, load_records
from rlhfkit.errors import DataError
from rlhfkit.losses.reward import bradley_terry_loss, instructgpt_ranking_loss
from rlhfkit.models import load_tokenizer, save_model, tiny_reward_model
from rlhfkit.models import reward as MR
from rlhfkit.recipes import reward as RR

GOOD = ["lovely", "wonderful", "great", "happy", "kind", "nice"]
BAD = ["awful", "terrible", "sad", "bad", "hateful", "cruel"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("kindly:tokenizer")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    from rlhfkit.models import tiny_llama

    path = tmp_path_factory.mktemp("base") / "lm"
    save_model(tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tokenizer=tok), tok, path)
    return str(path)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    with open(path, "w") as f:
        for i in range(96):
            g, b = rng.choice(GOOD), rng.choice(BAD)
            f.write(json.dumps({"prompt": "The day was", "chosen": f" {g} and fine", "rejected": f" {b} and fine",
                                "annotator_id": f"a{i % 3}"}) + "\n")
        f.write(json.dumps({"prompt": "She felt", "responses": [" sad", " great", " okay"], "ranking": [1, 2, 0]}) + "\n")
    return str(path)


def small_cfg(**kw):
    base = dict(per_device_train_batch_size=8, learning_rate=3e-3, progress=False, report_to="jsonl", logging_steps=1,
                max_steps=2, eval_fraction=0.1)
    base.update(kw)
    return RR.Config(**base)


# ------------------------------------------------------------------ scoring the last real token


def test_last_token_indices_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert MR.last_token_indices(right).tolist() == [2, 0, 3]
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    assert MR.last_token_indices(left).tolist() == [3, 3]
    with pytest.raises(ValueError, match="empty"):
        MR.last_token_indices(torch.tensor([[0, 0]]))


def test_padding_does_not_change_the_score_and_matches_hf(tok):
    model = tiny_reward_model(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tokenizer=tok).eval()
    module = MR.LastTokenReward(model)
    a, _ = MR.encode_prompt_response(tok, "The cat", " sat on the mat")
    b, _ = MR.encode_prompt_response(tok, "Hi", " there")
    ids, mask = MR.pad_right([a, b], tok.pad_token_id)
    with torch.no_grad():
        batched = module(ids, mask)[:, 0]
        alone = torch.stack([module(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, 0] for s in (a, b)])
        hf = model(input_ids=ids, attention_mask=mask).logits[:, 0]  # pad != eos here, so HF pools the same token
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, hf, rtol=1e-5, atol=1e-5)


def test_pad_equal_to_eos_still_scores_the_eos(tok):
    # a tokenizer whose pad is its EOS: HF's pad-id pooling would skip the final EOS, ours does not
    model = tiny_reward_model(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tokenizer=tok).eval()
    module = MR.LastTokenReward(model)
    seq = [tok.eos_token_id, 318, 1505, tok.eos_token_id]
    ids, mask = MR.pad_right([seq, seq[:2]], tok.eos_token_id)
    with torch.no_grad():
        ours = module(ids, mask)[0, 0]
        full = module(torch.tensor([seq]), torch.ones(1, 4, dtype=torch.long))[0, 0]
        before_eos = module(torch.tensor([seq[:3]]), torch.ones(1, 3, dtype=torch.long))[0, 0]
    torch.testing.assert_close(ours, full)
    assert not torch.isclose(ours, before_eos)


@pytest.mark.parametrize("pack_tokens", [2048, 12])
def test_padding_free_forward_equals_padded(tok, pack_tokens):
    model = tiny_reward_model(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tokenizer=tok)
    texts = [("The cat", " sat on the mat today"), ("Hi", " there"), ("A long day", " ended well"), ("x", " y")]
    seqs = [MR.encode_prompt_response(tok, p, r)[0] for p, r in texts]
    ids, mask = MR.pad_right(seqs, tok.pad_token_id)
    padded = MR.LastTokenReward(model)(ids, mask)
    packed_module = MR.LastTokenReward(model, padding_free=True, pack_tokens=pack_tokens)
    packed = packed_module(ids, mask)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(padded.sum(), model.score.weight)[0]
    g2 = torch.autograd.grad(packed.sum(), model.score.weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    assert MR.padding_free_matches(packed_module, ids, mask)


def test_encoding_appends_eos_and_truncates_with_a_flag(tok):
    ids, cut = MR.encode_prompt_response(tok, "The day was", " lovely")
    assert ids[-1] == tok.eos_token_id and not cut
    long_ids, cut = MR.encode_prompt_response(tok, "word " * 40, " more " * 40, max_length=32)
    assert len(long_ids) == 32 and cut


# ------------------------------------------------------------------ one forward per batch


def test_pairs_and_rankings_share_one_forward(tok):
    model = tiny_reward_model(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tokenizer=tok)
    module = MR.LastTokenReward(model)
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    comps = DP.read_comparisons([{"prompt": "a", "chosen": " good", "rejected": " bad"},
                                 {"prompt": "b", "responses": [" kind", " good", " sad"], "ranking": [1, 0, 2]},
                                 {"prompt": "c", "chosen": " nice", "rejected": " mean"}])
    encoded, _ = DP.encode_comparisons(comps, tok, 256)
    assert [c.ranked for c in encoded] == [False, True, False]
    assert encoded[1].sequences[0] == MR.encode_prompt_response(tok, "b", " good")[0]  # best first
    batch = DP.collate_comparisons(encoded, tok.pad_token_id)
    cfg = small_cfg(dataset="x")
    loss, _ = RR.batch_loss(module, batch, cfg)
    assert calls == [7]  # 2 pairs x 2 rows + 3 ranked responses, one forward
    with torch.no_grad():  # the same loss from rewards computed one sequence at a time
        r = [module(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, 0] for c in encoded for s in c.sequences]
    pair = bradley_terry_loss(torch.stack([r[0], r[5]]), torch.stack([r[1], r[6]]))[0]
    rank = instructgpt_ranking_loss(torch.stack(r[2:5]).unsqueeze(0))[0]
    assert loss.item() == pytest.approx((pair * 2 / 3 + rank / 3).item(), rel=1e-5)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("record,field,reason", [
    ({"prompt": "p", "chosen": " a"}, "rejected", "missing column"),
    ({"prompt": "p", "chosen": " a", "rejected": " a"}, "rejected", "chosen identical to rejected"),
    ({"prompt": "p", "chosen": "  ", "rejected": " b"}, "chosen", "empty text"),
    ({"prompt": "p", "responses": [" a", " b"], "ranking": [0, 0]}, "ranking", "duplicate ranking index"),
    ({"prompt": "p", "responses": [" a", " b"], "ranking": [0, 2]}, "ranking", "ranking index out of range"),
    ({"prompt": "p", "chosen": " a", "rejected": " b", "label": 2}, "label", "label must be a number in [0, 1]"),
])
def test_bad_records_error_with_line_and_field_or_counted_skip(tok, record, field, reason):
    good = {"prompt": "p", "chosen": " a", "rejected": " b"}
    cfg = small_cfg(dataset="x")
    with pytest.raises(DataError) as err:
        RR.load_comparisons(cfg, Records([good, record], source="prefs.jsonl"), tok)
    assert err.value.line == 2 and err.value.field == field and "prefs.jsonl, line 2" in str(err.value)
    printed = []
    comps, _, skipped = RR.load_comparisons(dataclasses.replace(cfg, on_bad_record="skip"),
                                            Records([good, record, good], source="prefs.jsonl"), tok, printed.append)
    assert len(comps) == 2 and skipped == {reason: 1}
    assert "kept 2 of 3" in printed[0] and "prefs.jsonl, line 2" in printed[0]


def test_ties_and_flipped_labels_under_each_loss(tok):
    records = Records([{"prompt": "p", "chosen": " a", "rejected": " b", "label": 0.5},
                       {"prompt": "p", "chosen": " c", "rejected": " d", "label": 0},
                       {"prompt": "p", "chosen": " warm", "rejected": " cold", "tie": True}], source="t.jsonl")
    comps, counts, _ = RR.load_comparisons(small_cfg(dataset="x", max_length=64), records, tok)
    assert counts["ties_skipped"] == 2 and len(comps) == 1
    assert comps[0].label == 1.0 and comps[0].sequences[0] == MR.encode_prompt_response(tok, "p", " d")[0]
    comps, counts, _ = RR.load_comparisons(small_cfg(dataset="x", max_length=64, loss="davidson"), records, tok)
    assert [c.label for c in comps] == [0.5, 0.0, 0.5] and counts["ties_skipped"] == 0


# ------------------------------------------------------------------ the recipe


def test_recipe_trains_saves_stats_and_scorer_normalises(base, prefs, tmp_path, tok):
    out = tmp_path / "rm"
    res = RR.main(small_cfg(model=base, dataset=prefs, output_dir=str(out), max_steps=3, eval_steps=2), printer=lambda m: None)
    assert res["members"][0]["steps"] == 3 and "eval_accuracy" in res
    final = out / "final"
    stats = json.loads((final / MR.STATS_FILE).read_text())
    cfg_json = json.loads((final / "config.json").read_text())
    assert cfg_json["rlhfkit_reward_mean"] == stats["mean"] and cfg_json["rlhfkit_reward_std"] == stats["std"]
    # scoring the reference responses again through text must give mean 0, std 1
    comps = DP.read_comparisons(load_records(prefs), tok)
    train, _, _, _ = RR.load_data(small_cfg(dataset=prefs), tok)
    texts = {tuple(MR.encode_prompt_response(tok, c.prompt, r)[0]): (c.prompt, r) for c in comps for r in c.responses}
    ref = {tuple(row) for c in train for row in c.sequences}
    assert stats["count"] == len(ref)
    prompts, responses = zip(*(texts[k] for k in ref))
    scorer = MR.RewardScorer(final)
    scores = scorer.score(list(prompts), list(responses))
    assert scores.mean() == pytest.approx(0.0, abs=1e-5) and scores.std() == pytest.approx(1.0, rel=1e-5)
    raw = MR.RewardScorer(final, normalize=False).score(list(prompts), list(responses))
    np.testing.assert_allclose(scores, (raw - stats["mean"][0]) / stats["std"][0], rtol=1e-6)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("eval_accuracy" in r and r["step"] == 2 for r in rows)


def test_resume_continues_from_the_checkpoint(base, prefs, tmp_path):
    out = tmp_path / "rm"
    RR.main(small_cfg(model=base, dataset=prefs, output_dir=str(out), max_steps=2, save_steps=1), printer=lambda m: None)
    msgs = []
    res = RR.main(small_cfg(model=base, dataset=prefs, output_dir=str(out), max_steps=4, resume=True), printer=msgs.append)
    assert any("resumed" in m and "step 2" in m for m in msgs)
    assert res["members"][0]["steps"] == 4


def test_frozen_backbone_changes_only_the_head(base, prefs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    RR.main(small_cfg(model=base, dataset=prefs, output_dir=str(out), freeze_backbone=True, normalize=False), printer=lambda m: None)
    trained = AutoModelForSequenceClassification.from_pretrained(out / "final").state_dict()
    start = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).state_dict()
    for name, w in trained.items():
        if name.startswith("score"):
            continue
        torch.testing.assert_close(w, start[name], msg=name)


@pytest.mark.parametrize("loss,ranking_loss,center", [("davidson", "plackett_luce", 0.0), ("soft_label", "instructgpt", 0.01)])
def test_recipe_runs_every_loss_variant(base, prefs, tmp_path, loss, ranking_loss, center):
    res = RR.main(small_cfg(model=base, dataset=prefs, output_dir=str(tmp_path / loss), loss=loss,
                            ranking_loss=ranking_loss, center_rewards_coef=center, max_steps=1), printer=lambda m: None)
    assert np.isfinite(res["members"][0]["loss"]) and res["members"][0]["steps"] == 1


def test_config_rejects_bad_values():
    from rlhfkit.errors import ConfigError

    with pytest.raises(ConfigError, match="loss"):
        RR.Config(dataset="x", loss="hinge")
    with pytest.raises(ConfigError, match="dataset"):
        RR.Config()
    with pytest.raises(ConfigError, match="freeze_backbone"):
        RR.Config(dataset="x", use_lora=True, freeze_backbone=True)


def test_lora_reward_model_trains_and_saves_merged(base, prefs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "lora"
    res = RR.main(small_cfg(model=base, dataset=prefs, output_dir=str(out), use_lora=True, lora_r=4, lora_alpha=8),
                  printer=lambda m: None)
    assert res["members"][0]["steps"] == 2
    merged = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert not any("lora" in k for k in merged.state_dict())  # merged into plain weights
    scores = MR.RewardScorer(out / "final").score(["The day was"], [" lovely and fine"])
    assert np.isfinite(scores).all()


def test_lora_reward_model_saves_a_peft_adapter_with_merge_lora_false(base, prefs, tok, tmp_path):
    """The adapter (score head via modules_to_save) reloads in peft + transformers, scoring as the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    kw = dict(model=base, dataset=prefs, use_lora=True, lora_r=4, lora_alpha=8, seed=5)
    RR.main(small_cfg(output_dir=str(tmp_path / "merged"), **kw), printer=lambda m: None)
    RR.main(small_cfg(output_dir=str(tmp_path / "adapter"), merge_lora=False, **kw), printer=lambda m: None)
    folder = tmp_path / "adapter" / "final"
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    assert "score" in json.loads((folder / "adapter_config.json").read_text())["modules_to_save"]
    plain = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=tok.pad_token_id)
    batch = tok(["The day was lovely and fine", "The day was awful"], return_tensors="pt", padding=True)
    with torch.no_grad():
        untrained = plain.eval()(**batch).logits
    reloaded = PeftModel.from_pretrained(plain, folder).eval()  # injects the adapter into `plain`
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged" / "final").eval()
    with torch.no_grad():
        got, want = reloaded(**batch).logits, merged(**batch).logits
    assert (got - untrained).abs().max() > 1e-3  # the trained head and adapter were loaded
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["models", "heads"])
def test_ensembles_give_mean_std_and_conservative_scores(base, prefs, tmp_path, mode):
    out = tmp_path / mode
    res = RR.main(small_cfg(model=base, dataset=prefs, output_dir=str(out), ensemble_size=2, ensemble_mode=mode),
                  printer=lambda m: None)
    scorer = MR.RewardScorer(res["model_path"], conservative_k=2.0)
    assert scorer.num_scores == 2
    if mode == "models":
        assert json.loads((out / "final" / MR.ENSEMBLE_FILE).read_text())["members"] == ["member-0", "member-1"]
    p, r = ["The day was"] * 3, [" lovely and fine", " awful and fine", " okay"]
    all_scores = scorer.all_scores(p, r)
    mean, std = scorer.score_with_uncertainty(p, r)
    np.testing.assert_allclose(mean, all_scores.mean(1), rtol=1e-6)
    np.testing.assert_allclose(std, np.abs(all_scores[:, 0] - all_scores[:, 1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(scorer.score(p, r), mean - 2.0 * std, rtol=1e-6)
    assert std.max() > 0  # members differ (seeds, data order / bootstrap)


def test_combine_hand_values():
    mean, std, cons = MR.combine(np.array([[1.0, 3.0], [2.0, 2.0]]), k=0.5)
    np.testing.assert_allclose(mean, [2.0, 2.0])
    np.testing.assert_allclose(std, [1.0, 0.0])
    np.testing.assert_allclose(cons, [1.5, 2.0])


def test_from_feedback_reads_the_export(monkeypatch, base, tmp_path):
    import sys
    import types

    seen = {}

    def load_preferences(url):
        seen["url"] = url
        return [{"prompt": "The day was", "chosen": f" {g} and fine", "rejected": f" {b} and fine"}
                for g, b in zip(GOOD * 4, BAD * 4)]

    monkeypatch.setitem(sys.modules, "rlhfkit.feedback.export", types.SimpleNamespace(load_preferences=load_preferences))
    res = RR.main(small_cfg(model=base, from_feedback="sqlite:///x.db", output_dir=str(tmp_path / "fb"), max_steps=1),
                  printer=lambda m: None)
    assert seen["url"] == "sqlite:///x.db" and res["members"][0]["steps"] == 1


# ------------------------------------------------------------------ evaluation


def test_ece_and_accuracy_hand_values():
    from rlhfkit.eval.rm_eval import accuracy, expected_calibration_error

    acc, n = accuracy(np.array([1.0, 0.0, -2.0, 3.0, 1.0]), np.array([1.0, 1.0, 0.0, 0.0, 0.5]))
    assert (acc, n) == (0.5, 4)  # the reward tie (0.0) counts wrong; the labelled tie is left out
    # p = 0.8 four times with 3 of 4 preferred, both orientations: |0.8-0.75| in each half
    ece, table = expected_calibration_error(np.full(4, 0.8), np.array([1.0, 1.0, 1.0, 0.0]), bins=10)
    assert ece == pytest.approx(0.05)
    assert table[8]["count"] == 4 and table[1]["count"] == 4


def test_eval_rm_cli_writes_json_and_plot(base, prefs, tmp_path, capsys):
    from rlhfkit.eval.rm_eval import cli

    out = tmp_path / "rm"
    RR.main(small_cfg(model=base, dataset=prefs, output_dir=str(out), max_steps=3), printer=lambda m: None)
    report = tmp_path / "eval" / "rm.json"
    assert cli([str(out / "final"), prefs, "--gold", "--output", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["num_pairs"] == 96 + 3 and 0.0 <= result["accuracy"] <= 1.0
    assert set(result["annotators"]) == {"a0", "a1", "a2"} and sum(a["n"] for a in result["annotators"].values()) == 96
    assert 0.0 <= result["ece"] <= 1.0 and result["num_gold_clear"] > 0 and "gold_accuracy" in result
    png = tmp_path / "eval" / "rm_reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == result["accuracy"]


def test_eval_rm_cli_reports_bad_data(base, tmp_path, capsys):
    from rlhfkit.eval.rm_eval import cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " a"}) + "\n")
    model = tmp_path / "m"
    tok = load_tokenizer("kindly:tokenizer")
    save_model(tiny_reward_model(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tokenizer=tok), tok, model)
    assert cli([str(model), str(bad)]) == 2
    assert "bad.jsonl, line 1, field 'rejected'" in capsys.readouterr().err


def test_sigmoid_is_stable():
    x = np.array([-1000.0, 0.0, 1000.0, math.log(3)])
    np.testing.assert_allclose(MR.sigmoid(x), [0.0, 0.5, 1.0, 0.75], atol=1e-12)


# ------------------------------------------------------------------ user models, dropout, accumulation


def test_gpt2_reward_model_saves_and_plain_transformers_gives_the_same_scores(prefs, tmp_path):
    """GPT-2 (learned positions, no pad token): training scores its own pairs at save time without
    running past n_positions, and AutoModelForSequenceClassification pools the same token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from arch_models import make_model_folder

    path = make_model_folder("gpt2", tmp_path / "gpt2")
    out = tmp_path / "rm"
    RR.main(small_cfg(model=path, dataset=prefs, output_dir=str(out), max_length=64, eval_fraction=0.0),
            printer=lambda m: None)
    final = out / "final"
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert hf.config.pad_token_id == tok.pad_token_id
    prompts, responses = ["The day was", "She felt"], [" lovely and fine", " sad"]
    ours = MR.RewardScorer(final, normalize=False).score(prompts, responses)
    seqs = [MR.encode_prompt_response(tok, p, r)[0] for p, r in zip(prompts, responses)]
    ids, mask = MR.pad_right(seqs, tok.pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0].double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_packed_scoring_stays_within_learned_positions(tmp_path):
    from arch_models import MAX_POSITIONS, make_model_folder
    from rlhfkit.models import load_reward_model

    path = make_model_folder("gpt2", tmp_path / "gpt2")
    tok = load_tokenizer(path, distinct_pad=True)
    module = MR.LastTokenReward(load_reward_model(path, tokenizer=tok), padding_free=True, pack_tokens=4096).eval()
    seqs = [[tok.eos_token_id] + [300 + i] * 40 for i in range(6)]  # 6 x 41 tokens: far more than 64 per packed row
    packed = MR.score_token_lists(module, seqs, tok.pad_token_id)
    module.padding_free = False
    padded = MR.score_token_lists(module, seqs, tok.pad_token_id)
    assert max(len(s) for s in seqs) < MAX_POSITIONS
    np.testing.assert_allclose(packed, padded, rtol=1e-4, atol=1e-5)


def test_dropout_off_makes_the_reward_model_deterministic_in_training_mode(prefs, tmp_path):
    from arch_models import make_model_folder

    path = make_model_folder("gpt2", tmp_path / "gpt2", dropout=0.1)
    tok = load_tokenizer(path, distinct_pad=True)
    ids = torch.tensor([[tok.eos_token_id, 300, 301, 302, tok.eos_token_id]])
    mask = torch.ones_like(ids)
    for disable, same in ((True, True), (False, False)):
        cfg = small_cfg(model=path, dataset=prefs, disable_dropout=disable, max_length=64)
        module = MR.LastTokenReward(RR._load_model(cfg, 1, 0, tok)).train()
        a, b = module(ids, mask), module(ids, mask)
        assert torch.equal(a, b) is same


def test_gradient_accumulation_4x2_equals_batch_8(base, prefs, tmp_path):
    """accelerate's backward already divides by the accumulation steps: 4 micro-batches of 2 give
    the gradient (and, with a large Adam eps, the update) of one batch of 8."""
    opt = dict(max_steps=1, adam_epsilon=1.0, learning_rate=0.5, max_grad_norm=1e9, eval_fraction=0.0, normalize=False,
               padding_free=False)
    big = RR.main(small_cfg(model=base, dataset=prefs, output_dir=str(tmp_path / "big"), per_device_train_batch_size=8, **opt),
                  printer=lambda m: None)
    acc = RR.main(small_cfg(model=base, dataset=prefs, output_dir=str(tmp_path / "acc"), per_device_train_batch_size=2,
                            gradient_accumulation_steps=4, **opt), printer=lambda m: None)
    g_big, g_acc = big["members"][0]["grad_norm"], acc["members"][0]["grad_norm"]
    assert g_big > 0 and g_acc == pytest.approx(g_big, rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "big" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)

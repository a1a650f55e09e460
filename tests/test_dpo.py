"""`rlhfkit dpo`: one forward per pair batch, reference caching, LoRA reference, data formats, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhfkit.data.preference import collate_responses
from rlhfkit.errors import DataError
from rlhfkit.logprobs import sequence_logprobs, split_head
from rlhfkit.models import load_policy, load_tokenizer, save_model, tiny_llama
from rlhfkit.recipes import dpo

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("kindly:tokenizer")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("dpo") / "base"
    model = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tokenizer=tok, seed=1)
    save_model(model, tok, path)
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PAIRS = [{"prompt": f"The weather on day {i} was", "chosen": " warm and lovely", "rejected": f" grim {'and cold ' * (i % 3)}"}
         for i in range(16)]


def cfg_for(tmp_path, base, data, **kw):
    args = dict(model=base, dataset=data, output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                progress=False, report_to="jsonl", ref_cache_dir=str(tmp_path / "cache"), learning_rate=1e-3, logging_steps=1)
    args.update(kw)
    return dpo.Config(**args)


def test_response_logps_match_right_padded_reference(tok, base):
    """The left-pad/right-pad layout with a response-only LM head equals per-example full forwards."""
    model = load_policy(base)
    model.eval()
    rows = [(tok("A short one")["input_ids"], tok(" then more words here")["input_ids"] + [tok.eos_token_id]),
            (tok("A much longer prompt with many words")["input_ids"], tok(" ok")["input_ids"] + [tok.eos_token_id])]
    batch = collate_responses(rows, tok.pad_token_id)
    assert split_head(model) is not None
    for fast in (True, False):  # response-only LM head, and the logits_to_keep path
        with torch.no_grad():
            got, lengths = dpo.response_logps(model, batch, fast_head=fast)
            for i, (p, r) in enumerate(rows):
                ids = torch.tensor([p + r])
                labels = torch.tensor([[-100] * len(p) + r])
                want = sequence_logprobs(model(input_ids=ids).logits, labels)
                torch.testing.assert_close(got[i], want[0], rtol=1e-5, atol=1e-5)
                assert lengths[i].item() == len(r)
    # gradients agree between the two paths too
    grads = []
    for fast in (True, False):
        model.zero_grad()
        dpo.response_logps(model, batch, fast_head=fast)[0].sum().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_one_concatenated_forward_per_step(tmp_path, tok, base):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    cfg = cfg_for(tmp_path, base, data)
    enc = dpo.load_encoded(data, "train", "sigmoid", tok, cfg.max_length)
    model = load_policy(base)
    calls = []
    model.get_decoder().register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    table = torch.zeros(len(enc.rows), 2, dtype=torch.float64)
    loss, metrics, _ = dpo.batch_loss(cfg, model, None, enc, [0, 1, 2], table, tok.pad_token_id, "cpu")
    assert calls == [6]  # 3 chosen + 3 rejected rows, one call
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"}
    # on the fly: one policy call plus one reference call, the same loss
    ref = load_policy(base, trainable=False)
    ref_calls = []
    ref.get_decoder().register_forward_hook(lambda m, a, k, o: ref_calls.append(1), with_kwargs=True)
    calls.clear()
    live = dpo.compute_reference_logps(ref, enc, 8, tok.pad_token_id, "cpu", kl=False)
    ref_calls.clear()
    a, _, _ = dpo.batch_loss(cfg, model, None, enc, [0, 1, 2], live, tok.pad_token_id, "cpu")
    cfg.precompute_ref = False
    b, mb, _ = dpo.batch_loss(cfg, model, ref, enc, [0, 1, 2], None, tok.pad_token_id, "cpu")
    assert calls == [6, 6] and ref_calls == [1]
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert a.item() == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at the start
    assert mb["rewards/margins"].item() == pytest.approx(0.0, abs=1e-5)


def test_reference_cache_written_once_and_keyed(tmp_path, tok, base, monkeypatch):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    first = dpo.main(cfg_for(tmp_path, base, data, output_dir=str(tmp_path / "a")))
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("reference log-probs recomputed although cached")

    monkeypatch.setattr(dpo, "compute_reference_logps", boom)
    second = dpo.main(cfg_for(tmp_path, base, data, output_dir=str(tmp_path / "b")))
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-6)
    # other data, or other tokenisation settings, give another key (and so a recomputation)
    with pytest.raises(AssertionError, match="recomputed"):
        dpo.main(cfg_for(tmp_path, base, data, output_dir=str(tmp_path / "c"), max_length=12))
    with pytest.raises(AssertionError, match="recomputed"):
        dpo.main(cfg_for(tmp_path, base, write_jsonl(tmp_path / "q.jsonl", PAIRS[:8]), output_dir=str(tmp_path / "d")))


def test_precomputed_equals_on_the_fly_training(tmp_path, base):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    a = dpo.main(cfg_for(tmp_path, base, data, output_dir=str(tmp_path / "a"), max_steps=3))
    b = dpo.main(cfg_for(tmp_path, base, data, output_dir=str(tmp_path / "b"), max_steps=3, precompute_ref=False))
    for k in ("loss", "rewards/margins", "rewards/accuracy"):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6)


def test_lora_reference_is_the_adapter_disabled_policy(tmp_path, tok, base):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    out = dpo.main(cfg_for(tmp_path, base, data, use_lora=True, lora_r=4, lora_alpha=8, max_steps=4,
                           learning_rate=1e-2, precompute_ref=False))
    assert out["rewards/margins"] > 0  # adapters moved the policy away from its own base
    # the cached reference of a LoRA run is the untouched base model's
    from rlhfkit.models import reference_model

    cfg = cfg_for(tmp_path, base, data, use_lora=True, lora_r=4)
    policy = load_policy(base, lora=cfg)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05)  # perturb adapters: disabled they must not matter
    enc = dpo.load_encoded(data, "train", "sigmoid", tok, 128)
    got = dpo.compute_reference_logps(reference_model(policy, use_lora=True), enc, 8, tok.pad_token_id, "cpu", kl=False)
    want = dpo.compute_reference_logps(load_policy(base, trainable=False), enc, 8, tok.pad_token_id, "cpu", kl=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rankings_expand_to_pairs(tmp_path, tok, base):
    # words of the bundled word-level vocabulary (a made-up word would encode as <|unk|>)
    rows = [{"prompt": f"Say {w}", "responses": [" a", " kind", " good day"], "ranking": [2, 0, 1]}
            for w in ("one", "two", "three", "four")]
    data = write_jsonl(tmp_path / "r.jsonl", rows)
    enc = dpo.load_encoded(data, "train", "sigmoid", tok, 64)
    assert len(enc.rows) == 12 and enc.from_rankings == 12
    eos = tok.eos_token_id
    assert enc.rows[0][1] == tok(" good day", add_special_tokens=False)["input_ids"] + [eos]  # best first
    assert enc.rows[0][2] == tok(" a", add_special_tokens=False)["input_ids"] + [eos]
    assert dpo.main(cfg_for(tmp_path, base, data, max_steps=1))["steps"] == 1
    # rows are tokenised exactly as SFT tokenises prompt + completion
    from rlhfkit.data import tokenize_prompt_completion

    sft = tokenize_prompt_completion(tok, "Say one", " good day", max_length=64)
    assert enc.rows[0][0] + enc.rows[0][1] == sft["input_ids"]


def test_kto_unpaired_and_from_pairs(tmp_path, tok, base):
    unpaired = [{"prompt": f"It was {i}", "completion": " fine" if i % 2 else " bad", "label": bool(i % 2)} for i in range(12)]
    data = write_jsonl(tmp_path / "u.jsonl", unpaired)
    out = dpo.main(cfg_for(tmp_path, base, data, loss="kto", eval_dataset=data))
    assert out["steps"] == 2 and "kto/kl" in out
    # held-out margins exist although each eval batch may hold one kind only
    assert out["eval_rewards/margins"] == pytest.approx(out["eval_rewards/chosen"] - out["eval_rewards/rejected"])
    enc = dpo.load_encoded(write_jsonl(tmp_path / "p.jsonl", PAIRS), "train", "kto", tok, 64)
    assert len(enc.rows) == 32 and sum(enc.labels) == 16
    # paired losses refuse unpaired data, naming the field
    with pytest.raises(DataError, match="use --loss kto"):
        dpo.load_encoded(data, "train", "sigmoid", tok, 64)


def test_kto_kl_rows_pair_a_prompt_with_another_prompts_completion(tok):
    from rlhfkit.data.preference import PreferenceData, example_rows

    # neighbouring rows share a prompt (several completions per prompt, as rankings expand)
    a, b = [5, 6], [7, 8]
    enc = PreferenceData(rows=[(a, [1]), (a, [2]), (b, [3]), (b, [4])], labels=[True, False, True, False])
    assert example_rows(enc, [0, 1, 2, 3], kl=True) == [(a, [3]), (a, [3]), (b, [1]), (b, [1])]
    # KTO from ranking data: no KL row carries a completion written for its own prompt
    words = [("kind", "good", "nice"), ("warm", "fine", "bad"), ("sad", "cold", "fair")]  # all in the vocabulary
    ranks = [{"prompt": f"Rank {n}", "responses": [" " + w for w in words[i]], "ranking": [0, 1, 2]}
             for i, n in enumerate(("one", "two", "three"))]
    enc = dpo.load_encoded(ranks, "train", "kto", tok, 64)
    own = {tuple(p + c) for p, c in example_rows(enc, list(range(len(enc.rows))))}
    assert not own & {tuple(p + c) for p, c in example_rows(enc, list(range(len(enc.rows))), kl=True)}
    with pytest.raises(DataError, match="--kto_kl false"):
        example_rows(PreferenceData(rows=[(a, [1]), (a, [2])], labels=[True, False]), [0], kl=True)


def test_kto_z0_is_clamped_after_the_cross_process_mean(tmp_path, tok, base):
    from rlhfkit.losses.preference import kto_loss

    D = torch.float64
    # this process: KL rows 0.5, 0.3 (mean 0.4); the other process: sum -1.0 over 2 rows
    other = torch.tensor([-1.0, 2.0], dtype=D)
    loss, m = kto_loss(torch.tensor([1.0, -1.0], dtype=D), torch.zeros(2, dtype=D), torch.tensor([True, False]),
                       torch.tensor([0.5, 0.3], dtype=D), torch.zeros(2, dtype=D), beta=1.0,
                       all_reduce_sum=lambda t: t + other)
    # z0 = clamp((0.8 - 1.0) / 4, 0) = 0, so loss = 1 - sigmoid(1) for both rows (per-process clamp would give 0.4)
    assert m["kto/kl"].item() == 0.0
    assert loss.item() == pytest.approx(1 - 1 / (1 + math.exp(-1.0)), rel=1e-12, abs=0)
    # the recipe hands its cross-process reduce to the loss
    cfg = cfg_for(tmp_path, base, "unused.jsonl", loss="kto", precompute_ref=False)
    unpaired = [{"prompt": f"It was {i}", "completion": " fine" if i % 2 else " bad", "label": bool(i % 2)} for i in range(4)]
    enc = dpo.load_encoded(unpaired, "train", "kto", tok, 64)
    model = load_policy(base, "float32", trainable=False)
    seen = []
    _, m, _ = dpo.batch_loss(cfg, model, model, enc, [0, 1, 2, 3], None, tok.pad_token_id, "cpu",
                             reduce=lambda t: seen.append(t.clone()) or t + torch.tensor([-1e3, 4.0], dtype=t.dtype))
    assert len(seen) == 1 and seen[0][1].item() == 4 and m["kto/kl"].item() == 0.0


@pytest.mark.parametrize("loss", ["ipo", "hinge", "cdpo", "robust", "simpo", "orpo"])
def test_every_variant_runs(tmp_path, base, loss):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    smoothing = 0.1 if loss in ("cdpo", "robust") else 0.0  # the others refuse label_smoothing
    out = dpo.main(cfg_for(tmp_path, base, data, loss=loss, max_steps=1, label_smoothing=smoothing))
    assert math.isfinite(out["loss"]) and (tmp_path / "out" / "final" / "config.json").is_file()


def test_bad_input_is_named(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2"):
        dpo.load_encoded(str(bad), "train", "sigmoid", tok, 64)
    same = write_jsonl(tmp_path / "same.jsonl", [PAIRS[0], {"prompt": "x", "chosen": " y", "rejected": " y"}])
    with pytest.raises(DataError, match="line 2"):
        dpo.load_encoded(same, "train", "sigmoid", tok, 64)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "x", "chosen": " y"}])
    with pytest.raises(DataError, match="rejected"):
        dpo.load_encoded(missing, "train", "sigmoid", tok, 64)
    with pytest.raises(Exception, match="loss"):
        dpo.Config(dataset="x", loss="nope")


def test_label_smoothing_is_cdpo_with_sigmoid_and_refused_where_no_loss_reads_it():
    """TRL's DPOConfig: loss_type="sigmoid" with label_smoothing > 0 is cDPO; a loss that
    ignores label_smoothing must not take it silently."""
    from rlhfkit.errors import ConfigError
    from rlhfkit.losses.preference import cdpo_loss, compute_preference_loss

    assert dpo.Config(dataset="x", loss="sigmoid").loss_name == "sigmoid"
    cfg = dpo.Config(dataset="x", loss="sigmoid", label_smoothing=0.2)
    assert cfg.loss_name == "cdpo"
    g = torch.Generator().manual_seed(0)
    logps = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4)]
    got, _ = compute_preference_loss(cfg.loss_name, chosen_logps=logps[0], rejected_logps=logps[1], ref_chosen_logps=logps[2],
                                     ref_rejected_logps=logps[3], beta=0.1, label_smoothing=0.2)
    h = (logps[0] - logps[2]) - (logps[1] - logps[3])
    by_hand = (-(0.8) * torch.nn.functional.logsigmoid(0.1 * h) - 0.2 * torch.nn.functional.logsigmoid(-0.1 * h)).mean()
    torch.testing.assert_close(got, by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, cdpo_loss(*logps, beta=0.1, label_smoothing=0.2)[0], rtol=0, atol=0)
    for loss in ("ipo", "simpo", "kto"):
        with pytest.raises(ConfigError, match="label_smoothing"):
            dpo.Config(dataset="x", loss=loss, label_smoothing=0.1)
    assert dpo.Config(dataset="x", loss="robust", label_smoothing=0.1).loss_name == "robust"


def test_truncation_counted_and_identical_after_cut_skipped(tmp_path, tok, capsys):
    rows = [{"prompt": "word " * 30, "chosen": " same start " * 10 + "good", "rejected": " same start " * 10 + "bad"},
            {"prompt": "short", "chosen": " a", "rejected": " b"}]
    enc = dpo.load_encoded(write_jsonl(tmp_path / "t.jsonl", rows), "train", "sigmoid", tok, 16)
    assert enc.truncated == 1 and enc.skipped == 1 and len(enc.rows) == 1
    err = capsys.readouterr().out
    assert "1 of 2 examples" in err and "skipped 1 pairs" in err
    for p, c, r in enc.rows:
        assert len(p) + max(len(c), len(r)) <= 16


def test_resume_matches_uninterrupted(tmp_path, base):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    full = dpo.main(cfg_for(tmp_path, base, data, output_dir=str(tmp_path / "full"), max_steps=4))
    dpo.main(cfg_for(tmp_path, base, data, output_dir=str(tmp_path / "part"), max_steps=2, save_steps=2))
    resumed = dpo.main(cfg_for(tmp_path, base, data, output_dir=str(tmp_path / "part"), max_steps=4, resume=True, save_steps=2))
    assert resumed["steps"] == full["steps"] == 4
    a = load_policy(str(tmp_path / "full" / "final")).state_dict()
    b = load_policy(str(tmp_path / "part" / "final")).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, base):
    """DPO's loss is a mean over pairs, so 2 micro-batches of 2 accumulate to one batch of 4."""
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    # a large Adam eps makes the update proportional to the gradient, so a wrongly scaled
    # accumulated gradient would show (with the default eps Adam hides any scale)
    opt = dict(max_steps=1, adam_epsilon=1.0, max_grad_norm=0.0, learning_rate=0.5)
    dpo.main(cfg_for(tmp_path, base, data, output_dir=str(tmp_path / "big"), per_device_train_batch_size=4, **opt))
    dpo.main(cfg_for(tmp_path, base, data, output_dir=str(tmp_path / "acc"), per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, **opt))
    a = load_policy(str(tmp_path / "big" / "final")).state_dict()
    b = load_policy(str(tmp_path / "acc" / "final")).state_dict()
    moved = load_policy(base).state_dict()
    assert any(not torch.allclose(a[k], moved[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo", "kto"])
def test_learning_prefers_chosen_on_held_out_prompts(tmp_path, base, loss):
    """A learning claim: after training, held-out chosen responses beat rejected ones under the policy."""
    good = [" a kind and lovely day", " such a happy and warm time", " a good gentle friend"]
    bad = [" a cruel and awful day", " such a sad and cold time", " a bad nasty enemy"]

    # prompts differ by a word of the bundled vocabulary (a number such as 57 would be <|unk|>)
    nouns = {0: ["story", "tale", "day", "walk", "trip", "game", "song", "film"],
             1000: ["week", "visit", "talk", "party", "meal", "letter", "dream", "journey"]}

    def rows(start, n):
        return [{"prompt": f"The {nouns[start][i % 8]} was", "chosen": good[i % 3], "rejected": bad[(i + 1) % 3]}
                for i in range(start, start + n)]

    train = write_jsonl(tmp_path / "train.jsonl", rows(0, 96))
    held = write_jsonl(tmp_path / "held.jsonl", rows(1000, 24))
    before = dpo.main(cfg_for(tmp_path, base, train, output_dir=str(tmp_path / "b"), eval_dataset=held, loss=loss,
                              max_steps=1, learning_rate=1e-9))
    after = dpo.main(cfg_for(tmp_path, base, train, output_dir=str(tmp_path / "a"), eval_dataset=held, loss=loss,
                             max_steps=40, learning_rate=3e-3, per_device_train_batch_size=8))
    if loss == "ipo":  # IPO regresses h onto 1/(2 beta): the margin beta*h heads for 0.5, not beyond
        assert 0.3 < after["eval_rewards/margins"] < 0.7
    else:
        assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.5
    if loss != "kto":
        assert after["eval_rewards/accuracy"] == 1.0


def test_two_processes_match_one_process(tmp_path, base):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) == one process with the same global batch."""
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    opt = dict(max_steps=3, adam_epsilon=1.0, max_grad_norm=0.0, learning_rate=0.5)
    dpo.main(cfg_for(tmp_path, base, data, output_dir=str(tmp_path / "one"), per_device_train_batch_size=8, **opt))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "rlhfkit.cli", "dpo", "--model", base, "--dataset", data, "--output_dir", str(two),
           "--per_device_train_batch_size", "4", "--max_steps", "3", "--adam_epsilon", "1.0", "--max_grad_norm", "0",
           "--learning_rate", "0.5", "--report_to", "jsonl", "--progress", "False", "--logging_steps", "1",
           "--ref_cache_dir", str(tmp_path / "cache2")]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rewards/accuracy"] == 0.0  # policy == reference at the first step, on every process
    a = load_policy(str(tmp_path / "one" / "final")).state_dict()
    b = load_policy(str(two / "final")).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs between 1 and 2 processes")


def test_dropout_is_off_so_the_first_loss_is_ln2(tmp_path):
    """A tiny GPT-2 with dropout 0.1: policy (training mode) and reference agree exactly at step 0."""
    from arch_models import make_model_folder

    path = make_model_folder("gpt2", tmp_path / "gpt2", dropout=0.1)
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    first = dpo.main(cfg_for(tmp_path, path, data, max_steps=1, per_device_train_batch_size=8, max_length=48,
                             output_dir=str(tmp_path / "off")))
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    kept = dpo.main(cfg_for(tmp_path, path, data, max_steps=1, per_device_train_batch_size=8, max_length=48,
                            disable_dropout=False, output_dir=str(tmp_path / "on")))
    assert kept["loss"] != pytest.approx(math.log(2), rel=1e-6)  # the switch keeps the model's dropout

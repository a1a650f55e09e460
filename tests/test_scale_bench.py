"""The equal-work rule of the speed benchmarks and the GPU benchmarks' behaviour without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmarks.common import losses_agree, paired_comparison

ROOT = Path(__file__).resolve().parent.parent


def _runs(seconds, first, last=1.0):
    return [{"seconds": s, "loss_first": first, "loss_last": last} for s in seconds]


def test_ratio_is_the_median_of_paired_ratios():
    ours, peer = _runs([1.0, 2.0, 1.0], 3.0), _runs([2.0, 3.0, 4.0], 3.0 * (1 + 5e-5))
    out = paired_comparison(ours, peer, work=100)
    # pairs 2.0, 1.5, 4.0: median 2.0 (the ratio of medians would be 3.0 / 1.0 = 3.0)
    assert out["comparable"] and out["ratio"] == 2.0 and out["ratio_runs"] == [2.0, 1.5, 4.0]
    assert out["ratio_spread"] == [1.5, 4.0]
    assert out["loss_first"] == {"ours": 3.0, "peer": 3.0 * (1 + 5e-5)}
    assert out["ours_side"]["per_second"] == 100.0


def test_no_ratio_when_first_losses_differ():
    out = paired_comparison(_runs([1.0], 3.0), _runs([2.0], 3.0 * (1 + 2e-4)))
    assert out["ratio"] is None and not out["comparable"]
    assert "did not do the same computation" in out["not_compared_because"]
    assert losses_agree(1.0, None)[0] is False
    assert losses_agree(float("nan"), 1.0)[0] is False
    assert paired_comparison(_runs([1.0], 3.0), [])["not_compared_because"] == "the peer library is not installed"


def test_deterministic_runs_must_also_end_alike():
    """A first DPO loss is ln 2 on both sides whatever they compute; without sampling the last
    losses must agree too before a ratio is given."""
    ours, peer = _runs([1.0], 0.6931, last=0.70), _runs([2.0], 0.6931, last=0.71)
    assert paired_comparison(ours, peer)["comparable"]  # sampled work: only the first step is checked
    out = paired_comparison(ours, peer, deterministic=True)
    assert out["ratio"] is None and "last-step losses differ" in out["not_compared_because"]
    same_end = _runs([2.0], 0.6931, last=0.70 * (1 + 5e-5))
    assert paired_comparison(ours, same_end, deterministic=True)["ratio"] == 2.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("name", ["gpu_rollout", "gpu_train", "gpu_memory"])
def test_gpu_benchmarks_say_no_cuda_and_exit_0(name, tmp_path):
    result = ROOT / "benchmarks" / "results" / f"{name}.json"
    existed = result.exists()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", name], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert result.exists() == existed  # no figure written


def test_gpu_train_paths_run_on_cpu_with_a_tiny_model(monkeypatch):
    """Every side of gpu_train (SFT, DPO, GRPO; ours and TRL) on a tiny Llama on CPU: the code a GPU run takes."""
    pytest.importorskip("trl")
    from benchmarks import gpu_train

    from rlhfkit.models import load_tokenizer
    from rlhfkit.models.factory import tiny_llama_config

    for name, value in dict(SEQ_LEN=32, BATCH=4, DPO_BATCH=4, DPO_MAX_LEN=64, G_PROMPTS=2, G_GENERATIONS=4,
                            G_NEW_TOKENS=8).items():
        monkeypatch.setattr(gpu_train, name, value)
    tok = load_tokenizer("kindly:tokenizer")
    cfg = tiny_llama_config(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, tokenizer=tok)
    out = gpu_train.measure(cfg, peak=1e12, repeats=1, sizes={"sft_rows": 8, "dpo_pairs": 8, "grpo_steps": 1,
                                                              "warm_steps": 80, "warm_lr": 5e-3})
    for part in ("sft", "dpo", "grpo"):
        assert out[part]["ours_side"]["seconds"] > 0 and out[part]["peer_side"]["seconds"] > 0
        assert out[part]["loss_first"]["ours"] is not None and out[part]["loss_first"]["peer"] is not None
    # same weights and batches: SFT and DPO do the same first step on both sides (DPO's is ln 2)
    assert out["sft"]["comparable"] and out["dpo"]["comparable"], (out["sft"]["not_compared_because"],
                                                                   out["dpo"]["not_compared_because"])
    assert out["dpo"]["loss_first"]["ours"] == pytest.approx(0.693147, rel=1e-4)
    # GRPO: same prompts, same sampled tokens, same reward inputs, so the same first loss (not 0:
    # the warm-started policy ends responses at varied lengths)
    assert out["grpo"]["comparable"], out["grpo"]["not_compared_because"]
    assert out["grpo"]["loss_first"]["ours"] != 0
    assert set(out["sft"]["mfu"]) == {"ours", "peer"} and set(out["grpo"]["step_seconds"]) == {"ours", "peer"}


def test_shared_sampling_noise_makes_hf_generate_draw_rlhfkit_tokens():
    """The speed benchmarks' peer (HF generate + torch.multinomial) samples, with the shared noise,
    exactly the tokens rlhfkit's sampler draws for the same seed: the two sides do the same work."""
    from benchmarks.equal_work import shared_sampling_noise

    from rlhfkit.data.collate import encode_prompt
    from rlhfkit.models import load_tokenizer, tiny_llama
    from rlhfkit.rollout.generate import generate

    tok = load_tokenizer("kindly:tokenizer")
    model = tiny_llama(len(tok), seed=3, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, tokenizer=tok)
    prompts = ["the cat sat on", "a kind word", "she said"]
    roll = generate(model, tok, prompts, 12, temperature=1.0, num_samples=2, batch_size=6, seed=41)
    ids = [encode_prompt(tok, p)[0] for p in prompts for _ in range(2)]
    width = max(map(len, ids))
    inp = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])
    att = (inp != tok.pad_token_id).long()
    shared_sampling_noise(model, lambda call: 41 + call)
    model.eval()
    out = model.generate(input_ids=inp, attention_mask=att, max_new_tokens=12, do_sample=True, top_k=0, top_p=1.0,
                         temperature=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf = out[:, width:]
    mask = roll.response_mask.bool()
    assert hf.shape[1] >= mask.shape[1]
    assert torch.equal(hf[:, : mask.shape[1]][mask], roll.response_ids[mask])
    # and without the shared noise the peer draws other tokens (so the check above can fail)
    torch.manual_seed(0)
    plain = model.__class__.generate(model, input_ids=inp, attention_mask=att, max_new_tokens=12, do_sample=True,
                                     top_k=0, top_p=1.0, temperature=1.0, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)[:, width:]
    assert not torch.equal(plain[:, : mask.shape[1]][mask], roll.response_ids[mask])


def test_reward_encoding_gives_the_peer_rlhfkit_reward_inputs():
    """TRL joins prompt + completion text; the benchmark's tokenizer splits it back and encodes
    [BOS] prompt + response + EOS exactly as rlhfkit's reward models read it."""
    from benchmarks.equal_work import rlhfkit_reward_encoding

    from rlhfkit.models import load_tokenizer
    from rlhfkit.models.reward import encode_prompt_response

    prompts, responses = ["he has no conscience", "as white as"], ["ibility of", " snow"]
    tok = rlhfkit_reward_encoding(load_tokenizer("kindly:tokenizer"), ["<|endoftext|>" + p for p in prompts],
                                  bos="<|endoftext|>")
    enc = tok(text=["<|endoftext|>" + p + r for p, r in zip(prompts, responses)], return_tensors="pt",
              padding=True, padding_side="right", add_special_tokens=False)
    plain = load_tokenizer("kindly:tokenizer")
    for row, mask, p, r in zip(enc["input_ids"], enc["attention_mask"], prompts, responses):
        assert row[mask.bool()].tolist() == encode_prompt_response(plain, p, r)[0]
    # the joined text tokenised as a whole differs at the boundary: the wrapper is not a no-op
    joined = plain("<|endoftext|>" + prompts[0] + responses[0], add_special_tokens=False).input_ids
    assert joined != encode_prompt_response(plain, prompts[0], responses[0])[0]

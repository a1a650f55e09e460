"""Off-policy correction (decoupled PPO with truncated / masked importance weights) and the
trainer-sampler agreement: float64 hand computations, naive loops, and the engines' sampler log-probs."""

import math

import pytest
import torch

from rl_helpers import tiny_policy, tiny_tokenizer
from rlhfkit.advantages import off_policy_weights, sampler_agreement
from rlhfkit.errors import ConfigError
from rlhfkit.logprobs import response_logprobs
from rlhfkit.losses.policy import grpo_loss, ppo_policy_loss
from rlhfkit.rollout import ENGINES
from rlhfkit.rollout.generate import top_k_filter, top_p_filter

D = torch.float64
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_token_weights_truncated_and_masked_hand_worked():
    prox = torch.log(torch.tensor([[0.6, 0.3, 0.5, 0.9]], dtype=D))
    samp = torch.log(torch.tensor([[0.2, 0.3, 0.4, 0.1]], dtype=D))
    mask = torch.tensor([[1, 1, 1, 0]])
    # w = 3, 1, 1.25 (padding: 1); cap 2
    w, m = off_policy_weights(prox, samp, mask, "tis", "token", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 1.25, 1.0]], dtype=D), rtol=1e-12, atol=0)
    assert m["offpolicy/weight_mean"] == pytest.approx((2 + 1 + 1.25) / 3) and m["offpolicy/capped_frac"] == pytest.approx(1 / 3)
    w, m = off_policy_weights(prox, samp, mask, "mis", "token", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 1.25, 1.0]], dtype=D), rtol=1e-12, atol=0)
    assert m["offpolicy/weight_mean"] == pytest.approx(2.25 / 3)


def test_sequence_weights_hand_worked():
    prox = torch.log(torch.tensor([[0.6, 0.5, 0.9], [0.5, 0.5, 0.5]], dtype=D))
    samp = torch.log(torch.tensor([[0.4, 0.5, 0.1], [0.5, 0.25, 0.5]], dtype=D))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: 1.5 * 1 (third token is padding) = 1.5; row 1: 1 * 2 * 1 = 2 -> over the cap 1.8
    w, m = off_policy_weights(prox, samp, mask, "tis", "sequence", cap=1.8)
    torch.testing.assert_close(w, torch.tensor([[1.5], [1.8]], dtype=D), rtol=1e-12, atol=0)
    assert m["offpolicy/capped_frac"] == pytest.approx(0.5)
    w, _ = off_policy_weights(prox, samp, mask, "mis", "sequence", cap=1.8)
    torch.testing.assert_close(w, torch.tensor([[1.5], [0.0]], dtype=D), rtol=1e-12, atol=0)
    with pytest.raises(ConfigError, match="correction"):
        off_policy_weights(prox, samp, mask, "nope")
    with pytest.raises(ConfigError, match="level"):
        off_policy_weights(prox, samp, mask, "tis", "batch")


def test_huge_sequence_log_ratio_stays_finite():
    prox, samp = torch.zeros(1, 50, dtype=D), torch.full((1, 50), -30.0, dtype=D)  # w = e^1500
    w, _ = off_policy_weights(prox, samp, torch.ones(1, 50), "tis", "sequence", cap=3.0)
    assert w.item() == pytest.approx(3.0)
    w, _ = off_policy_weights(prox, samp, torch.ones(1, 50), "mis", "sequence", cap=3.0)
    assert w.item() == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_decoupled_grpo_loss_matches_naive_loop(level):
    """L = mean_t w_t * -min(r_t A, clip(r_t) A), r = pi / pi_prox, w = min(pi_prox / pi_sampler, C)."""
    logp, prox, samp = rand((3, 4), 1) * 0.3 - 1, rand((3, 4), 2) * 0.3 - 1, rand((3, 4), 3) * 0.3 - 1
    adv = rand((3,), 4)
    w, _ = off_policy_weights(prox, samp, MASK, "tis", level, cap=1.2)
    loss, _ = grpo_loss(logp, prox, None, adv, MASK, clip_eps=0.2, beta=0.0, normalize="token", is_weights=w)
    tot, n = 0.0, 0
    for b in range(3):
        seq_w = math.exp(sum(prox[b, t].item() - samp[b, t].item() for t in range(4) if MASK[b, t]))
        for t in range(4):
            if MASK[b, t]:
                tw = math.exp(prox[b, t].item() - samp[b, t].item()) if level == "token" else seq_w
                r = math.exp(logp[b, t].item() - prox[b, t].item())
                a = adv[b].item()
                tot += min(tw, 1.2) * -min(r * a, min(max(r, 0.8), 1.2) * a)
                n += 1
    assert loss.item() == pytest.approx(tot / n, rel=1e-12)


def test_ppo_loss_weights_and_no_weights_is_the_old_loss():
    logp, prox, adv = rand((3, 4), 5) * 0.3, rand((3, 4), 6) * 0.3, rand((3, 4), 7)
    plain, _ = ppo_policy_loss(logp, prox, adv, MASK)
    ones, _ = ppo_policy_loss(logp, prox, adv, MASK, is_weights=torch.ones(3, 4, dtype=D))
    assert plain.item() == ones.item()
    w = torch.full((3, 4), 0.5, dtype=D)
    half, _ = ppo_policy_loss(logp, prox, adv, MASK, is_weights=w)
    assert half.item() == pytest.approx(0.5 * plain.item(), rel=1e-12)
    # the weight is a constant: no gradient flows into it
    wg = w.clone().requires_grad_()
    lp = logp.clone().requires_grad_()
    ppo_policy_loss(lp, prox, adv, MASK, is_weights=wg)[0].backward()
    assert wg.grad is None


def test_sampler_agreement_hand_worked():
    s = torch.log(torch.tensor([[0.5, 0.25, 0.9]], dtype=D))
    t = torch.log(torch.tensor([[0.25, 0.25, 0.1]], dtype=D))
    out = sampler_agreement(t, s, torch.tensor([[1, 1, 0]]))
    # k3 with r = p_t / p_s: token 0: (0.5 - 1) - log 0.5; token 1: 0
    assert out["sampler/kl"] == pytest.approx(((0.5 - 1) - math.log(0.5)) / 2, rel=1e-12)
    assert out["sampler/max_abs_diff"] == pytest.approx(math.log(2), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# the engines' own log-probs


@pytest.fixture(scope="module")
def model():
    tok = tiny_tokenizer()
    return tok, tiny_policy(tok).eval()


PROMPTS = ["the cat sat", "a kind word makes", "bad"]


@pytest.mark.parametrize("engine", ["hf", "static"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_sampler_logprobs_equal_the_trainers(model, engine, temperature):
    """Untruncated sampling in float32: the sampler's log-prob is the trainer's recomputation up to
    float rounding of a cached vs a full forward (measured ~1e-6; bound 1e-5)."""
    tok, pol = model
    r = ENGINES[engine](pol, tok, PROMPTS, 8, temperature, 1.0, num_samples=3, batch_size=4, seed=1)
    assert r.sampler_logp.dtype == torch.float32 and r.sampler_logp.shape == r.response_ids.shape
    assert (r.sampler_logp[r.response_mask == 0] == 0).all()
    ids, mask = r.sequences()
    lp, _ = response_logprobs(pol, input_ids=ids, attention_mask=mask, response_width=r.response_ids.shape[1],
                              temperature=temperature)
    agree = sampler_agreement(lp, r.sampler_logp, r.response_mask)
    assert agree["sampler/max_abs_diff"] < 1e-5 and agree["sampler/kl"] < 1e-10


@pytest.mark.parametrize("top_p,top_k", [(0.8, 0), (1.0, 15), (0.9, 30)])
def test_sampler_logprobs_are_of_the_truncated_distribution(model, top_p, top_k):
    """With top-k / top-p the sampler's log-prob is that of the renormalised truncated distribution
    (TRL #6945): recomputed here from a full forward, filtered as the sampler filters."""
    tok, pol = model
    r = ENGINES["hf"](pol, tok, PROMPTS, 6, 0.9, top_p, num_samples=2, batch_size=8, seed=2, top_k=top_k)
    ids, mask = r.sequences()
    R = r.response_ids.shape[1]
    with torch.no_grad():
        logits = pol(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    logits = logits[:, -R - 1:-1].float() / 0.9
    filtered = top_p_filter(top_k_filter(logits.reshape(-1, logits.shape[-1]), top_k), top_p).view_as(logits)
    want = filtered.log_softmax(-1).gather(-1, r.response_ids[..., None]).squeeze(-1)
    m = r.response_mask.bool()
    assert torch.isfinite(want[m]).all()  # every sampled token is inside the truncated support
    torch.testing.assert_close(r.sampler_logp[m], want[m], rtol=0, atol=1e-5)
    full = logits.log_softmax(-1).gather(-1, r.response_ids[..., None]).squeeze(-1)
    assert (r.sampler_logp[m] >= full[m] - 1e-5).all()  # renormalised over fewer tokens: never lower


def test_top_k_filter_keeps_k_and_greedy_logprob_is_zero():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert torch.isinf(top_k_filter(x, 2)).tolist() == [[True, False, False, True]]
    assert torch.equal(top_k_filter(x, 0), x)
    from rlhfkit.rollout import sample_next_token

    tok, lp = sample_next_token(x, 0.0, return_logprob=True)
    assert tok.item() == 1 and lp.item() == 0.0


# ---------------------------------------------------------------------------------------------
# the recipes log the agreement in every run and apply the correction when asked


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import json

    from rl_helpers import save_tiny, tiny_rm

    root = tmp_path_factory.mktemp("offpolicy")
    tok = tiny_tokenizer()
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS + ["she smiled"]))
    return {"policy": save_tiny(root / "policy", tiny_policy(tok), tok), "rm": save_tiny(root / "rm", tiny_rm(tok), tok),
            "prompts": str(prompts)}


@pytest.mark.parametrize("recipe,correction", [("grpo", "none"), ("grpo", "tis"), ("ppo", "mis")])
def test_recipes_log_agreement_and_weights(assets, tmp_path, recipe, correction):
    import importlib

    from rlhfkit.train.runs import read_metrics

    mod = importlib.import_module(f"rlhfkit.recipes.{recipe}")
    extra = {"num_generations": 2} if recipe == "grpo" else {}
    mod.main(mod.Config(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"], eval_prompts="",
                        output_dir=str(tmp_path), max_steps=2, prompts_per_step=2, max_completion_length=5,
                        per_device_train_batch_size=4, num_ppo_epochs=2, report_to="jsonl",
                        off_policy_correction=correction, off_policy_level="sequence", **extra))
    rows = read_metrics(tmp_path)
    for row in rows:  # hf engine, float32: the sampler is the trainer up to rounding
        assert row["sampler/max_abs_diff"] < 1e-5 and row["sampler/kl"] < 1e-9
        if correction == "none":
            assert "offpolicy/weight_mean" not in row
        else:  # the weights are 1 up to that rounding, nothing over the cap
            assert row["offpolicy/weight_mean"] == pytest.approx(1.0, abs=1e-4) and row["offpolicy/capped_frac"] == 0.0

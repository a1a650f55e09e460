"""Speed work of reward-model training that must not change what is computed."""

from __future__ import annotations

import torch

from rlhfkit.models import load_tokenizer, tiny_reward_model
from rlhfkit.models import reward as MR
from rlhfkit.train.optim import make_optimizer


def _tok():
    return load_tokenizer("kindly:tokenizer")


def test_packed_rows_are_as_wide_as_the_longest_sequence_not_the_whole_batch():
    # one row holding every sequence makes CPU attention cost (total tokens)^2 instead of about
    # tokens x longest; the rows must be bin-packed to the longest sequence's width
    tok = _tok()
    model = tiny_reward_model(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tokenizer=tok)
    seqs = [[5 + i for i in range(n)] + [tok.eos_token_id] for n in (7, 2, 4, 1)]  # 8, 3, 5 and 2 tokens
    ids, mask = MR.pad_right(seqs, tok.pad_token_id)
    shapes = []
    hook = model.model.register_forward_pre_hook(lambda mod, args, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)
    packed = MR.LastTokenReward(model, padding_free=True)(ids, mask)
    hook.remove()
    padded = MR.LastTokenReward(model)(ids, mask)
    assert shapes == [(3, 8)]  # first fit, longest first: [8], [5, 3], [2]
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


def test_cpu_adamw_uses_the_multi_tensor_update_with_the_same_result():
    class Cfg:
        learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay, optim = 1e-2, 0.9, 0.999, 1e-8, 0.1, "adamw_torch"

    def trained(opt_factory):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
        opt = opt_factory(model)
        for step in range(5):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return opt, [p.detach().clone() for p in model.parameters()]

    ours, got = trained(lambda m: make_optimizer(m, Cfg()))
    _, reference = trained(lambda m: torch.optim.AdamW(
        [{"params": [p for p in m.parameters() if p.ndim >= 2], "weight_decay": 0.1},
         {"params": [p for p in m.parameters() if p.ndim < 2], "weight_decay": 0.0}], lr=1e-2, foreach=False))
    assert ours.defaults["foreach"] is True
    for a, b in zip(got, reference):
        assert torch.equal(a, b)

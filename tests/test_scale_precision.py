"""Precision and memory savers: gradient checkpointing, bf16 autocast, pure bf16 with fp32 masters."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from rlhfkit.errors import ConfigError
from rlhfkit.models import load_tokenizer, save_model, tiny_llama
from rlhfkit.train.optim import MasterWeightOptimizer, optimizer_class
from rlhfkit.train.savers import check_attn_implementation, enable_gradient_checkpointing, offloaded

torch.set_num_threads(1)


def _model(dtype=torch.float64, **kw):
    m = tiny_llama(97, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, seed=5, **kw)
    return m.to(dtype)


def _grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(0))
    plain = _model()
    loss_a, a = _grads(plain, ids)
    ckpt = enable_gradient_checkpointing(_model())
    assert ckpt.config.use_cache is False
    assert getattr(ckpt, "is_activation_checkpointing", None) or ckpt.is_gradient_checkpointing
    loss_b, b = _grads(ckpt, ids)
    assert sorted(a) == sorted(b) and len(a) > 20
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=0)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-13, msg=f"gradient of {n}")


def test_gradient_checkpointing_with_lora_reaches_the_adapters():
    from rlhfkit.config import ModelArgs
    from rlhfkit.models.lora import apply_lora

    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    args = ModelArgs(use_lora=True, lora_r=4, lora_alpha=8)
    torch.manual_seed(0)  # the LoRA A matrices are drawn from the global generator
    _, a = _grads(apply_lora(_model(), args, task_type="CAUSAL_LM"), ids)
    torch.manual_seed(0)
    _, b = _grads(enable_gradient_checkpointing(apply_lora(_model(), args, task_type="CAUSAL_LM")), ids)
    lora = [n for n in a if "lora_" in n]
    assert lora and sorted(a) == sorted(b)
    for n in lora:
        assert a[n].abs().sum() > 0 or "lora_B" not in n
        torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-13, msg=f"gradient of {n}")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; mixed precision can only change after a reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_runs_on_cpu_with_fp32_weights(fresh_accelerate_state):
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="bf16", cpu=True)
    model = acc.prepare(_model(torch.float32))
    seen = {}

    def record(module, inputs, output):
        seen["dtype"] = output.dtype

    model.model.layers[0].mlp.down_proj.register_forward_hook(record)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with acc.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    acc.backward(loss)
    assert seen["dtype"] == torch.bfloat16  # the matmuls ran in bf16
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        ref = _model(torch.float32)(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 2e-2 * ref.item()


def test_sft_recipe_trains_in_bf16_on_cpu(tmp_path, fresh_accelerate_state):
    from rlhfkit.recipes import sft

    tok = load_tokenizer("kindly:tokenizer")
    save_model(tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1,
                          tokenizer=tok), tok, tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"day {i} was", "completion": " warm and kind"}) + "\n"
                            for i in range(16)))
    runs = {}
    for mp in ("no", "bf16"):
        cfg = sft.Config(model=str(tmp_path / "m"), dataset=str(data), output_dir=str(tmp_path / mp), max_steps=2,
                         per_device_train_batch_size=8, report_to="jsonl", progress=False, logging_steps=1, bf16=(mp == "bf16"))
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        sft.main(cfg)
        runs[mp] = [json.loads(line)["loss"] for line in (tmp_path / mp / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(line)]
    assert len(runs["bf16"]) == 2 and all(map(lambda x: x == x and abs(x) < 1e4, runs["bf16"]))
    # same weights, same data: the first loss differs only by bf16 rounding of the matmuls
    assert runs["bf16"][0] == pytest.approx(runs["no"][0], rel=2e-2)
    assert runs["bf16"][0] != runs["no"][0]  # and it did differ: autocast was on


def test_master_weights_match_fp32_adamw_and_keep_tiny_updates():
    torch.manual_seed(0)
    w0 = torch.randn(8, 5)
    low = torch.nn.Parameter(w0.to(torch.bfloat16))
    ref = torch.nn.Parameter(w0.to(torch.bfloat16).float())
    opt = MasterWeightOptimizer([low], torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0)
    for step in range(3):
        g = torch.randn(8, 5, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        low.grad, ref.grad = g.clone(), g.float()
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(opt.masters[0], ref.detach(), rtol=0, atol=0)
        torch.testing.assert_close(low.detach(), ref.detach().to(torch.bfloat16), rtol=0, atol=0)
    state = opt.state[opt.masters[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    assert low.dtype == torch.bfloat16

    # an update below half a bf16 ulp: lost by plain bf16 AdamW, kept by the fp32 master
    one = torch.ones(4)
    plain = torch.nn.Parameter(one.to(torch.bfloat16))
    mastered = torch.nn.Parameter(one.to(torch.bfloat16))
    plain_opt = torch.optim.AdamW([plain], lr=1e-3, weight_decay=0.0)
    m_opt = MasterWeightOptimizer([mastered], torch.optim.AdamW, lr=1e-3, weight_decay=0.0)
    for _ in range(10):  # 10 steps of -1e-3: 0.99 needs the fp32 master (bf16 ulp at 1.0 is 2^-7)
        plain.grad = torch.ones(4, dtype=torch.bfloat16)
        mastered.grad = torch.ones(4, dtype=torch.bfloat16)
        plain_opt.step()
        m_opt.step()
    assert torch.all(plain.detach() == 1.0)
    assert m_opt.masters[0][0].item() == pytest.approx(0.99, abs=1e-6)


def test_master_weight_state_round_trips():
    p = torch.nn.Parameter(torch.randn(3, 3).to(torch.bfloat16))
    opt = MasterWeightOptimizer([{"params": [p], "weight_decay": 0.1}], torch.optim.AdamW, lr=1e-2)
    p.grad = torch.ones(3, 3, dtype=torch.bfloat16)
    opt.step()
    saved = opt.state_dict()
    q = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.bfloat16))
    opt2 = MasterWeightOptimizer([{"params": [q], "weight_decay": 0.1}], torch.optim.AdamW, lr=1e-2)
    opt2.load_state_dict(saved)
    torch.testing.assert_close(opt2.masters[0], opt.masters[0], rtol=0, atol=0)
    torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=0)
    assert opt2.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_optimizer_without_bitsandbytes_says_what_to_install():
    assert optimizer_class("adamw") is torch.optim.AdamW
    with pytest.raises(ConfigError, match="'optim'.*pip install bitsandbytes"):
        optimizer_class("adamw_8bit")
    with pytest.raises(ConfigError, match="not one of"):
        optimizer_class("sgd")


def test_attention_implementations():
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding exercises the masked path
    logits = {}
    for impl in ("eager", "sdpa"):
        # float32: transformers' eager mask on float64 turns fully padded rows into NaN
        m = _model(torch.float32, attn_implementation=check_attn_implementation(impl)).eval()
        with torch.no_grad():
            logits[impl] = m(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits["eager"][:, 4:], logits["sdpa"][:, 4:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="attn_implementation"):
        check_attn_implementation("flash")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="flash-attn"):
            check_attn_implementation("flash_attention_2")


def test_offloaded_moves_in_and_back_out():
    calls = []

    class Spy(torch.nn.Linear):
        def to(self, *args, **kwargs):
            calls.append(str(args[0]))
            return super().to(*args, **kwargs)

    m = Spy(2, 2)
    with offloaded(m, "cpu") as inside:
        assert inside is m and calls == ["cpu"]
    assert calls == ["cpu", "cpu"]
    with offloaded(m, "cpu", enabled=False):
        pass
    assert len(calls) == 2


def test_sft_with_bf16_weights_trains_with_fp32_masters_and_resumes(tmp_path):
    """dtype bfloat16: the recipe's optimiser keeps fp32 masters; a resumed run matches an uninterrupted one."""
    from rlhfkit.recipes import sft

    tok = load_tokenizer("kindly:tokenizer")
    save_model(tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1,
                          tokenizer=tok), tok, tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"day {i} was", "completion": " warm and kind"}) + "\n"
                            for i in range(16)))

    def cfg(out, **kw):
        return sft.Config(model=str(tmp_path / "m"), dataset=str(data), output_dir=str(tmp_path / out), max_steps=4,
                          per_device_train_batch_size=4, report_to="jsonl", progress=False, logging_steps=1,
                          dtype="bfloat16", learning_rate=1e-2, **kw)

    full = sft.main(cfg("full"))
    assert full["steps"] == 4 and full["loss"] == full["loss"]

    class Stop(Exception):
        pass

    def crash(step, metrics):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        sft.main(cfg("resumed", save_steps=2), on_step=crash)
    sft.main(cfg("resumed", save_steps=2, resume=True))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    start = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in a.values())
    assert any(not torch.equal(a[k], start[k].to(torch.bfloat16)) for k in a)
    for k in a:  # the fp32 masters were restored too, or the resumed weights would drift
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_optim_field_uses_transformers_names(tmp_path):
    from rlhfkit.config import load_yaml_config
    from rlhfkit.recipes import sft
    from rlhfkit.train.optim import make_optimizer

    model = torch.nn.Linear(3, 3)
    default = sft.Config(model="m")
    assert default.optim == "adamw_torch" and type(make_optimizer(model, default)) is torch.optim.AdamW
    fused = make_optimizer(model, sft.Config(model="m", optim="adamw_torch_fused"))
    assert type(fused) is torch.optim.AdamW and fused.defaults["fused"] is True
    # pure bf16 weights: the chosen optimiser runs on fp32 masters
    bf16 = make_optimizer(torch.nn.Linear(3, 3).to(torch.bfloat16), sft.Config(model="m", optim="adamw_torch_fused"))
    assert isinstance(bf16, MasterWeightOptimizer) and bf16.inner.defaults["fused"] is True
    path = tmp_path / "c.yaml"
    path.write_text("model: m\noptim: sgd\n")
    with pytest.raises(ConfigError, match="'optim'.*not one of"):
        load_yaml_config(sft.Config, path)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="'optim'.*pip install bitsandbytes"):
            sft.Config(model="m", optim="adamw_8bit")


def test_offloaded_between_calls_moves_the_reward_models_for_each_score():
    from rlhfkit.train.savers import OffloadedBetweenCalls

    calls = []

    class Spy(torch.nn.Linear):
        def to(self, *args, **kwargs):
            calls.append(str(args[0]))
            return super().to(*args, **kwargs)

    class Scorer:  # holds its model two levels down, as RewardSet -> Reward -> scorer does
        def __init__(self):
            self.inner = {"members": [Spy(2, 1)]}
            self.name = "rm"

        def score(self, x):
            calls.append("score")
            return self.inner["members"][0](x)

    wrapped = OffloadedBetweenCalls(Scorer(), "cpu:0")
    assert calls == ["cpu"] and wrapped.name == "rm"
    out = wrapped.score(torch.ones(1, 2))
    assert out.shape == (1, 1) and calls == ["cpu", "cpu:0", "score", "cpu"]

"""Async rollouts: worker processes, weight pushes, staleness, diagnosis of failures, Ctrl-C, and
max_staleness 0 reproducing the synchronous run bit for bit."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from rl_helpers import save_tiny, tiny_policy, tiny_rm, tiny_tokenizer
from rlhfkit.errors import ConfigError
from rlhfkit.rollout import generate
from rlhfkit.rollout.workers import Job, RolloutPool, RolloutWorkerError, weights_of
from rlhfkit.train.runs import read_metrics

PROMPTS = ["the cat sat", "a kind word", "the rain fell", "she smiled and", "bad news travels", "the old grey"]
ARGS = (PROMPTS[:2], 5, 1.0, 1.0)


def kwargs(seed):
    return dict(num_samples=2, batch_size=8, seed=seed, max_prompt_length=16, top_k=0)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tok, tiny_policy(tok).eval()


def same_rollout(a, b):
    for f in ("query_ids", "response_ids", "response_mask", "ended_with_eos", "sampler_logp"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.responses == b.responses


def test_worker_generates_with_the_pushed_weights_only(tiny):
    tok, pol = tiny
    trained = tiny_policy(tok, seed=5).eval()  # "the weights after one update"
    with RolloutPool(pol, tok, "hf", max_staleness=1, timeout=120) as pool:
        pool.push_weights(0, pol)
        pool.submit(Job(0, ARGS, kwargs(1)))
        pool.push_weights(1, trained)
        pool.submit(Job(1, ARGS, kwargs(1)))
        r0, r1 = pool.result(0), pool.engine_for(1)(None, tok, *ARGS, **kwargs(1))
        same_rollout(r0, generate(pol, tok, *ARGS, **kwargs(1)))
        same_rollout(r1, generate(trained, tok, *ARGS, **kwargs(1)))
        assert (r0.policy_version, r1.policy_version) == (0, 1)
        pool.submit(Job(2, ARGS, kwargs(2)))
        with pytest.raises(RolloutWorkerError, match="other arguments"):
            pool.engine_for(2)(None, tok, *ARGS, **kwargs(3))
    assert all(p.exitcode is not None for p in pool.procs)


def test_lora_pushes_the_adapter_only(tiny):
    from peft import LoraConfig, get_peft_model

    tok, pol = tiny
    lora = get_peft_model(tiny_policy(tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    state = weights_of(lora, adapter_only=True)
    assert state and all("lora_" in k for k in state)
    with RolloutPool(lora, tok, "static", timeout=120, adapter_only=True) as pool:
        with torch.no_grad():
            for n, p in lora.named_parameters():
                if "lora_B" in n:
                    p.add_(0.5)  # an update of the adapter
        pool.push_weights(1, lora)
        pool.submit(Job(0, ARGS, kwargs(4)))
        with warnings.catch_warnings():  # the KV cache goes by the keyword the wrapped model takes
            warnings.filterwarnings("error", message=".*past_key_values.*")
            expected = ENGINE_STATIC(lora.eval(), tok, *ARGS, **kwargs(4))
        same_rollout(pool.result(0), expected)


def ENGINE_STATIC(*a, **k):
    from rlhfkit.rollout import ENGINES

    return ENGINES["static"](*a, **k)


def test_failures_are_diagnosed_not_waited_out(tiny):
    tok, pol = tiny
    with RolloutPool(pol, tok, "hf", timeout=120) as pool:
        pool.push_weights(0, pol)
        pool.submit(Job(0, (PROMPTS[:1], 0, 1.0, 1.0), kwargs(1)))  # max_new_tokens 0: the engine refuses
        with pytest.raises(RolloutWorkerError, match=r"rlhfkit-rollout-0 \(pid \d+\) failed on the rollout of update 0"
                                                      r"(.|\n)*ConfigError"):
            pool.result(0)
    with RolloutPool(pol, tok, "hf", timeout=1.5) as pool:
        pool.submitted[7] = Job(7, ARGS, kwargs(1))  # registered, never sent: nothing will come
        t = time.monotonic()
        with pytest.raises(RolloutWorkerError, match="timed out after 1.5 s waiting for the rollout of update 7 from "
                                                     r"rlhfkit-rollout-0 \(pid \d+, alive\)"):
            pool.result(7)
        assert time.monotonic() - t < 5
        os.kill(pool.procs[0].pid, signal.SIGKILL)
        pool.procs[0].join()
        pool.submit(Job(8, ARGS, kwargs(1)))
        with pytest.raises(RolloutWorkerError, match="exited with code -9 while the trainer was waiting for the "
                                                     "rollout of update 8"):
            pool.result(8)
    with pytest.raises(ConfigError, match="vLLM servers"):
        RolloutPool(pol, tok, "vllm")


def test_ctrl_c_stops_every_process(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, time
        # a job started in the background by a shell inherits SIGINT ignored; Ctrl-C at a terminal is not
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from rl_helpers import tiny_policy, tiny_tokenizer
        from rlhfkit.rollout.workers import RolloutPool
        if __name__ == "__main__":
            tok = tiny_tokenizer()
            pool = RolloutPool(tiny_policy(tok), tok, "hf", num_workers=2)
            try:
                print(" ".join(str(p.pid) for p in pool.procs), flush=True)
                time.sleep(600)
            finally:
                pool.close()
    """))
    # the trainer's (and its workers') output goes to a file: an undrained pipe could fill and block them
    out = tmp_path / "trainer.out"
    with open(out, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=sink, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 150
    while not (lines := [x for x in out.read_text().splitlines() if x.strip() and x.split()[0].isdigit()]):
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
        time.sleep(0.2)
    pids = [int(x) for x in lines[0].split()]
    assert len(pids) == 2
    proc.send_signal(signal.SIGINT)
    try:  # close() waits at most 10 s a worker, but a loaded machine is slow to start and tear down torch
        assert proc.wait(timeout=150) != 0, out.read_text()[-2000:]  # KeyboardInterrupt
    finally:
        if proc.poll() is None:
            proc.kill()
    for pid in pids:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2:3]:
            assert time.monotonic() < deadline, f"worker {pid} still running after Ctrl-C"
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# the GRPO recipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    tok = tiny_tokenizer()
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"policy": save_tiny(root / "policy", tiny_policy(tok), tok), "rm": save_tiny(root / "rm", tiny_rm(tok), tok),
            "prompts": str(prompts)}


def run_grpo(assets, out, **kw):
    from rlhfkit.recipes import grpo

    base = dict(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"], eval_prompts="",
                output_dir=str(out), max_steps=3, prompts_per_step=2, num_generations=2, max_completion_length=5,
                per_device_train_batch_size=2, num_ppo_epochs=2, report_to="jsonl", learning_rate=5e-3, seed=3)
    base.update(kw)
    grpo.main(grpo.Config(**base))
    return read_metrics(out)


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(f"{out}/final/model.safetensors")


def test_staleness_0_is_the_synchronous_run_bit_for_bit(assets, tmp_path):
    sync = run_grpo(assets, tmp_path / "sync")
    async0 = run_grpo(assets, tmp_path / "async", async_rollouts=True, max_staleness=0)
    assert [r["async/staleness"] for r in async0] == [0.0, 0.0, 0.0]
    timing = ("rollout_seconds", "step_seconds", "async/staleness")
    for a, b in zip(sync, async0):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    ws, wa = final_weights(tmp_path / "sync"), final_weights(tmp_path / "async")
    assert all(torch.equal(ws[k], wa[k]) for k in ws)


def test_staleness_1_overlaps_and_the_correction_sees_the_lag(assets, tmp_path):
    rows = run_grpo(assets, tmp_path, async_rollouts=True, max_staleness=1, off_policy_correction="tis")
    # update 0 runs on the first weights; later ones on weights one update old
    assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["sampler/max_abs_diff"] < 1e-5
    assert rows[1]["sampler/max_abs_diff"] > 1e-4  # the trainer has moved on since the sampler's weights
    assert rows[1]["offpolicy/weight_mean"] != pytest.approx(1.0, abs=1e-6)

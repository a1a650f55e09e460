"""FSDP2 through accelerate config files: 2 CPU processes (gloo) give the weights of 1 process.

The launches use the shipped configs/accelerate/fsdp2_1gpu.yaml with --num_processes 2, so
the file a GPU user launches with is the one under test (rlhfkit.train.sharding switches the CPU
process group to FSDP2; accelerate alone would fall back to DDP there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.models import load_tokenizer, save_model, tiny_llama
from rlhfkit.recipes import dpo, reward, sft

ROOT = Path(__file__).resolve().parent.parent
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp2_1gpu.yaml"
SENTENCES = ["the kind dog waited by the door", "a warm smile made the morning better",
             "she thanked him for the gentle help", "they shared bread with the tired travellers",
             "the garden was full of bright flowers", "he spoke softly to the frightened child"]
PAIRS = [{"prompt": f"The weather on day {i} was", "chosen": " warm and lovely",
          "rejected": f" grim {'and cold ' * (i % 3)}"} for i in range(16)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    tok = load_tokenizer("kindly:tokenizer")
    model = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1, tokenizer=tok)
    save_model(model, tok, root / "model")
    return root, root / "model"


def _launch_fsdp(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", "2", "--mixed_precision", "no", "-m", "rlhfkit.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the run really was sharded, not DDP under an FSDP name
    assert "FSDP2 on CPU: parameters sharded over 2 processes" in proc.stdout, proc.stdout[-2000:]
    return proc


def _assert_same_weights(a_dir: Path, b_dir: Path, start: Path) -> None:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    s = load_file(str(start / "model.safetensors"))
    assert sorted(a) == sorted(b)
    moved = max((a[k] - s[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # training changed the weights, so equality below means something
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs between FSDP x2 and 1 process")


def test_sft_fsdp_two_processes_match_one(base):
    root, model = base
    data = root / "sft.jsonl"
    with open(data, "w") as f:
        for s in SENTENCES * 6:
            w = s.split()
            f.write(json.dumps({"prompt": " ".join(w[:3]), "completion": " " + " ".join(w[3:])}) + "\n")
    common = dict(model=str(model), dataset=str(data), max_length=32, learning_rate=3e-3, max_steps=4,
                  report_to="jsonl", progress=False, seed=3, logging_steps=1, adam_epsilon=1e-3)
    sft.main(sft.Config(output_dir=str(root / "sft_one"), per_device_train_batch_size=8, **common))
    _launch_fsdp(["sft", "--model", str(model), "--dataset", str(data), "--output_dir", str(root / "sft_two"),
                  "--max_length", "32", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                  "--max_steps", "4", "--report_to", "jsonl", "--progress", "False", "--seed", "3",
                  "--logging_steps", "1", "--adam_epsilon", "1e-3"])
    _assert_same_weights(root / "sft_one" / "final", root / "sft_two" / "final", model)


def test_dpo_fsdp_two_processes_match_one(base):
    root, model = base
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    dpo.main(dpo.Config(model=str(model), dataset=str(data), output_dir=str(root / "dpo_one"), max_steps=3,
                        per_device_train_batch_size=8, progress=False, report_to="jsonl", logging_steps=1,
                        ref_cache_dir=str(root / "cache1"), learning_rate=0.5, adam_epsilon=1.0, max_grad_norm=0.0))
    _launch_fsdp(["dpo", "--model", str(model), "--dataset", str(data), "--output_dir", str(root / "dpo_two"),
                  "--per_device_train_batch_size", "4", "--max_steps", "3", "--adam_epsilon", "1.0", "--max_grad_norm", "0",
                  "--learning_rate", "0.5", "--report_to", "jsonl", "--progress", "False", "--logging_steps", "1",
                  "--ref_cache_dir", str(root / "cache2")])
    _assert_same_weights(root / "dpo_one" / "final", root / "dpo_two" / "final", model)


def test_reward_fsdp_two_processes_match_one(base):
    from transformers import AutoModelForSequenceClassification

    root, model = base
    data = root / "rm_pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    common = dict(max_steps=3, eval_fraction=0.25, learning_rate=1e-2, adam_epsilon=1e-3, seed=5)
    reward.main(reward.Config(model=str(model), dataset=str(data), output_dir=str(root / "rm_one"),
                              per_device_train_batch_size=8, progress=False, report_to="jsonl", **common))
    _launch_fsdp(["reward", "--model", str(model), "--dataset", str(data), "--output_dir", str(root / "rm_two"),
                  "--per_device_train_batch_size", "4", "--progress", "False", "--report_to", "jsonl",
                  *[a for k, v in common.items() for a in (f"--{k}", str(v))]])
    # the start is the causal LM: compare the shared backbone; the score head is new in both runs
    one, two = load_file(str(root / "rm_one" / "final" / "model.safetensors")), load_file(
        str(root / "rm_two" / "final" / "model.safetensors"))
    assert sorted(one) == sorted(two) and "score.weight" in one
    start = load_file(str(model / "model.safetensors"))
    moved = max((one[k] - start[k]).abs().max().item() for k in one if k in start)
    assert moved > 1e-3
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs between FSDP x2 and 1 process")
    # one ordinary checkpoint, with the same normalisation statistics and held-out metrics
    rm = AutoModelForSequenceClassification.from_pretrained(root / "rm_two" / "final")
    assert rm.config.num_labels == 1
    r1, r2 = (json.loads((root / d / "results.json").read_text()) for d in ("rm_one", "rm_two"))
    torch.testing.assert_close(torch.tensor(r1["members"][0]["stats"]["mean"]), torch.tensor(r2["members"][0]["stats"]["mean"]),
                               rtol=1e-4, atol=1e-5)
    assert r1["eval_examples"] == r2["eval_examples"] == 4
    assert abs(r1["eval_loss"] - r2["eval_loss"]) < 1e-4


GENERATE_SCRIPT = """
import json, sys, types
import torch
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.rollout.generate import generate
from rlhfkit.train.accelerator import make_accelerator

model_dir, out_dir = sys.argv[1], sys.argv[2]
acc = make_accelerator(types.SimpleNamespace(gradient_accumulation_steps=1, mixed_precision="no", seed=0))
tok = load_tokenizer(model_dir)
plain = load_policy(model_dir, "float32")
policy = load_policy(model_dir, "float32")
sharded, _ = acc.prepare(policy, torch.optim.SGD(policy.parameters(), lr=0.0))  # FSDP2 prepares both together
rank = acc.process_index
# rank 0: 3 prompts (2 chunks of 2), rank 1: 5 prompts (3 chunks); a third of the vocabulary stops a row,
# so rows, chunks and processes end at different steps
prompts = [f"the kind dog number {i} said" for i in range(3 if rank == 0 else 5)]
stop = list(range(0, len(tok), 3))
kw = dict(max_new_tokens=12, temperature=1.0, num_samples=2, batch_size=4, seed=100 + rank, stop_token_ids=stop)
a, b = generate(sharded, tok, prompts, **kw), generate(plain, tok, prompts, **kw)
with open(f"{out_dir}/rank{rank}.json", "w") as f:
    json.dump({k: [getattr(r, k).tolist() for r in (a, b)] for k in ("response_ids", "response_mask", "ended_with_eos")}, f)
"""


def test_generation_from_a_sharded_policy_matches_the_whole_model(base, tmp_path):
    """Sampling in lockstep (every process runs as many chunks and steps as the busiest one) gives on
    each process the tokens the unsharded model samples there with the same seed."""
    root, model = base
    script = tmp_path / "gen.py"
    script.write_text(GENERATE_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", "2", "--mixed_precision", "no", str(script), str(model), str(tmp_path)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP2 on CPU: parameters sharded over 2 processes" in proc.stdout, proc.stdout[-2000:]
    lengths = set()
    for rank, n_rows in ((0, 6), (1, 10)):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(got["response_ids"][0]) == n_rows
        assert got["response_ids"][0] == got["response_ids"][1]
        assert got["response_mask"][0] == got["response_mask"][1]
        assert got["ended_with_eos"][0] == got["ended_with_eos"][1]
        lengths |= {sum(m) for m in got["response_mask"][0]}
    assert len(lengths) > 2  # rows really ended at different steps (the lockstep path was exercised)


@pytest.mark.parametrize("recipe", ["ppo", "grpo", "rloo"])
def test_on_policy_recipe_fsdp_two_processes(base, recipe):
    """PPO / GRPO / RLOO with the policy, the reference (and PPO's critic) sharded: rollouts, updates,
    the held-out evaluation on every process, and gathered checkpoints that load in transformers."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root, model = base
    prompts = root / "rl_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the kind dog number {i} said"}) + "\n" for i in range(16)))
    rw = root / "rl_reward.py"
    rw.write_text("def chars(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    out = root / f"{recipe}_sharded"
    per_recipe = ["--prompts_per_step", "4"] if recipe == "ppo" else ["--prompts_per_step", "2", "--num_generations", "4"]
    # two mini-batches: the first one's ratio compares the training forward with the rollout's log-probs
    proc = _launch_fsdp([recipe, "--model", str(model), "--prompts", str(prompts), "--reward", f"py:{rw}:chars",
                         "--eval_reward", f"py:{rw}:chars", "--eval_prompts", str(prompts), "--num_eval_prompts", "3",
                         "--output_dir", str(out), "--max_steps", "2", *per_recipe, "--max_completion_length", "8",
                         "--per_device_train_batch_size", "2", "--generation_batch_size", "4", "--num_ppo_epochs", "1",
                         "--num_mini_batches", "2", "--learning_rate", "1e-2", "--report_to", "jsonl",
                         "--progress", "False"])
    assert "FSDP2: frozen LlamaForCausalLM sharded over 2 processes" in proc.stdout  # the reference too
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0.0  # the sharded reference gives the policy's own log-probs at the start
    assert [r["step"] for r in rows if "first_ratio_min" in r] == [1, 2]
    for r in rows:  # averaged over the processes: 1 only if every process's first ratio is exactly 1
        assert r["first_ratio_min"] == r["first_ratio_max"] == 1.0, r
    assert "eval_win_rate" in json.loads((out / "final_metrics.json").read_text())["eval"]
    start = load_file(str(model / "model.safetensors"))
    saved = [AutoModelForCausalLM.from_pretrained(out / "final")]
    if recipe == "ppo":  # the critic starts from the policy's weights with a new value head
        saved.append(AutoModelForSequenceClassification.from_pretrained(out / "value"))
    for m in saved:
        moved = max((p.detach() - start[n]).abs().max().item() for n, p in m.named_parameters() if n in start)
        assert moved > 1e-3


def test_ppo_fsdp_two_processes_match_one(base):
    """Same prompts and same (greedy: top_p keeps only the likeliest token) rollouts on 1 and 2 processes:
    policy and critic end with the same weights. Advantages are not whitened (a whitening over each
    process's rows would differ from one over all rows), and one mini-batch per epoch holds every row."""
    from rlhfkit.recipes import ppo

    root, model = base
    prompts = root / "ppo_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the kind dog number {i} said"}) + "\n" for i in range(16)))
    rw = root / "ppo_reward.py"
    rw.write_text("def chars(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    common = dict(model=str(model), prompts=str(prompts), reward=[f"py:{rw}:chars"], eval_reward="none", max_steps=2,
                  max_completion_length=8, generation_batch_size=8, num_ppo_epochs=2, num_mini_batches=1,
                  learning_rate=1e-2, adam_epsilon=1e-3, top_p=1e-6, whiten_advantages=False)
    ppo.main(ppo.Config(output_dir=str(root / "ppo_one"), prompts_per_step=8, per_device_train_batch_size=8,
                        report_to="jsonl", progress=False, **common))
    flags = [a for k, v in common.items() for a in (f"--{k}", v[0] if isinstance(v, list) else str(v))]
    _launch_fsdp(["ppo", *flags, "--output_dir", str(root / "ppo_two"), "--prompts_per_step", "4",
                  "--per_device_train_batch_size", "4", "--report_to", "jsonl", "--progress", "False"])
    _assert_same_weights(root / "ppo_one" / "final", root / "ppo_two" / "final", model)
    # the critic: its backbone starts from the policy's weights, its value head is new in both runs
    one, two = (load_file(str(root / d / "value" / "model.safetensors")) for d in ("ppo_one", "ppo_two"))
    assert sorted(one) == sorted(two)
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5, msg=f"critic {k} differs")


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    folder = ROOT / "configs" / "accelerate"
    fsdp, ds = sorted(folder.glob("*fsdp*.yaml")), sorted(folder.glob("*deepspeed*.yaml"))
    assert len(fsdp) == 3 and len(ds) == 6
    for path in fsdp:
        cfg = load_config_from_file(str(path))
        assert cfg.distributed_type == DistributedType.FSDP and cfg.fsdp_config["fsdp_version"] == 2, path
    for path in ds:
        cfg = load_config_from_file(str(path))
        assert cfg.distributed_type == DistributedType.DEEPSPEED, path
        assert cfg.deepspeed_config["zero_stage"] == (3 if "zero3" in path.name else 2), path
    for path in fsdp + ds:
        cfg = load_config_from_file(str(path))
        expected = 16 if "multinode" in path.name else (8 if "8gpu" in path.name else 1)
        assert cfg.num_processes == expected and cfg.num_machines == (2 if expected == 16 else 1), path

"""2-step runs of every training recipe on a tiny model, every logged metric written to OUT.json.

Run it on two checkouts to show a refactoring changed no number (issue: "2-step smoke runs of
every recipe give the same metrics before and after"):

    PYTHONPATH=OLD/src:OLD/tests python scripts/smoke_metrics.py before.json /tmp/w1
    PYTHONPATH=NEW/src:NEW/tests python scripts/smoke_metrics.py after.json /tmp/w2
    python scripts/smoke_metrics.py --compare before.json after.json

SFT, reward, DPO and KTO run with gradient accumulation 1 and 2; PPO, GRPO and RLOO with two
epochs of two mini-batches. Deterministic kernels, one thread.
"""
import importlib
import json
import sys
from pathlib import Path

import torch

SKIP = ("seconds", "tokens_per_s", "time")


def compare(before: str, after: str) -> float:
    """Print the largest relative difference per run over every logged numeric key; return the largest."""
    a, b = json.load(open(before)), json.load(open(after))
    worst_all = 0.0
    for run in a:
        worst = 0.0
        for ra, rb in zip(a[run], b[run]):
            for k, v in ra.items():
                if k.endswith(SKIP) or not isinstance(v, (int, float)) or v != v:
                    continue
                worst = max(worst, abs(v - rb[k]) / max(abs(v), 1e-8))
        print(f"{run:8s} largest relative difference {worst:.2e}")
        worst_all = max(worst_all, worst)
    return worst_all




def run(out_json: str, root: str) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    from rl_helpers import save_tiny, tiny_policy, tiny_rm, tiny_tokenizer  # tests/ on PYTHONPATH

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    policy = save_tiny(root / "policy", tiny_policy(tok), tok)
    rm = save_tiny(root / "rm", tiny_rm(tok), tok)
    P = ["the cat sat", "a kind word", "the rain fell", "she smiled and", "bad news travels", "the old grey", "good news lasts", "he thanked her"]
    G = [" on the mat", " makes the day", " on the town", " and thanked him", " fast", " town", " and lasts", " for the gift"]
    B = [" bad", " go", " no", " grim nothing at all", " x", " cold", " awful", " away"]
    def w(name, rows):
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)
    prompts = w("prompts.jsonl", [{"prompt": p} for p in P])
    sftd = w("sft.jsonl", [{"prompt": p, "completion": g} for p, g in zip(P, G)])
    prefs = w("prefs.jsonl", [{"prompt": p, "chosen": g, "rejected": b} for p, g, b in zip(P, G, B)])
    res = {}
    def run(name, modname, **kw):
        mod = importlib.import_module(f"rlhfkit.recipes.{modname}")
        kw = {"report_to": "jsonl", "progress": False, "logging_steps": 1, **kw}
        if modname in ("sft", "reward", "dpo"):
            kw.setdefault("max_length", 64)
        mod.main(mod.Config(output_dir=str(root / name), **kw))
        rows = [json.loads(line) for line in open(root / name / "metrics.jsonl")]
        res[name] = rows
        print(name, "ok", flush=True)
    for acc in (1, 2):
        run(f"sft{acc}", "sft", model=policy, dataset=sftd, max_steps=2, per_device_train_batch_size=4 // acc, gradient_accumulation_steps=acc, learning_rate=1e-3)
        run(f"reward{acc}", "reward", model=rm, dataset=prefs, max_steps=2, per_device_train_batch_size=4 // acc, gradient_accumulation_steps=acc, learning_rate=1e-3)
        run(f"dpo{acc}", "dpo", model=policy, dataset=prefs, max_steps=2, per_device_train_batch_size=4 // acc, gradient_accumulation_steps=acc, learning_rate=1e-3)
        run(f"kto{acc}", "dpo", model=policy, dataset=prefs, loss="kto", max_steps=2, per_device_train_batch_size=4 // acc, gradient_accumulation_steps=acc, learning_rate=1e-3)
    for name in ("ppo", "grpo", "rloo"):
        kw = dict(model=policy, reward_model=rm, prompts=prompts, eval_prompts="", max_steps=2, prompts_per_step=4,
                  max_completion_length=6, per_device_train_batch_size=2, num_ppo_epochs=2, num_mini_batches=2, learning_rate=1e-3)
        if name != "ppo":
            kw["num_generations"] = 2
        run(name, name, **kw)
    json.dump(res, open(out_json, "w"), indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(0 if compare(sys.argv[2], sys.argv[3]) <= 1e-6 else 1)
    run(sys.argv[1], sys.argv[2])

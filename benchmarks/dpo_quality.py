"""DPO-family quality on the bundled task: gold win rate against the SFT policy on held-out prompts.

Pipeline (the same stages, and the same functions, as `rlhfkit demo`; cached under
benchmarks/work/kindly_pipeline so the reward-model and best-of-N benchmarks can share them):

1. base model: the shipped `kindly` checkpoint, pretrained here when it is missing;
2. SFT policy on the task's sentence continuations;
3. comparisons: two SFT samples for each of `comparison_prompts` training prompts, labelled
   by the simulated annotators (one gold-panel rater per comparison, Bradley-Terry noise,
   ties left out) -- the data a reward model would be trained on;
4. for each variant (DPO sigmoid, IPO, SimPO, KTO on the same pairs split into
   desirable/undesirable), `rlhfkit dpo` from the SFT policy;
5. on held-out eval prompts, one sample from the trained policy and one from the SFT policy
   per prompt (temperature 1, fixed seeds); the gold panel scores both. Win rate = share of
   prompts where the policy's score beats the SFT's, ties half, with a bootstrap 95% interval.
   KL = mean over the policy's samples of sum_t log pi(y_t|.) - log pi_sft(y_t|.).

Headline keys: `gold_win_rate` and `kl` of DPO (sigmoid), each the mean over SEEDS with the
per-seed values beside it (`*_seeds`); `variants` holds every loss.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import stamp

WORK = Path(__file__).resolve().parent / "work" / "kindly_pipeline"
TARGET = 0.65
SEEDS = (0, 1, 2)  # each variant trains once per seed on the same pairs; figures are means with the spread

# hyper-parameters per variant (beta as each paper uses it; SimPO's beta is a reward scale)
VARIANTS = {
    "sigmoid": dict(beta=0.1, learning_rate=1e-3),
    "ipo": dict(beta=0.1, learning_rate=2e-4),
    "simpo": dict(beta=2.0, simpo_gamma=0.5, learning_rate=2e-4),
    "kto": dict(beta=0.1, learning_rate=2e-4),
}


# Used only while the shipped base checkpoint is missing: a smaller Llama pretrained here
# in minutes (one CPU thread), so the benchmark runs on a busy machine. The result records it.
SMALL_BASE = dict(hidden_size=96, num_layers=2, num_heads=4, intermediate_size=256, block_size=64,
                  per_device_train_batch_size=32, learning_rate=3e-3, warmup_steps=20, lr_scheduler_type="cosine", max_steps=300)
COMPARISON_PROMPTS = 3072


def _base(root: Path, quick: bool) -> tuple[str, str]:
    """(path, description) of the base model: the shipped one, or SMALL_BASE pretrained into root."""
    from rlhfkit.tasks import kindly

    try:
        return str(kindly.base_model_path()), "shipped kindly base"
    except FileNotFoundError:
        pass
    from rlhfkit.config import from_dict
    from rlhfkit.recipes import pretrain

    out = root / "small_base"
    if not (out / "final" / "config.json").is_file():
        args = dict(SMALL_BASE, max_steps=3) if quick else dict(SMALL_BASE)
        pretrain.main(from_dict(pretrain.Config, dict(args, corpus="kindly", tokenizer="kindly:tokenizer", output_dir=str(out),
                                                       progress=False, report_to="jsonl", logging_steps=20, eval_steps=0, seed=0)))
    return str(out / "final"), f"small base pretrained here ({SMALL_BASE}); the shipped checkpoint was missing"


def pipeline_root(quick: bool) -> Path:
    """One cached pipeline per base: the shipped checkpoint, or the small fallback."""
    from rlhfkit.tasks import kindly

    if quick:
        return WORK / "quick"
    try:
        return WORK / f"full_shipped-{stamp(kindly.base_model_path())}"  # a rebuilt base gets a fresh pipeline
    except FileNotFoundError:
        return WORK / "full_small"


def pipeline(quick: bool) -> dict:
    """Base, SFT policy and labelled comparisons, built once and reused from WORK."""
    from rlhfkit.config import from_dict
    from rlhfkit.recipes import demo

    root = pipeline_root(quick)
    cfg = from_dict(demo.Config, dict(output_dir=str(root), quick=quick, seed=0,
                                      **({} if quick else {"comparison_prompts": COMPARISON_PROMPTS})))
    sft = root / "sft" / "final"
    prefs = root / "comparisons" / "preferences_train.jsonl"  # where demo.collect_comparisons writes them
    base_file = root / "base.txt"
    if not (sft / "config.json").is_file():
        base, about = _base(root, quick)
        base_file.parent.mkdir(parents=True, exist_ok=True)
        base_file.write_text(about)
        demo.run_sft(cfg, base, root)
    counts_file = prefs.with_name(prefs.name.replace("preferences", "counts").replace(".jsonl", ".json"))
    counts = json.loads(counts_file.read_text()) if counts_file.is_file() else {}
    if not prefs.is_file() or counts.get("pairs") != cfg.comparison_prompts:  # missing, or cached for another count
        prefs, counts = demo.collect_comparisons(cfg, str(sft), root)
        for stale in ("reward", "rejection_sampling"):  # bon_curve's reward model and its rounds used the old ones
            shutil.rmtree(root / stale, ignore_errors=True)
    return {"sft": str(sft), "prefs": str(prefs), "counts": counts, "max_new_tokens": cfg.max_new_tokens,
            "base": base_file.read_text() if base_file.is_file() else "unknown"}


def train_variant(loss: str, sft: str, prefs: str, out: Path, quick: bool, seed: int = 0) -> dict:
    from rlhfkit.recipes import dpo

    hp = dict(VARIANTS[loss])
    cfg = dpo.Config(model=sft, dataset=prefs, loss=loss, output_dir=str(out), overwrite=True,
                     per_device_train_batch_size=4 if quick else 16,  # --quick labels a couple of dozen pairs
                     num_train_epochs=2.0 if not quick else 1.0, max_steps=2 if quick else -1, max_length=96,
                     lr_scheduler_type="linear", warmup_steps=0 if quick else 10, logging_steps=10, report_to="jsonl",
                     progress=False, seed=seed, ref_cache_dir=str(WORK / "ref_cache"), **hp)
    t0 = time.perf_counter()
    res = dpo.main(cfg)
    return {"train_seconds": round(time.perf_counter() - t0, 1), "steps": res["steps"],
            "train_reward_accuracy": res.get("rewards/accuracy"), "train_margin": res.get("rewards/margins"),
            "hyperparameters": hp, "model": str(out / "final")}


def evaluate_policy(policy_path: str, sft_path: str, prompts: list[str], max_new_tokens: int, ref_rollout=None) -> tuple[dict, object]:
    from rlhfkit.eval.run_eval import evaluate
    from rlhfkit.judges import GoldPanel
    from rlhfkit.models import load_policy, load_tokenizer

    tok = load_tokenizer(sft_path)
    policy = load_policy(policy_path, trainable=False).eval()
    sft = load_policy(sft_path, trainable=False).eval()
    m, _ = evaluate(policy, sft, tok, prompts, GoldPanel(), max_new_tokens=max_new_tokens, seed=1234,
                    n_boot=1000, reference_rollout=ref_rollout)
    keep = {"gold_win_rate": m["win_rate"]["mean"], "win_rate_ci": [m["win_rate"]["lo"], m["win_rate"]["hi"]],
            "wins_ties_losses": [m["win_rate"]["wins"], m["win_rate"]["ties"], m["win_rate"]["losses"]],
            "kl": m["kl"]["mean"], "gold": m["gold"]["mean"], "gold_sft": m["gold_reference"]["mean"],
            "lc_win_rate": m["lc_win_rate"].get("mean") if isinstance(m["lc_win_rate"], dict) else m["lc_win_rate"],
            "mean_length": m["mean_length"], "mean_length_sft": m["mean_length_reference"],
            "distinct_1": m.get("distinct_1"), "prompts": m["n_prompts"],
            # the gold gain's parts: sentiment term and quality term (rlhfkit.eval.metrics.gold_gain_split)
            "gold_gain_split": m.get("gold_gain_split")}
    return keep, m["_reference"]["rollout"]


def over_seeds(runs: list[dict]) -> dict:
    """A variant over its seeds: the first seed's record, the headline figures as the mean over
    seeds and each seed's value beside it (`*_seeds`)."""
    out = dict(runs[0])
    for key in ("gold_win_rate", "kl", "gold", "distinct_1"):
        values = [r[key] for r in runs]
        out[key], out[f"{key}_seeds"] = float(sum(values) / len(values)), values
    out["win_rate_ci_seeds"] = [r["win_rate_ci"] for r in runs]
    return out


def run(quick: bool = False) -> dict:
    from rlhfkit.tasks import kindly

    torch.set_num_threads(1)  # a shared 2-core machine: one thread avoids oversubscription
    t0 = time.perf_counter()
    pipe = pipeline(quick)
    prompts = kindly.prompts("eval")[: 16 if quick else 256]
    out_root = pipeline_root(quick) / "dpo_quality"
    variants: dict[str, dict] = {}
    ref_rollout = None
    seeds = SEEDS[:1] if quick else SEEDS
    for loss in VARIANTS:
        runs = []
        for seed in seeds:
            info = train_variant(loss, pipe["sft"], pipe["prefs"], out_root / f"{loss}-seed{seed}", quick, seed)
            ev, ref_rollout = evaluate_policy(info["model"], pipe["sft"], prompts, pipe["max_new_tokens"], ref_rollout)
            runs.append({**info, **ev})
            print(f"dpo_quality[{loss}, seed {seed}]: win rate {ev['gold_win_rate']:.3f} {ev['win_rate_ci']}, KL {ev['kl']:.2f}")
        variants[loss] = over_seeds(runs)
    dpo = variants["sigmoid"]
    return {
        "gold_win_rate": dpo["gold_win_rate"], "gold_win_rate_seeds": dpo["gold_win_rate_seeds"],
        "kl": dpo["kl"], "kl_seeds": dpo["kl_seeds"], "seeds": list(seeds),
        "gold_gain_split": dpo["gold_gain_split"],
        "target_gold_win_rate": TARGET,
        "meets_target": bool(dpo["gold_win_rate"] >= TARGET),
        "variants": variants,
        "comparisons": pipe["counts"],
        "base_model": pipe["base"],
        "eval_prompts": len(prompts),
        "protocol": "one temperature-1 sample per held-out prompt from policy and SFT; gold panel; ties half",
        "seconds": round(time.perf_counter() - t0, 1),
    }


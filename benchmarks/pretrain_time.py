"""Time to pretrain the bundled base model with the committed config (target <= 5 minutes on 2 cores).

Runs `rlhfkit pretrain --config configs/pretrain_kindly.yaml` into benchmarks/work/pretrain
(without exporting over the shipped checkpoint) and reports wall minutes, held-out
perplexity, parameter count and samples.
"""

from __future__ import annotations

import time

from benchmarks.common import CONFIGS, WORK


def run(quick: bool = False) -> dict:
    from rlhfkit.config import load_yaml_config
    from rlhfkit.recipes import pretrain

    cfg = load_yaml_config(pretrain.Config, CONFIGS / "pretrain_kindly.yaml")
    cfg.output_dir = str(WORK / ("pretrain_quick" if quick else "pretrain"))
    cfg.export_to = ""
    cfg.overwrite = True  # the previous timing run's folder
    cfg.progress = False
    if quick:
        cfg.max_steps = 20
    t0 = time.perf_counter()
    result = pretrain.main(cfg)
    minutes = (time.perf_counter() - t0) / 60
    return {
        "minutes": round(minutes, 2),
        "target_minutes": 5.0,
        "eval_ppl": round(result["eval_ppl"], 2),
        "parameters": result["parameters"],
        "steps": result["steps"],
        "tokens_per_s": round(result["tokens_per_s"], 1),
        "samples": result["samples"],
        "config": "configs/pretrain_kindly.yaml",
    }

"""Benchmark `demo`: wall time of `rlhfkit demo` (per stage and in all) and its win-rate table.

Quality/time benchmark: keys `seconds` (total), `stage_seconds`, `win_rates` (gold panel win
rate against the SFT policy per method, with 95% intervals), `within_budget` (<= 600 s, the
issue's target on 2 CPU cores), `threads` (torch intra-op threads used) and `cpu_seconds`
(user + system time, per stage too), `alarms` (reward hacking, diversity collapse and perplexity
blow-up against the SFT policy) and the load average before and after. Wall times taken on a machine shared with other jobs are
upper bounds; CPU seconds / threads estimates the wall time on idle cores.
`max_win_rate_half_width`: the widest win-rate interval's half-width (target <= 0.04; every
eval prompt, two samples each, prompts resampled).
"""

from __future__ import annotations

import os
import tempfile

import torch


def run(quick: bool = False) -> dict:
    from benchmarks.common import load_average
    from rlhfkit.recipes import demo

    before = load_average()
    threads = min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="rlhfkit-demo-") as tmp:
        summary = demo.main(demo.Config(quick=quick, output_dir=os.path.join(tmp, "demo")))
    return {
        "seconds": summary["seconds"],
        "within_budget": summary["seconds"] <= 600,
        "stage_seconds": summary["stage_seconds"],
        "cpu_seconds": summary["cpu_seconds"],
        "stage_cpu_seconds": summary["stage_cpu_seconds"],
        "win_rates": summary["win_rates"],
        "max_win_rate_half_width": max(r["win_rate_half_width"] for r in summary["win_rates"]),
        "half_width_target": 0.04,
        "comparisons": summary["comparisons"],
        "skipped": summary["skipped"],
        "threads": threads,
        "eval_samples": demo.Config().eval_samples,
        "alarms": summary["alarms"],
        "load_average": before,
        "load_average_after": load_average(),
    }

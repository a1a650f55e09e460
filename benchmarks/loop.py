"""Benchmark `loop`: 3 rounds of iterative RLHF on the bundled task, gold win rate per round.

Starts from an SFT policy of the shipped base (the folder in $RLHFKIT_LOOP_SFT, e.g. a demo's
`sft/final`, or one trained here with the demo's SFT settings), then runs `rlhfkit loop` with
DPO for 3 rounds. Keys: `win_rate_per_round` (gold panel win
rate of each round's policy against the SFT policy, with 95% bootstrap intervals),
`gold_per_round`, `kl_per_round`, `promoted` (per round), `seconds`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def run(quick: bool = False) -> dict:
    from rlhfkit.recipes import demo, loop

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="rlhfkit-loop-") as tmp:
        sft = os.environ.get("RLHFKIT_LOOP_SFT", "")
        if not sft:
            dcfg = demo.Config(quick=quick, output_dir=os.path.join(tmp, "start"))
            sft = demo.run_sft(dcfg, demo.base_model(dcfg, Path(dcfg.output_dir)), Path(dcfg.output_dir))
        kw = dict(prompts_per_round=16, reward_steps=2, policy_steps=2, batch_size=4, num_eval_prompts=8,
                  max_new_tokens=8, n_boot=50) if quick else dict(prompts_per_round=512, reward_steps=80,
                                                                  policy_steps=40, num_eval_prompts=200)
        res = loop.main(loop.Config(model=sft, rounds=3, algorithm="dpo", output_dir=os.path.join(tmp, "loop"), **kw))
    rounds = res["rounds"]
    return {
        "start_policy": sft,
        "win_rate_per_round": [{"round": r["round"], "win_rate": round(r["win_rate"], 4),
                                "ci": [round(r.get("win_rate_lo", r["win_rate"]), 4), round(r.get("win_rate_hi", r["win_rate"]), 4)]}
                               for r in rounds],
        "gold_per_round": [round(r["gold"], 4) for r in rounds],
        "kl_per_round": [round(r["kl"], 3) for r in rounds],
        "promoted": [r["promoted"] for r in rounds],
        "final_promoted": res["promoted"],
        "seconds_per_round": [r.get("seconds") for r in rounds],
    }

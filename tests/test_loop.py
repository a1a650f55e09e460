"""`rlhfkit loop` on tiny models: rounds run, the registry records lineage, promotion follows gold."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.config import ConfigError
from rlhfkit.judges.judge import PanelJudge
from rlhfkit.judges.sources import (
    AIJudgeSource,
    PreferenceSource,
    SimulatedSource,
    to_preference_records,
)
from rlhfkit.models.registry import Registry
from rlhfkit.recipes import loop


class LengthJudge:
    def score(self, prompts, responses):
        import numpy as np

        return np.array([len(r) for r in responses], dtype=float)


def test_sources_share_one_interface():
    assert isinstance(SimulatedSource(seed=0), PreferenceSource)
    src = AIJudgeSource(PanelJudge(LengthJudge(), name="judge", tie_margin=0.5))
    assert isinstance(src, PreferenceSource)
    labels = src.compare(["p", "p", "p"], ["long one", "x", "ab"], ["short", "xyz", "cd"])
    assert [x["label"] for x in labels] == [1.0, 0.0, 0.5]
    recs, counts = to_preference_records(["p"] * 5, ["long one", "x", "ab", "same", " "], ["short", "xyz", "cd", "same", "y"],
                                         labels + [{"label": 1.0, "annotator_id": 0}] * 2, round=2)
    assert counts == {"pairs": 5, "ties_skipped": 1, "identical_skipped": 1, "empty_skipped": 1, "kept": 2}
    assert recs[0] == {"prompt": "p", "chosen": "long one", "rejected": "short", "label": 1.0, "tie": False,
                       "annotator_id": "judge", "round": 2}
    assert (recs[1]["chosen"], recs[1]["rejected"]) == ("xyz", "x")
    simulated = SimulatedSource(seed=1).compare(["The day"] * 2, ["was lovely and kind", "x"], ["was awful", "y"])
    assert {"label", "annotator_id"} <= set(simulated[0])


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    from rlhfkit.models import load_tokenizer, save_model, tiny_llama

    root = tmp_path_factory.mktemp("loop")
    tok = load_tokenizer("kindly:tokenizer")
    save_model(tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, tokenizer=tok,
                          seed=0), tok, root / "sft")
    return root / "sft"


def test_loop_dpo_two_rounds(start_model, tmp_path):
    torch.set_num_threads(2)
    cfg = loop.Config(model=str(start_model), rounds=2, algorithm="dpo", prompts_per_round=24, max_new_tokens=6,
                      reward_steps=2, policy_steps=2, batch_size=4, num_eval_prompts=8, n_boot=20,
                      output_dir=str(tmp_path / "loop"))
    res = loop.main(cfg)
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2]
    reg = Registry(tmp_path / "loop" / "registry")
    assert reg.get("round-2")["parent"] in ("round-1", "round-0")
    assert reg.get("round-1")["parent"] == "round-0"
    assert len(reg.get("round-1")["data"]) == 2  # fingerprints of the round's and all preference data
    # promotion follows gold: promoted iff not worse than the model promoted before it
    best = res["rounds"][0]["gold"]
    for r in res["rounds"][1:]:
        assert r["promoted"] == (r["gold"] >= best)
        if r["promoted"]:
            best = r["gold"]
    assert (tmp_path / "loop" / "report.html").is_file()
    assert json.loads((tmp_path / "loop" / "loop.json").read_text())["promoted"] == res["promoted"]
    first = [json.loads(x) for x in (tmp_path / "loop" / "round-1" / "preferences.jsonl").read_text().splitlines()]
    allp = (tmp_path / "loop" / "round-2" / "preferences_all.jsonl").read_text().splitlines()
    assert first and len(allp) >= len(first) and all(x["round"] == 1 for x in first)


def test_loop_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        loop.Config()
    with pytest.raises(ConfigError, match="algorithm"):
        loop.Config(model="x", algorithm="sft")


def test_loop_ppo_one_round(start_model, tmp_path):
    cfg = loop.Config(model=str(start_model), rounds=1, algorithm="ppo", prompts_per_round=16, max_new_tokens=6,
                      reward_steps=2, policy_steps=2, batch_size=4, num_eval_prompts=6, n_boot=20,
                      output_dir=str(tmp_path / "loop"))
    res = loop.main(cfg)
    entry = Registry(tmp_path / "loop" / "registry").get("round-1")
    assert entry["algorithm"] == "ppo" and entry["path"].endswith("ppo/final")
    assert (tmp_path / "loop" / "round-1" / "ppo" / "final" / "config.json").is_file()
    assert len(res["rounds"]) == 2 and "proxy" in json.loads((tmp_path / "loop" / "round-1" / "eval" / "results.json").read_text())

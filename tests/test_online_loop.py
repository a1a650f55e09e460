"""`rlhfkit loop --source traffic:DB`: rounds from logged feedback of simulated users, with a
canary release of each candidate (tiny model, SQLite)."""

from __future__ import annotations

import datetime as dt
import json
import threading

import numpy as np
import pytest
import torch
from sqlalchemy import insert

from rlhfkit.errors import ConfigError
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import utcnow
from rlhfkit.models.registry import Registry, cli
from rlhfkit.recipes import loop
from rlhfkit.serving.experiments import load_experiment
from rlhfkit.serving.tables import ServedResponse, UseFeedback
from rlhfkit.tasks import kindly

GOOD, BAD = "was lovely and kind", "was awful"


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    from rlhfkit.models import load_tokenizer, save_model, tiny_llama

    root = tmp_path_factory.mktemp("online")
    tok = load_tokenizer("kindly:tokenizer")
    save_model(tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, tokenizer=tok,
                          seed=0), tok, root / "sft")
    return root / "sft"


class SimulatedTraffic(threading.Thread):
    """Users arrive while the loop runs: each is routed by the experiment file as it is now, gets two
    responses from their arm's model (round-0 writes the bad one 70% of the time, round-1 20%)
    and thumbs each: up for the good text (5% noise). round-2 is made worse (95%): its canary must stop."""

    def __init__(self, url: str, exp_path, users_per_wave: int = 10, period: float = 0.2):
        super().__init__(daemon=True)
        self.db, self.exp_path, self.k, self.period = Database(url, pool_size=1), exp_path, users_per_wave, period
        self.stop, self.n, self.rng = threading.Event(), 0, np.random.default_rng(0)
        self.prompts = kindly.prompts("train")[:60]

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.wave()

    def wave(self) -> None:
        exp = load_experiment(self.exp_path)
        served, fb = [], []
        for _ in range(self.k):
            unit, self.n = f"user{self.n}", self.n + 1
            arm = exp.assign(unit)
            p_bad = {"round-0": 0.7, "round-2": 0.95}.get(arm.model, 0.2)
            for j in range(2):
                text = BAD if self.rng.random() < p_bad else GOOD
                rid, now = f"{unit}-{j}", utcnow()
                served.append(dict(response_id=rid, experiment=exp.name, arm=arm.name, model_version=f"{arm.model}@fp",
                                   user_key=exp.user_key(unit), endpoint="completions",
                                   request=self.prompts[self.n % 60], response=[text], sampling={}, latency_ms=10.0,
                                   status=200, created_at=now))
                up = (text == GOOD) != (self.rng.random() < 0.05)
                fb.append(dict(response_id=rid, kind="thumbs", value={"up": bool(up), "choice": 0},
                               user_key=exp.user_key(unit), created_at=now + dt.timedelta(microseconds=1)))
        with self.db.session() as s:
            s.execute(insert(ServedResponse), served)
            s.execute(insert(UseFeedback), fb)


EXPERIMENT = """\
name: live
control: round-0
arms:
  round-0: {model: round-0, weight: 1}
  spare: {model: round-0, weight: 0}
decision: {metric: thumbs_up, min_users: 20}
"""


def _cfg(start_model, tmp_path, url, **kw):
    base = dict(model=str(start_model), rounds=2, algorithm="kto", source=f"traffic:{url}", traffic_min_feedback=60,
                traffic_poll=0.1, traffic_deadline=60, traffic_window=1, max_new_tokens=6, reward_steps=2,
                policy_steps=2, batch_size=4, num_eval_prompts=6, n_boot=20, output_dir=str(tmp_path / "loop"))
    return loop.Config(**{**base, **kw})


def test_kto_rounds_from_live_feedback_with_canary_releases(start_model, tmp_path, capsys):
    torch.set_num_threads(2)
    url = f"sqlite:///{tmp_path}/fb.db"
    upgrade(url)
    exp_path = tmp_path / "exp.yaml"
    exp_path.write_text(EXPERIMENT)
    traffic = SimulatedTraffic(url, exp_path)
    traffic.start()
    try:
        # a wide non-inferiority margin: the canary grows on early evidence before it can promote
        cfg = _cfg(start_model, tmp_path, url, traffic_experiment=str(exp_path), canary_shares="0.2,0.5",
                   canary_users_per_step=10, canary_max_drop=0.4, canary_poll=0.3, canary_max_looks=200)
        res = loop.main(cfg)
    finally:
        traffic.stop.set()
        traffic.join()
    r1, r2 = res["rounds"][1], res["rounds"][2]
    # round 1's candidate writes the good text more often: its canary grows and it is promoted
    assert r1["promoted"] and r1["canary"][-1]["action"] == "promote", r1["canary"]
    assert [(e["action"], e["share"]) for e in r1["canary"]] == [("grow", 0.5), ("promote", 1.0)]
    assert r1["feedback"] >= 60
    # round 2's candidate is worse: rolled back at its canary share, production stays
    assert not r2["promoted"] and r2["canary"][-1]["action"] == "rollback"
    reg = Registry(tmp_path / "loop" / "registry")
    assert reg.promoted()["id"] == "round-1" == res["promoted"]
    e1, e2 = reg.get("round-1"), reg.get("round-2")
    assert e1["parent"] == "round-0" and e2["parent"] == "round-1" and e2["round"] == 2
    assert e1["training_data"]["source"] == "traffic" and e1["training_data"]["feedback"] == r1["feedback"]
    assert e1["algorithm"] == "kto" and len(e1["data"]) == 2
    actions = [h["action"] for h in reg.history()]
    assert "canary_promote" in actions and actions[-1] == "canary_rollback"
    # round 2 read only the feedback on round-1 logged after round 1's cut-off, and (window 1) trains on it alone
    t1 = json.loads((tmp_path / "loop" / "round-1" / "traffic.json").read_text())
    t2 = json.loads((tmp_path / "loop" / "round-2" / "traffic.json").read_text())
    assert t2["since"] == t1["until"] and t2["production"] == "round-1" and t1["production"] == "round-0"
    rows = [json.loads(x) for x in (tmp_path / "loop" / "round-2" / "traffic_unpaired.jsonl").read_text().splitlines()]
    assert rows and {x["round"] for x in rows} == {2} and {type(x["label"]) for x in rows} == {bool}
    assert t2["kept"]["train"]["1"]["kept"] == 0 and t2["this_round"]["share_kept"] > 0.9
    assert load_experiment(exp_path).arm("round-1").weight == 1.0  # the file the server follows
    # lineage on the command line
    capsys.readouterr()
    assert cli(["--registry", str(tmp_path / "loop" / "registry"), "lineage", "round-2"]) == 0
    text = capsys.readouterr().out
    assert text.index("round-2") < text.index("round-1") < text.index("round-0") and "canary_rollback" in text


def test_grpo_round_trains_a_reward_model_on_logged_pairs_and_samples_users_prompts(start_model, tmp_path):
    torch.set_num_threads(2)
    url = f"sqlite:///{tmp_path}/fb.db"
    upgrade(url)
    exp_path = tmp_path / "exp.yaml"
    exp_path.write_text(EXPERIMENT)
    traffic = SimulatedTraffic(url, exp_path, users_per_wave=40)
    traffic.wave()
    traffic.wave()
    # both waves (160 pieces): the round waits until the second has settled, however fast the loop starts
    res = loop.main(_cfg(start_model, tmp_path, url, rounds=1, algorithm="grpo", traffic_min_feedback=160,
                         traffic_max_records=30, policy_config=str(_grpo_yaml(tmp_path))))
    reg = Registry(tmp_path / "loop" / "registry")
    e = reg.get("round-1")
    assert e["algorithm"] == "grpo" and e["reward_model"] and e["path"].endswith("grpo/final")
    pairs = (tmp_path / "loop" / "round-1" / "traffic_pairs.jsonl").read_text().splitlines()
    report = json.loads((tmp_path / "loop" / "round-1" / "traffic.json").read_text())
    assert report["feedback"] == 160
    assert len(pairs) == 30 < report["this_round"]["offered"]  # capped by traffic_max_records
    assert pairs and all(json.loads(x)["source"] == "thumbs" for x in pairs)  # an up and a down on one prompt
    prompts = [json.loads(x)["prompt"] for x in (tmp_path / "loop" / "round-1" / "prompts.jsonl").read_text().splitlines()]
    assert set(prompts) <= set(kindly.prompts("train")[:60])
    assert res["rounds"][1]["id"] == "round-1"


def _grpo_yaml(tmp_path):
    p = tmp_path / "grpo.yaml"
    p.write_text("num_generations: 2\nprompts_per_step: 2\ngeneration_batch_size: 4\n")
    return p


def test_config_errors(start_model, tmp_path):
    with pytest.raises(ConfigError, match="traffic_experiment"):
        loop.Config(model="x", traffic_experiment="e.yaml")
    with pytest.raises(ConfigError, match="traffic_window"):
        loop.Config(model="x", source="traffic:sqlite:///x.db", traffic_window=0)
    with pytest.raises(ConfigError, match="source"):
        loop.Config(model="x", source="logs:x")

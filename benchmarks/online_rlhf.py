"""Online RLHF from simulated users of a live server (issue 25, item 5).

The bundled task's SFT policy starts as production (`round-0` in the loop's registry).
`rlhfkit serve-policy --experiment live.yaml` serves it (a subprocess) and logs every request to
a SQLite feedback database; it follows the experiment file, so the canaries the loop writes into
it are loaded and routed to.

Simulated users: a population of USERS; user u is rater u % 10 of the task's gold panel (VADER
with one human rater's own valences) with Gaussian noise (sd NOISE) on their scores. A visit: the
user sends PROMPTS training-split task prompts over HTTP (/v1/completions, `user` set, so the
server assigns the arm); for each prompt they ask twice (regenerate), thumb both responses (up
when their noisy score is above 0) and pick the one they score higher (regenerate and choose).
10% of the users are bad: a third always thumbs down, a third answers at random, a third inverts
their judgement (adversarial). Users visit in waves of WAVE concurrent clients, PAUSE_S
seconds apart, while `rlhfkit loop --source traffic:DB` runs in this process:

- rounds of DPO (sigmoid, beta 0.3, lr 1e-3, 120 steps of 16) on the pairs the rules make of
  the users' feedback (picks, and thumbs up against down on one prompt; a pick between two
  responses its user thumbed alike left out) from at least 3,000 pieces of feedback a round, the last 2 rounds' data (older ones at half weight, at most 1,000
  pairs), users judged and weighted;
- each candidate released as a canary (shares 0.2 then 0.5; it grows once shown at most 5
  points of thumbs-up rate worse than production, and the per-user thumbs-up rate decides,
  mSPRT alpha 0.05, mixture sd 0.3 standard deviations: about the per-user gain of a round
  relative to the spread between users in earlier runs); no simulated labelling beyond what the
  users do;
- once (round BAD_ROUND), a deliberately worse candidate is injected: trained by the same recipe
  on the round's pairs with chosen and rejected swapped. It must be rolled back before it gets
  more than its first canary share.

Keys: `gold_win_rate_by_round` (each promoted model against the SFT policy on held-out eval
prompts, the gold panel's win rate with a 95% bootstrap interval), `gold_win_rate_final` (the
model promoted at the end; target >= 0.65), `promotions`, `rollbacks`,
`bad_candidate_rolled_back`, `adversarial_users_flagged` (share of the bad users flagged in at
least one round; `honest_users_flagged` beside it), `labels_used` (records the rounds trained on).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.common import load_average, sft_policy, start_policy_server

USERS, WAVE, PROMPTS, MAX_TOKENS, NOISE = 2000, 50, 4, 24, 0.3
ROUNDS, BAD_ROUND = 4, 2
PAUSE_S = 1.0  # between waves
BAD = {"always_down": range(0, 67), "random": range(67, 134), "adversarial": range(134, 200)}  # ids 0..199: 10%


def _kind(u: int) -> str:
    return next((k for k, ids in BAD.items() if u in ids), "honest")


EXPERIMENT = """\
name: live
control: round-0
arms:
  round-0: {model: round-0, weight: 1}
  spare: {model: round-0, weight: 0}
decision: {metric: thumbs_up, alpha: 0.05, min_users: 20, mixture_sd: 0.3}
guardrails: {latency_ms: 10000}
"""


class Population:
    def __init__(self, seed: int = 0):
        from rlhfkit.judges import GoldPanel
        from rlhfkit.tasks import kindly

        self.panel, self.rng = GoldPanel(), np.random.default_rng(seed)
        self.prompts = kindly.prompts("train")
        self.visits = 0

    def verdict(self, u: int, score: float) -> bool:
        """Thumbs up?"""
        kind, noisy = _kind(u), score + self.rng.normal(0.0, NOISE)
        if kind == "always_down":
            return False
        if kind == "random":
            return bool(self.rng.random() < 0.5)
        return (noisy > 0) != (kind == "adversarial")

    async def visit(self, client: httpx.AsyncClient, url: str, u: int) -> None:
        rater = u % 10

        async def ask(prompt: str, seed: int) -> tuple[str, str]:
            body = {"model": "live", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 1.0,
                    "user": f"sim-{u}", "seed": seed}
            r = (await client.post(url + "/v1/completions", json=body)).json()
            return r["id"], r["choices"][0]["text"]

        for _ in range(PROMPTS):
            prompt = self.prompts[int(self.rng.integers(len(self.prompts)))]
            seed = int(self.rng.integers(1 << 30))
            (r1, t1), (r2, t2) = await asyncio.gather(ask(prompt, seed), ask(prompt, seed + 1))
            s1, s2 = self.panel.rater_scores([prompt, prompt], [t1, t2])[:, rater]
            up1, up2 = self.verdict(u, s1), self.verdict(u, s2)
            better_first = (s1 + self.rng.normal(0, NOISE) >= s2 + self.rng.normal(0, NOISE)) != (_kind(u) == "adversarial")
            if _kind(u) == "random":
                better_first = bool(self.rng.random() < 0.5)
            fb = [{"response_id": r1, "kind": "thumbs", "thumbs": "up" if up1 else "down"},
                  {"response_id": r2, "kind": "thumbs", "thumbs": "up" if up2 else "down"}]
            if _kind(u) != "always_down":  # they only ever thumb down
                fb.append({"response_id": r1, "kind": "pairwise", "other_response_id": r2,
                           "chosen": r1 if better_first else r2})
            for f in fb:
                (await client.post(url + "/v1/feedback", json=f)).raise_for_status()

    async def wave(self, url: str) -> None:
        users = self.rng.choice(USERS, WAVE, replace=False)
        async with httpx.AsyncClient(timeout=600) as client:
            await asyncio.gather(*(self.visit(client, url, int(u)) for u in users))
        self.visits += WAVE


def _start_server(exp: Path, db: str, registry: Path, port: int) -> subprocess.Popen:
    return start_policy_server(["--experiment", str(exp), "--db", db, "--registry", str(registry),
                                "--max_tokens", str(MAX_TOKENS)], port)


def _inject_bad_candidate(loop) -> dict:
    """Round BAD_ROUND's candidate learns the users' pairs backwards (chosen <-> rejected)."""
    real, seen = loop.train_policy, {}

    def train_policy(start, round_file, rm_path, cfg, out, seed, n_pairs, prompts=""):
        if out.parent.name != f"round-{BAD_ROUND}":
            return real(start, round_file, rm_path, cfg, out, seed, n_pairs, prompts)
        rows = [json.loads(x) for x in Path(round_file).read_text().splitlines()]
        swapped = Path(round_file).with_name("swapped_pairs.jsonl")
        swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                                   for r in rows))
        seen["round"] = BAD_ROUND
        return real(start, swapped, rm_path, cfg, out, seed, n_pairs, prompts)

    loop.train_policy = train_policy
    return seen


def run(quick: bool = False) -> dict:
    from rlhfkit.models.registry import Registry
    from rlhfkit.recipes import loop

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    sft = sft_policy()
    real_train = loop.train_policy
    injected = _inject_bad_candidate(loop)
    try:
        with tempfile.TemporaryDirectory(prefix="rlhfkit-online-") as tmp:
            return _run(Path(tmp), sft, quick, loop, Registry, injected)
    finally:
        loop.train_policy = real_train


def _run(tmp: Path, sft: Path, quick: bool, loop, Registry, injected: dict) -> dict:
    exp, db, out = tmp / "live.yaml", f"sqlite:///{tmp}/feedback.db", tmp / "loop"
    exp.write_text(EXPERIMENT)
    cfg = loop.Config(model=str(sft), rounds=ROUNDS, algorithm="dpo", dpo_loss="sigmoid", source=f"traffic:{db}",
                      traffic_min_feedback=600 if quick else 3000, traffic_poll=2.0, traffic_deadline=600,
                      traffic_window=2, traffic_decay=0.5, traffic_max_records=1000, traffic_experiment=str(exp),
                      canary_shares="0.2,0.5",
                      canary_users_per_step=30, canary_poll=5.0, canary_max_looks=12 if quick else 60,
                      policy_learning_rate=1e-3, dpo_beta=0.3, policy_steps=8 if quick else 120, reward_steps=10 if quick else 30,
                      batch_size=16, max_new_tokens=MAX_TOKENS, num_eval_prompts=32 if quick else 128, n_boot=200,
                      output_dir=str(out), seed=0)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(loop.main(cfg)), daemon=True)
    t0 = time.perf_counter()
    worker.start()
    while not (out / "registry" / "promoted.json").is_file():  # round-0 registered and promoted
        if not worker.is_alive():
            raise RuntimeError("the loop stopped before registering the starting model")
        time.sleep(0.5)
    port = _free_port()
    server = _start_server(exp, db, out / "registry", port)
    users = Population(seed=0)
    try:
        while worker.is_alive():
            asyncio.run(users.wave(f"http://127.0.0.1:{port}"))
            time.sleep(PAUSE_S)  # the server, the users and the training share two cores
    finally:
        server.terminate()
        server.wait(timeout=60)
    worker.join()
    if "rounds" not in result:
        raise RuntimeError("the loop failed; see its output above")
    return _summary(result, out, Registry(out / "registry"), users, injected, time.perf_counter() - t0, cfg)


def _summary(res: dict, out: Path, reg, users: Population, injected: dict, seconds: float, cfg) -> dict:
    rounds = res["rounds"]
    promoted = [r for r in rounds if r.get("promoted")]
    win = [{"round": r["round"], "id": r["id"], "win_rate": round(r["win_rate"], 4),
            "ci": [round(r["win_rate_lo"], 4), round(r["win_rate_hi"], 4)], "kl_to_sft": round(r["kl"], 2)}
           for r in promoted]
    final = next(r for r in rounds if r.get("id") == res["promoted"])
    bad = next((r for r in rounds if r["round"] == BAD_ROUND), None)
    bad_events = (bad or {}).get("canary") or []
    first_share = float(cfg.canary_shares.split(",")[0])
    bad_rolled_back = bool(bad and not bad["promoted"] and bad_events and bad_events[-1]["action"] == "rollback"
                           and all(e["action"] != "grow" for e in bad_events))
    flagged_ever: dict[str, set] = {}
    labels_used = 0
    for r in rounds[1:]:
        t = out / f"round-{r['round']}" / "traffic.json"
        if not t.is_file():
            continue
        report = json.loads(t.read_text())
        labels_used += sum(v.get("kept", 0) for v in report["kept"]["train"].values())
        for key, row in report["per_user"].items():
            if row["flags"]:
                flagged_ever.setdefault(key, set()).update(row["flags"])
    # user keys are hashes of the experiment's salt and the user id (the server's rule)
    from rlhfkit.serving.experiments import load_experiment

    exp = load_experiment(cfg.traffic_experiment)
    bad_keys = {exp.user_key(f"sim-{u}") for ids in BAD.values() for u in ids}
    honest_keys = {exp.user_key(f"sim-{u}") for u in range(USERS)} - bad_keys
    canary_events = [e for r in rounds for e in (r.get("canary") or [])]
    return {
        "gold_win_rate_by_round": win,
        "gold_win_rate_final": round(final["win_rate"], 4),
        "gold_win_rate_final_ci": [round(final.get("win_rate_lo", final["win_rate"]), 4),
                                   round(final.get("win_rate_hi", final["win_rate"]), 4)],
        "final_model": res["promoted"],
        "promotions": sum(bool(r.get("promoted")) for r in rounds[1:]),
        "rollbacks": sum(e["action"] == "rollback" for e in canary_events),
        "bad_candidate_injected_round": injected.get("round"),
        "bad_candidate_rolled_back": bad_rolled_back,
        "bad_candidate_canary": bad_events,
        "bad_candidate_first_share": first_share,
        "adversarial_users_flagged": round(len(bad_keys & set(flagged_ever)) / len(bad_keys), 4),
        "honest_users_flagged": round(len(honest_keys & set(flagged_ever)) / len(honest_keys), 4),
        "labels_used": labels_used,
        "feedback_per_round": [r.get("feedback") for r in rounds[1:]],
        "rounds": [{**{k: r.get(k) for k in ("round", "id", "win_rate", "promoted", "feedback", "offered", "kept",
                                             "flagged_users", "kl", "seconds", "canary")},
                    **_eval_extras(out / f"round-{r['round']}" / "eval" / "results.json")} for r in rounds],
        "lineage": _lineage(reg, res["promoted"]),
        "user_visits": users.visits,
        "minutes": round(seconds / 60, 2),
        "load_average_at_end": load_average(),
        "targets": {"gold_win_rate_final": ">= 0.65", "bad_candidate_rolled_back": "true", "minutes": "<= 20"},
        "settings": {"users": USERS, "bad_users": sum(len(ids) for ids in BAD.values()), "wave": WAVE,
                     "prompts_per_visit": PROMPTS, "noise_sd": NOISE, "pause_between_waves_s": PAUSE_S,
                     **{k: getattr(cfg, k) for k in ("algorithm", "dpo_loss", "dpo_beta", "policy_learning_rate",
                                                      "policy_steps", "batch_size", "traffic_min_feedback",
                                                      "traffic_window", "traffic_decay", "traffic_max_records", "alike_picks",
                                                      "canary_shares", "canary_users_per_step", "canary_max_drop", "canary_poll",
                                                      "canary_max_looks", "num_eval_prompts")}},
        "note": "2-core machine shared with other jobs; server, users and training share the two cores",
    }


def _eval_extras(path: Path) -> dict:
    """What else a round's evaluation says about how the policy moved: the length-controlled win
    rate, the response length against the SFT policy's, the share ending before the token limit,
    and diversity."""
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    lc = m.get("lc_win_rate") or {}
    return {"lc_win_rate": lc.get("mean"), "lc_win_rate_ci": [lc.get("lo"), lc.get("hi")],
            "mean_length_words": m.get("mean_length"), "mean_length_words_sft": m.get("mean_length_reference"),
            "ended_with_eos": m.get("ended_with_eos"), "distinct_2": m.get("distinct_2"), "self_bleu": m.get("self_bleu")}


def _lineage(reg, model_id: str) -> list[dict]:
    out = []
    while model_id:
        e = reg.get(model_id)
        out.append({"id": e["id"], "round": e.get("round"), "parent": e.get("parent"),
                    "training_data": e.get("training_data")})
        model_id = e.get("parent")
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

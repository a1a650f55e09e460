"""An A/B experiment on the live policy server with simulated users (issue 24, item 7).

Arms: the bundled task's SFT policy (`sft`, the control) and the PPO policy trained from it
against the learned reward model (`ppo`: benchmarks/ppo_quality.py's PPO, seed 0, cached).
`rlhfkit serve-policy --experiment` serves both (one worker, a subprocess) and logs every
request to a SQLite feedback database.

Simulated users: user u is rater u % 10 of the task's gold panel (each rater is VADER with one
human rater's own valences, rlhfkit.judges.panel). A user sends PROMPTS_PER_USER held-out task
prompts over HTTP (/v1/completions, temperature 1, `user` set, so the server assigns the arm),
thumbs each response up when their own gold score of it plus Gaussian noise (sd NOISE) is above
0, and for their first prompt asks for two responses (n = 2) and picks the one they score higher
(with noise): regenerate and choose. All feedback goes through POST /v1/feedback.

1. Live: users arrive in waves of WAVE (concurrent clients); after every wave the A/B analysis
   (rlhfkit.serving.ab.analyse, decision metric thumbs_up, alpha 0.05) is read, and the run stops
   at the first decision or at MAX_USERS. `detects_better`: the decision is to promote ppo.
2. Simulated from the served responses: every response logged in the live run and in a pool
   of POOL prompts per arm (one response each, same server) is scored by all ten raters. Users
   are then redrawn (rater, response of their arm, noise) for many experiments without HTTP:
   `aa_false_positive_rate` over AA_EXPERIMENTS A/A experiments (both arms draw SFT responses)
   of SIM_USERS users, looking after every 50 users; `users_to_decision` the median users at the
   decision over AB_EXPERIMENTS SFT-vs-PPO experiments (and `detects_better_rate`, their share
   that promote ppo).
3. `decision_matches_gold`: the promoted arm is the one the gold panel prefers (higher mean
   panel score over the arms' pool responses); a live run that promotes nothing does not match.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import sft_policy, start_policy_server

WAVE, MAX_USERS, PROMPTS_PER_USER, MAX_TOKENS = 50, 1500, 2, 24
NOISE, POOL, SIM_USERS, AA_EXPERIMENTS, AB_EXPERIMENTS = 0.3, 256, 2000, 400, 200
N_RATERS = 10


def ppo_policy(quick: bool) -> Path:
    from benchmarks import ppo_quality

    policy = sft_policy()
    rm = ppo_quality.reward_model(policy, quick)
    ppo_quality.train("ppo", policy, rm, quick)
    return ppo_quality.OUT / ("quick" if quick else "full") / "ppo-seed0" / "final"


def _start_server(exp: Path, db: str, port: int) -> subprocess.Popen:
    return start_policy_server(["--experiment", str(exp), "--db", db, "--max_tokens", str(MAX_TOKENS)], port)


class Users:
    """Simulated users: rater u % 10 of the gold panel, with noise."""

    def __init__(self, seed: int = 0):
        from rlhfkit.judges import GoldPanel

        self.panel, self.rng = GoldPanel(), np.random.default_rng(seed)

    def scores(self, prompt: str, texts: list[str]) -> np.ndarray:
        """(len(texts), 10): every rater's gold score of each response."""
        return self.panel.rater_scores([prompt] * len(texts), texts)

    def noisy(self, score: float) -> float:
        return float(score + self.rng.normal(0.0, NOISE))


async def _user(client: httpx.AsyncClient, url: str, u: int, prompts: list[str], users: Users) -> None:
    rater = u % N_RATERS

    async def ask(prompt: str, seed: int) -> tuple[str, str]:
        body = {"model": "kindly-ab", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 1.0,
                "user": f"sim-{u}", "seed": seed}
        r = (await client.post(url + "/v1/completions", json=body)).json()
        return r["id"], r["choices"][0]["text"]

    for k, prompt in enumerate(prompts):
        rid, text = await ask(prompt, u * 31 + k)
        score = users.scores(prompt, [text])[0, rater]
        fb = [{"response_id": rid, "kind": "thumbs", "thumbs": "up" if users.noisy(score) > 0 else "down"},
              {"response_id": rid, "kind": "rating", "rating": int(np.clip(round(3 + 2 * users.noisy(score)), 1, 5))}]
        if k == 0:  # regenerate and choose: a second response to the same prompt, the better one picked
            rid2, text2 = await ask(prompt, u * 31 + 1000)
            score2 = users.scores(prompt, [text2])[0, rater]
            fb.append({"response_id": rid, "kind": "pairwise", "other_response_id": rid2,
                       "chosen": rid if users.noisy(score) >= users.noisy(score2) else rid2})
        for f in fb:
            (await client.post(url + "/v1/feedback", json=f)).raise_for_status()


async def _wave(url: str, first: int, prompts: list[str], users: Users) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(_user(client, url, u, [prompts[(u * PROMPTS_PER_USER + j) % len(prompts)]
                                                      for j in range(PROMPTS_PER_USER)], users)
                               for u in range(first, first + WAVE)))


def _wait_logged(db, n: int) -> None:
    from sqlalchemy import func, select

    from rlhfkit.serving.tables import ServedResponse

    deadline = time.time() + 60
    while time.time() < deadline:
        with db.read_session() as s:
            if s.scalar(select(func.count()).select_from(ServedResponse)) >= n:
                return
        time.sleep(0.2)


def live_run(url: str, exp, db, prompts: list[str], users: Users, max_users: int) -> dict:
    from rlhfkit.serving import ab

    report, n = None, 0
    while n < max_users:
        asyncio.run(_wave(url, n, prompts, users))
        n += WAVE
        _wait_logged(db, n * (PROMPTS_PER_USER + 1))
        report = ab.analyse(exp, db)
        if report["decision"] != "keep running":
            break
    comp = report["comparisons"]["ppo"]
    return {"decision": report["decision"], "arm": report["arm"], "users": n, "first_rejection": comp["first_rejection"],
            "thumbs_up": {a: report["arms"][a]["thumbs_up"] for a in report["arms"]},
            "effect": [comp["estimate"], comp["low"], comp["high"]], "p_value": comp["p_value"],
            "reasons": report["reasons"]}


async def _pool(url: str, arm: str, prompts: list[str]) -> list[tuple[str, str]]:
    async with httpx.AsyncClient(timeout=600) as client:
        sem = asyncio.Semaphore(32)

        async def one(i: int, p: str) -> tuple[str, str]:
            async with sem:
                r = await client.post(url + "/v1/completions", json={"model": arm, "prompt": p, "max_tokens": MAX_TOKENS,
                                                                     "temperature": 1.0, "seed": 10_000 + i})
                return p, r.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def simulate(pools: dict[str, np.ndarray], arms: tuple[str, str], experiments: int, seed: int) -> list[int | None]:
    """Users at the first rejection of each simulated experiment (None: none within SIM_USERS),
    users redrawn from the pools of rater scores; a look after every 50 users."""
    from rlhfkit.serving.abstats import sequential_test

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(experiments):
        g = rng.integers(0, 2, SIM_USERS)
        rater = rng.integers(0, N_RATERS, SIM_USERS)
        values = np.empty(SIM_USERS)
        for grp, arm in enumerate(arms):
            sel = np.nonzero(g == grp)[0]
            pool = pools[arm]
            picks = rng.integers(0, len(pool), (sel.size, PROMPTS_PER_USER))
            scores = pool[picks, rater[sel][:, None]]
            values[sel] = (scores + rng.normal(0, NOISE, scores.shape) > 0).mean(axis=1)
        out.append(sequential_test(values, g, alpha=0.05, mixture_sd=0.2, every=50).first_rejection)
    return out


EXPERIMENT = """\
name: kindly-ab
control: sft
arms:
  sft: {{model: {sft}, weight: 0.5}}
  ppo: {{model: {ppo}, weight: 0.5}}
decision: {{metric: thumbs_up, alpha: 0.05, min_users: 50, max_users: {max_users}}}
guardrails: {{latency_ms: 2000}}
"""


def run(quick: bool = False) -> dict:
    from rlhfkit.feedback.db import Database
    from rlhfkit.serving.experiments import load_experiment
    from rlhfkit.tasks import kindly

    sft, ppo = sft_policy(), ppo_policy(quick)
    prompts = kindly.prompts("eval")
    max_users = 200 if quick else MAX_USERS
    users = Users(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        exp_path = Path(tmp) / "ab.yaml"
        exp_path.write_text(EXPERIMENT.format(sft=sft, ppo=ppo, max_users=max_users))
        url_db = f"sqlite:///{tmp}/feedback.db"
        port = int(os.environ.get("AB_TEST_PORT", "0")) or _free_port()
        proc = _start_server(exp_path, url_db, port)
        url = f"http://127.0.0.1:{port}"
        db = Database(url_db, pool_size=2)
        try:
            t0 = time.perf_counter()
            live = live_run(url, load_experiment(exp_path), db, prompts, users, max_users)
            live["minutes"] = round((time.perf_counter() - t0) / 60, 2)
            pool_prompts = prompts[:64 if quick else POOL]
            pools_text = {arm: asyncio.run(_pool(url, arm, pool_prompts)) for arm in ("sft", "ppo")}
        finally:
            db.dispose()
            proc.terminate()
            proc.wait(timeout=60)
    pools = {arm: np.concatenate([users.scores(p, [t]) for p, t in pairs]) for arm, pairs in pools_text.items()}
    gold = {arm: float(pools[arm].mean()) for arm in pools}
    aa = simulate(pools, ("sft", "sft"), 50 if quick else AA_EXPERIMENTS, seed=1)
    ab_runs = simulate(pools, ("sft", "ppo"), 20 if quick else AB_EXPERIMENTS, seed=2)
    decided = [n for n in ab_runs if n is not None]
    kept = {"promote": live["arm"], "roll back": "sft"}.get(live["decision"])
    preferred = max(gold, key=gold.get)
    return {
        "aa_false_positive_rate": float(np.mean([n is not None for n in aa])),
        "detects_better": bool(live["decision"] == "promote" and live["arm"] == "ppo"),
        "users_to_decision": float(np.median(decided)) if decided else None,
        "decision_matches_gold": bool(kept == preferred),
        "detects_better_rate": float(np.mean([n is not None for n in ab_runs])),
        "live": live, "gold_panel_mean": gold, "gold_prefers": preferred,
        "aa_experiments": len(aa), "ab_experiments": len(ab_runs), "simulated_users_per_experiment": SIM_USERS,
        "look_every_users": 50, "noise_sd": NOISE, "pool_responses_per_arm": len(pool_prompts),
        "targets": {"aa_false_positive_rate": "<= 0.05", "detects_better": "true", "decision_matches_gold": "true"},
        "policies": {"sft": str(sft), "ppo": str(ppo)},
        "note": "2-core machine shared with other jobs; the live run's minutes are wall-clock under that load",
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

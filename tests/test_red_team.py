"""rlhfkit red-team: novelty and few-shot arithmetic by hand, the harm judge, targets (a folder, the
registry, an OpenAI-compatible endpoint) and a whole run with all three attack writers."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rl_helpers import save_tiny, tiny_policy, tiny_tokenizer
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.eval.attacks import (
    HarmScorer,
    load_target,
    read_attacks,
    resolve_model,
    run_attacks,
    success_rate,
)
from rlhfkit.models.registry import Registry
from rlhfkit.recipes import red_team
from rlhfkit.train.runs import read_metrics

UNKIND = "you are horrible and cruel"
KIND = "you are lovely and kind"


def _reply(model: str, prompt: str) -> str:
    """'old' answers every attack unkindly; 'new' only attacks of an even length."""
    return UNKIND if model == "old" or len(prompt) % 2 == 0 else KIND


class _Handler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        if self.path.endswith("/chat/completions"):
            text = _reply(body["model"], body["messages"][-1]["content"])
            choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "finish_reason": "stop", "text": _reply(body["model"], body["prompt"]), "logprobs": None}
            obj = "text_completion"
        data = json.dumps({"id": "x", "object": obj, "created": 0, "model": body["model"], "choices": [choice],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("red")
    tok = tiny_tokenizer()
    return save_tiny(root / "policy", tiny_policy(tok), tok)


def test_ngram_novelty_by_hand():
    seen = [{("a",), ("b",), ("c",)}, {("a", "b"), ("b", "c")}, {("a", "b", "c")}]
    # 1-grams a b d: 2 of 3 seen; 2-grams (a b) (b d): 1 of 2; 3-gram (a b d): 0 of 1
    assert red_team.ngram_novelty("a b d", seen) == pytest.approx(1 - (2 / 3 + 1 / 2 + 0) / 3, rel=1e-12)
    assert red_team.ngram_novelty("a", seen) == 0.0  # its only order, 1-grams, all seen
    assert red_team.ngram_novelty("", seen) == 0.0
    bonus = red_team.NoveltyBonus()
    # the second "x y" is seen already within the same batch; "x z": 1/2 of 1-grams, 0/1 2-grams
    assert bonus(None, ["x y", "x y.", "x z"]) == pytest.approx([1.0, 0.0, 1 - (1 / 2 + 0) / 2])


def test_clean_attack_and_few_shot_prompts():
    assert red_team.clean_attack("  the  old man. said more") == "the old man"
    assert red_team.clean_attack("! nothing") == ""
    cfg = red_team.Config(num_attacks=3, shots=1, shot_temperature=1e-3, methods=["few_shot"])
    pool = [{"prompt": "mild one", "harm": 0.1, "worked": True}, {"prompt": "worst one", "harm": 0.9, "worked": True},
            {"prompt": "failed", "harm": 2.0, "worked": False}]
    # at T = 0.001 the most harmful success is shown every time; a failure never while one worked
    assert red_team.few_shot_prompts(pool, cfg, np.random.default_rng(0)) == ["A sentence . worst one ."] * 3
    # no success yet: the most harmful attacks so far are shown instead
    pool = [{"prompt": "p", "harm": 0.3, "worked": False}, {"prompt": "q", "harm": -0.2, "worked": False}]
    assert red_team.few_shot_prompts(pool, cfg, np.random.default_rng(0))[0] == "A sentence . p ."
    assert red_team.few_shot_prompts([], cfg, np.random.default_rng(0)) == []


def test_unkind_harm_reads_the_response_alone():
    scorer = HarmScorer("unkind")
    scores = scorer.scores(["you are kind", "you are cruel", "x"], [UNKIND, KIND, ""])
    assert scores[0] < -0.05 < 0 < scores[1] and scores[2] == 0.0  # empty: no sentiment, not harmful
    assert scorer.worked(scores).tolist() == [True, False, False]
    assert scorer.worked(np.array([np.nan])).tolist() == [False]  # an abstention is no success
    rate = success_rate([{"worked": True}, {"worked": False}, {"worked": False}, {"worked": True}])
    assert rate["mean"] == 0.5 and rate["n"] == 4 and rate["lo"] <= 0.5 <= rate["hi"]


def test_targets_endpoint_registry_and_errors(server, tiny, tmp_path):
    target = load_target(f"http:new?base_url={server}&concurrency=2")
    rows = run_attacks(target, HarmScorer("unkind"), ["ab", "abc"])
    assert [r["response"] for r in rows] == [UNKIND, KIND] and [r["worked"] for r in rows] == [True, False]
    assert rows[0]["harm"] == -rows[0]["score"] > 0
    chat = load_target(f"http:old?base_url={server}&chat=true")
    assert chat.respond(["abc"]) == [UNKIND] and _Handler.seen[-1][0].endswith("/chat/completions")
    with pytest.raises(ConfigError, match="unknown option"):
        load_target(f"http:new?base_url={server}&colour=red")
    with pytest.raises(ConfigError, match="base_url"):
        load_target("http:new")
    reg = Registry(tmp_path / "reg")
    reg.register(tiny, "m1")
    reg.promote("m1")
    assert resolve_model("production", str(tmp_path / "reg")) == tiny == resolve_model("m1", str(tmp_path / "reg"))
    local = load_target(tiny, max_new_tokens=3)
    assert len(local.respond(["the cat", "a kind word"])) == 2
    (tmp_path / "a.txt").write_text("first attack\nsecond attack\n")
    assert read_attacks(str(tmp_path / "a.txt")) == ["first attack", "second attack"]


def test_red_team_run_all_methods_and_held_out(server, tiny, tmp_path):
    out = tmp_path / "red"
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["ab", "abc", "abcd", "abcde"]))
    cfg = red_team.Config(target=f"http:new?base_url={server}", red_model=tiny, seed_instruction="the cat",
                          num_attacks=6, max_attack_tokens=4, rl_steps=2, rl_prompts_per_step=2, rl_num_generations=3,
                          eval_attacks=[str(held)], baseline_target=f"http:old?base_url={server}", output_dir=str(out))
    summary = red_team.main(cfg)
    rows = [json.loads(x) for x in (out / "attacks.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"zero_shot", "few_shot", "rl"}
    for r in rows:  # the endpoint's rule, judged by the panel
        assert r["response"] == _reply("new", r["prompt"]) and r["worked"] == (r["response"] == UNKIND)
    won = [json.loads(x) for x in (out / "successful_attacks.jsonl").read_text().splitlines()]
    assert len({w["prompt"] for w in won}) == len(won) == len({r["prompt"] for r in rows if r["worked"]})
    assert [w["harm"] for w in won] == sorted((w["harm"] for w in won), reverse=True)
    assert summary["all"]["asr"]["mean"] == pytest.approx(np.mean([r["worked"] for r in rows]))
    assert set(summary["methods"]) == {"zero_shot", "few_shot", "rl"}
    # held-out: 'old' fails on every attack, 'new' on the two of even length
    assert summary["held_out"]["asr_before"]["mean"] == 1.0 and summary["held_out"]["asr_after"]["mean"] == 0.5
    assert summary["fresh"]["asr_before"]["mean"] == 1.0
    # the rl red model trained two GRPO updates on harm + novelty, each logged on its own
    metrics = read_metrics(out / "red_policy")
    assert [m["step"] for m in metrics] == [1, 2] and "rewards/harm/mean" in metrics[0]
    assert "rewards/novelty/mean" in metrics[0]
    assert (out / "red_policy" / "final" / "model.safetensors").is_file()
    assert summary["rl_training"]["attacks"] > 0
    assert json.loads((out / "red_team.json").read_text())["all"] == summary["all"]


def test_config_errors():
    with pytest.raises(ConfigError, match="methods"):
        red_team.Config(methods=["zero_shot", "telepathy"])
    with pytest.raises(ConfigError, match="seed_instruction"):
        red_team.Config(seed_instruction="  ")


def test_loop_adds_attack_prompts_to_every_round(tmp_path, capsys):
    from rlhfkit.models import load_tokenizer, save_model
    from rlhfkit.models.factory import tiny_llama
    from rlhfkit.recipes import loop

    tok = load_tokenizer("kindly:tokenizer")
    save_model(tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, tokenizer=tok,
                          seed=0), tok, tmp_path / "sft")
    attacks = ["the angry man said", "you are a"]
    (tmp_path / "won.jsonl").write_text("".join(json.dumps({"prompt": a, "harm": 0.5}) + "\n" for a in attacks))
    cfg = loop.Config(model=str(tmp_path / "sft"), rounds=1, prompts_per_round=4, max_new_tokens=4, reward_steps=1,
                      policy_steps=1, batch_size=4, num_eval_prompts=4, n_boot=10, attack_prompts=str(tmp_path / "won.jsonl"),
                      output_dir=str(tmp_path / "loop"))
    loop.main(cfg)
    # the round's 4 task prompts and the 2 attacks: every one a pair, kept or skipped (ties, ...)
    counts = re.search(r"round 1: (\d+) labelled pairs \((\d+) ties, (\d+) identical and (\d+) empty",
                       capsys.readouterr().out).groups()
    assert sum(map(int, counts)) == 6
    pairs = [json.loads(x) for x in (tmp_path / "loop" / "round-1" / "preferences.jsonl").read_text().splitlines()]
    assert {p["prompt"] for p in pairs} & set(attacks) or int(counts[1]) + int(counts[2]) + int(counts[3]) >= 2
    with pytest.raises(DataError, match="none.jsonl"):  # before round 0 is evaluated
        loop.main(loop.Config(model=str(tmp_path / "sft"), attack_prompts=str(tmp_path / "none.jsonl"),
                              output_dir=str(tmp_path / "loop2")))

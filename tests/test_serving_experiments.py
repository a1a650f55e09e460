"""Experiments: the file format and its errors, and the stable assignment of users to arms."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from scipy import stats

from rlhfkit.errors import ConfigError
from rlhfkit.serving.experiments import (
    Arm,
    Experiment,
    bucket,
    cookie_name,
    identify,
    load_experiment,
)

GOOD = """\
name: kindly-ab
control: sft
arms:
  sft: {model: sft-r0, weight: 0.2}
  ppo: {model: ppo-r1, weight: 0.3}
  dpo: {model: dpo-r1, weight: 0.5}
decision:
  metric: rating
  alpha: 0.01
  min_users: 20
guardrails:
  safety_flag_rate: 0.01
  latency_ms: 300
retention_days: 30
"""


def write(tmp_path, text: str):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_the_file_loads_with_every_field(tmp_path):
    exp = load_experiment(write(tmp_path, GOOD))
    assert exp.name == "kindly-ab" and exp.control == "sft" and exp.salt == "kindly-ab"
    assert exp.arms == (Arm("sft", "sft-r0", 0.2), Arm("ppo", "ppo-r1", 0.3), Arm("dpo", "dpo-r1", 0.5))
    assert exp.decision.metric == "rating" and exp.decision.alpha == 0.01 and exp.decision.min_users == 20
    assert dict(exp.guardrails) == {"safety_flag_rate": 0.01, "latency_ms": 300.0}
    assert exp.retention_days == 30.0
    assert [a.name for a in exp.candidates] == ["ppo", "dpo"]


@pytest.mark.parametrize("edit, message", [
    (("weight: 0.3", "weight: -1"), "line 5: field 'arms.ppo.weight': must be a number in [0.0, inf], got -1"),
    (("control: sft", "control: base"), "line 2: field 'control': 'base' is not one of the arms"),
    (("metric: rating", "metric: vibes"), "line 8: field 'decision.metric': 'vibes': choose one of"),
    (("latency_ms: 300", "latency: 300"), "line 13: field 'guardrails.latency': unknown metric"),
    (("retention_days: 30", "retention: 30"), "line 14: field 'retention': unknown field"),
    (("alpha: 0.01", "alpha: 0.9"), "line 9: field 'decision.alpha': must be a number in [1e-06, 0.5]"),
    (("name: kindly-ab", "name: 'no spaces please'"), "line 1: field 'name': must be a name"),
])
def test_a_bad_field_is_named_with_its_line(tmp_path, edit, message):
    with pytest.raises(ConfigError) as e:
        load_experiment(write(tmp_path, GOOD.replace(*edit)))
    assert str(e.value).startswith(str(tmp_path / "exp.yaml") + ", " + message[: message.index(":")]), str(e.value)
    assert message in str(e.value)


def test_one_arm_or_zero_weights_or_bad_yaml_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="field 'arms': must map at least two"):
        load_experiment(write(tmp_path, "name: x\narms:\n  a: {model: m}\n"))
    with pytest.raises(ConfigError, match="weights add up to 0"):
        load_experiment(write(tmp_path, "name: x\narms:\n  a: {model: m, weight: 0}\n  b: {model: n, weight: 0}\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(write(tmp_path, "name: [x\n"))
    with pytest.raises(ConfigError, match="'header:X User' is not 'user'"):
        load_experiment(write(tmp_path, "name: x\nassign_by: ['header:X User']\narms: {a: m, b: n}\n"))


def test_identifier_precedence_and_cookie_name():
    order = ("user", "header:X-User-Id", "cookie:uid")
    assert identify(order, user="u1", headers={"x-user-id": "h"}, cookies={"uid": "c"}) == ("user", "u1")
    assert identify(order, user=" ", headers={"X-USER-ID": "h"}, cookies={"uid": "c"}) == ("header:X-User-Id", "h")
    assert identify(order, cookies={"uid": "c"}) == ("cookie:uid", "c")
    assert identify(order) is None
    assert cookie_name(order) == "uid" and cookie_name(("user",)) is None


EXP = Experiment(name="e", arms=(Arm("a", "ma", 0.2), Arm("b", "mb", 0.3), Arm("c", "mc", 0.5)), control="a", salt="s1")


def test_assignment_is_the_same_in_another_process():
    users = [f"user-{i}" for i in range(200)]
    here = [EXP.assign(u).name for u in users]
    code = textwrap.dedent("""
        import json
        from rlhfkit.serving.experiments import Arm, Experiment
        exp = Experiment(name="e", arms=(Arm("a", "ma", 0.2), Arm("b", "mb", 0.3), Arm("c", "mc", 0.5)),
                         control="a", salt="s1")
        print(json.dumps([exp.assign(f"user-{i}").name for i in range(200)]))
    """)
    # a different PYTHONHASHSEED: Python's own hash() would give different arms here
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout) == here
    assert len(set(here)) == 3


def test_shares_match_the_weights_within_a_binomial_bound():
    """With an ideal hash each arm's count is Binomial(n, weight). The hash is deterministic, so
    this test either always passes or always fails; the bound is set so that an ideal uniform
    hash would fail it with probability below 1e-6 per arm (and a weight off by 1% fails it)."""
    n = 80_000
    counts = {"a": 0, "b": 0, "c": 0}
    for i in range(n):
        counts[EXP.assign(f"visitor:{i}").name] += 1
    for arm in EXP.arms:
        lo, hi = stats.binom.interval(1 - 1e-6, n, arm.weight)
        assert lo <= counts[arm.name] <= hi, (arm, counts)
        # the bound is tight enough to matter: a 1 percentage-point error would fall outside it
        assert hi - lo < 2 * 0.01 * n
    assert abs(bucket("s1", "x") - bucket("s1", "x")) == 0 and bucket("s1", "x") != bucket("s2", "x")


def test_a_user_keeps_their_arm_and_a_paused_arm_sends_its_users_to_the_control():
    first = {u: EXP.assign(u).name for u in map(str, range(300))}
    assert all(EXP.assign(u).name == arm for u, arm in first.items())
    paused = {u: EXP.assign(u, paused=("c",)).name for u in first}
    assert all(paused[u] == ("a" if arm == "c" else arm) for u, arm in first.items())


def test_user_key_is_stable_and_not_the_identifier():
    k = EXP.user_key("alice@example.com")
    assert k == EXP.user_key("alice@example.com") and len(k) == 32
    assert "alice" not in k and k != EXP.user_key("bob@example.com")


def test_the_monitor_section(tmp_path):
    exp = load_experiment(write(tmp_path, GOOD + "monitor: {spec: gold, threshold: -0.5, pause: true}\n"))
    assert (exp.monitor.spec, exp.monitor.threshold, exp.monitor.pause, exp.monitor.block) == ("gold", -0.5, True, False)
    assert load_experiment(write(tmp_path, GOOD + "monitor: judge:lexicon\n")).monitor.spec == "judge:lexicon"
    with pytest.raises(ConfigError, match="line 17: field 'monitor.pause': must be true or false"):
        load_experiment(write(tmp_path, GOOD + "monitor:\n  spec: gold\n  pause: sometimes\n"))
    with pytest.raises(ConfigError, match="field 'monitor.alarm': unknown field"):
        load_experiment(write(tmp_path, GOOD + "monitor: {spec: gold, alarm: 0.1}\n"))

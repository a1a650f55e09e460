"""Experiments on live traffic: arms (model versions) with weights, and a stable assignment of
users to arms.

An experiment file (YAML)::

    name: kindly-ppo-vs-sft          # required; logged with every request
    control: sft                     # the arm now in production (default: the first arm)
    salt: kindly-ppo-2026-12         # hash salt (default: the name); a new salt reshuffles users
    assign_by: [user, "header:X-User-Id", "cookie:rlhfkit_uid"]   # first one present wins
    arms:
      sft: {model: sft-r0, weight: 0.5}        # model: registry id, alias or model folder
      ppo: {model: ppo-r1, weight: 0.5}
    decision:
      metric: thumbs_up              # thumbs_up | rating | win_rate | edit_rate (what decides)
      alpha: 0.05                    # error rate of the sequential test, over all looks
      mixture_sd: 0.2                # spread of the effect-size prior, in standard deviations
      min_users: 50                  # per arm, before any decision
      max_users: 20000               # in all; reached without a decision: keep the control
    guardrails:                      # how much worse a candidate may be, in the metric's units
      safety_flag_rate: 0.01
      latency_ms: 500
    registry: runs/registry          # where `rlhfkit ab promote` moves the promoted model
    retention_days: 90               # served traffic older than this is deleted
    monitor:                         # safety monitor (rlhfkit.serving.monitor); optional
      spec: gold                     # any reward / judge spec: gold, rm:PATH, judge:lexicon, judge:http:...
      threshold: -0.5                # a response scoring below this is flagged
      alarm_rate: 0.05               # alarm when an arm's flagged share is surely above this
      pause: true                    # ... and pause the arm (its users see the control)
      block: false                   # replace a flagged response with a refusal before it is sent

A user is put in a bucket by SHA-256 of ``salt`` and the user's id (not Python's ``hash``, which
is salted per process), so the same user gets the same arm in every worker process and after
restarts; buckets are cut in proportion to the weights. A paused arm's users see the control.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.errors import ConfigError

DEFAULT_ASSIGN_BY = ("user", "header:x-user-id", "cookie:rlhfkit_uid")
DEFAULT_COOKIE = "rlhfkit_uid"
# metric -> True when a higher value is better (the decision metric and guardrails both use it)
METRICS = {"thumbs_up": True, "rating": True, "win_rate": True, "edit_rate": False,
           "safety_flag_rate": False, "latency_ms": False, "error_rate": False, "completion_tokens": False}
DECISION_METRICS = ("thumbs_up", "rating", "win_rate", "edit_rate")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    model: str
    weight: float


@dataclasses.dataclass(frozen=True)
class Decision:
    """Settings of the sequential test that decides the experiment (see rlhfkit.serving.abstats)."""

    metric: str = "thumbs_up"
    alpha: float = 0.05
    mixture_sd: float = 0.2
    min_users: int = 50
    max_users: int | None = None


@dataclasses.dataclass(frozen=True)
class Monitor:
    """Safety monitoring of served responses (see rlhfkit.serving.monitor)."""

    spec: str
    threshold: float = 0.0
    alarm_rate: float = 0.05
    min_scored: int = 30
    window: int = 1000
    pause: bool = False
    block: bool = False
    refusal: str = "I'm sorry, I can't help with that."


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Arm, ...]
    control: str
    salt: str
    assign_by: tuple[str, ...] = DEFAULT_ASSIGN_BY
    decision: Decision = Decision()
    guardrails: Mapping[str, float] = dataclasses.field(default_factory=dict)
    registry: str = "runs/registry"
    retention_days: float | None = None
    monitor: Monitor | None = None
    source: str = "<experiment>"

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"experiment {self.name!r} has no arm {name!r} (arms: {', '.join(self.arm_names)})")

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.arms]

    @property
    def candidates(self) -> list[Arm]:
        return [a for a in self.arms if a.name != self.control]

    def assign(self, unit: str, paused: Sequence[str] = ()) -> Arm:
        """The arm of user `unit`: the same in every process; a paused arm's users see the control."""
        arm = arm_for_bucket(self.arms, bucket(self.salt, unit))
        return self.arm(self.control) if arm.name in paused else arm

    def user_key(self, unit: str) -> str:
        """What the traffic log stores instead of the user's id: stable, not the id itself."""
        return hashlib.sha256(f"user\0{self.salt}\0{unit}".encode()).hexdigest()[:32]


def bucket(salt: str, unit: str) -> float:
    """A number in [0, 1) that depends only on `salt` and `unit` (first 64 bits of SHA-256)."""
    digest = hashlib.sha256(f"{salt}\0{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def arm_for_bucket(arms: Sequence[Arm], u: float) -> Arm:
    total = sum(a.weight for a in arms)
    edge = 0.0
    for a in arms:
        edge += a.weight / total
        if u < edge:
            return a
    return arms[-1]  # u within rounding of 1.0


def identify(assign_by: Sequence[str], user: str | None = None, headers: Mapping[str, str] | None = None,
             cookies: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The first identifier present, as (source, value): 'user' (the request's `user` field),
    'header:NAME' or 'cookie:NAME'. None when the request carries none of them."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    for source in assign_by:
        if source == "user":
            value = user
        elif source.startswith("header:"):
            value = headers.get(source[7:].lower())
        else:
            value = (cookies or {}).get(source[7:])
        if value and str(value).strip():
            return source, str(value).strip()
    return None


def cookie_name(assign_by: Sequence[str]) -> str | None:
    """The cookie a server should set for a new visitor (the first cookie source), if any."""
    return next((s[7:] for s in assign_by if s.startswith("cookie:")), None)


def new_unit_id() -> str:
    return secrets.token_hex(16)


# ---------------------------------------------------------------------------------------------
# the experiment file


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment file; errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    return parse_experiment(raw, source=str(path), root=root)


def _line(root: Any, dotted: str) -> str:
    """', line N' of the YAML node at `dotted` (or its closest existing parent)."""
    node, line = root, None
    for key in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == key), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return f", line {line}" if line else ""


class _Checker:
    def __init__(self, source: str, root: Any):
        self.source, self.root = source, root

    def fail(self, field: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}{_line(self.root, field)}: field '{field}': {message}")

    def number(self, value: Any, field: str, low: float, high: float = math.inf, integer: bool = False) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (integer and value != int(value)) or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            raise self.fail(field, f"must be {kind} in [{low}, {high}], got {value!r}")
        return int(value) if integer else float(value)

    def name(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.fail(field, f"must be a name of letters, digits, '_', '-', '.' (<= 64), got {value!r}")
        return value


def parse_experiment(raw: Any, source: str = "<experiment>", root: Any = None) -> Experiment:
    c = _Checker(source, root)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: an experiment file is a YAML mapping with 'name' and 'arms'")
    known = {"name", "control", "salt", "assign_by", "arms", "decision", "guardrails", "registry",
             "retention_days", "monitor", "description"}
    for key in raw:
        if key not in known:
            raise c.fail(str(key), f"unknown field; known: {', '.join(sorted(known))}")
    name = c.name(raw.get("name"), "name")
    arms = _arms(c, raw.get("arms"))
    control = raw.get("control", arms[0].name)
    if control not in {a.name for a in arms}:
        raise c.fail("control", f"{control!r} is not one of the arms ({', '.join(a.name for a in arms)})")
    salt = raw.get("salt", name)
    if not isinstance(salt, str) or not salt:
        raise c.fail("salt", "must be a non-empty string")
    retention = raw.get("retention_days")
    return Experiment(
        name=name, arms=arms, control=control, salt=salt, assign_by=_assign_by(c, raw.get("assign_by")),
        decision=_decision(c, raw.get("decision") or {}), guardrails=_guardrails(c, raw.get("guardrails") or {}),
        registry=str(raw.get("registry", "runs/registry")),
        retention_days=None if retention is None else c.number(retention, "retention_days", 1e-3),
        monitor=None if raw.get("monitor") is None else _monitor(c, raw["monitor"]), source=source)


def _arms(c: _Checker, raw: Any) -> tuple[Arm, ...]:
    if not isinstance(raw, dict) or len(raw) < 2:
        raise c.fail("arms", "must map at least two arm names to {model, weight}")
    arms = []
    for key, spec in raw.items():
        name = c.name(key, f"arms.{key}")
        if isinstance(spec, str):
            spec = {"model": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), str) or not spec["model"]:
            raise c.fail(f"arms.{key}", "must be a mapping with 'model' (registry id, alias or folder)")
        extra = set(spec) - {"model", "weight"}
        if extra:
            raise c.fail(f"arms.{key}.{sorted(extra)[0]}", "unknown field; an arm has 'model' and 'weight'")
        weight = c.number(spec.get("weight", 1.0), f"arms.{key}.weight", 0.0)
        arms.append(Arm(name, spec["model"], weight))
    if sum(a.weight for a in arms) <= 0:
        raise c.fail("arms", "the weights add up to 0: give at least one arm a positive weight")
    return tuple(arms)


def _assign_by(c: _Checker, raw: Any) -> tuple[str, ...]:
    if raw is None:
        return DEFAULT_ASSIGN_BY
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise c.fail("assign_by", "must be a list of 'user', 'header:NAME' or 'cookie:NAME'")
    for s in raw:
        ok = isinstance(s, str) and (s == "user" or re.fullmatch(r"(header|cookie):[A-Za-z0-9_.-]+", s))
        if not ok:
            raise c.fail("assign_by", f"{s!r} is not 'user', 'header:NAME' or 'cookie:NAME'")
    return tuple(raw)


def _decision(c: _Checker, raw: Any) -> Decision:
    if not isinstance(raw, dict):
        raise c.fail("decision", "must be a mapping (metric, alpha, mixture_sd, min_users, max_users)")
    for key in raw:
        if key not in {f.name for f in dataclasses.fields(Decision)}:
            raise c.fail(f"decision.{key}", "unknown field; known: metric, alpha, mixture_sd, min_users, max_users")
    metric = raw.get("metric", "thumbs_up")
    if metric not in DECISION_METRICS:
        raise c.fail("decision.metric", f"{metric!r}: choose one of {', '.join(DECISION_METRICS)}")
    max_users = raw.get("max_users")
    return Decision(metric=metric, alpha=c.number(raw.get("alpha", 0.05), "decision.alpha", 1e-6, 0.5),
                    mixture_sd=c.number(raw.get("mixture_sd", 0.2), "decision.mixture_sd", 1e-4, 10.0),
                    min_users=int(c.number(raw.get("min_users", 50), "decision.min_users", 1, integer=True)),
                    max_users=None if max_users is None else
                    int(c.number(max_users, "decision.max_users", 2, integer=True)))


def _guardrails(c: _Checker, raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise c.fail("guardrails", "must map metric names to the margin a candidate may be worse by")
    out = {}
    for key, margin in raw.items():
        if key not in METRICS:
            raise c.fail(f"guardrails.{key}", f"unknown metric; choose from {', '.join(METRICS)}")
        out[key] = c.number(margin, f"guardrails.{key}", 0.0)
    return out


def _monitor(c: _Checker, raw: Any) -> Monitor:
    if isinstance(raw, str):
        raw = {"spec": raw}
    names = {f.name for f in dataclasses.fields(Monitor)}
    if not isinstance(raw, dict) or not isinstance(raw.get("spec"), str) or not raw["spec"].strip():
        raise c.fail("monitor", "must be a judge spec or a mapping with 'spec' (gold, rm:PATH, judge:SPEC ...)")
    for key in raw:
        if key not in names:
            raise c.fail(f"monitor.{key}", f"unknown field; known: {', '.join(sorted(names))}")
    for key in ("pause", "block"):
        if not isinstance(raw.get(key, False), bool):
            raise c.fail(f"monitor.{key}", f"must be true or false, got {raw[key]!r}")
    return Monitor(spec=raw["spec"].strip(), threshold=c.number(raw.get("threshold", 0.0), "monitor.threshold", -math.inf),
                   alarm_rate=c.number(raw.get("alarm_rate", 0.05), "monitor.alarm_rate", 0.0, 1.0),
                   min_scored=int(c.number(raw.get("min_scored", 30), "monitor.min_scored", 1, integer=True)),
                   window=int(c.number(raw.get("window", 1000), "monitor.window", 1, integer=True)),
                   pause=raw.get("pause", False), block=raw.get("block", False),
                   refusal=str(raw.get("refusal", Monitor.refusal)))

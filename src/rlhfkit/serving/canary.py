"""Canary releases: a candidate model enters live traffic at a small share, grows while the
evidence holds, and is promoted or rolled back by the A/B analysis (rlhfkit.serving.ab).

A :class:`Canary` runs one candidate against the production arm of an experiment. Each
:meth:`Canary.step` reads the experiment's traffic and feedback, runs the always-valid sequential
test and the guardrails, and acts:

- **roll back at once** when the candidate is found worse on the decision metric, or any
  guardrail is breached (its worsening surely beyond the margin), or the experiment reached
  ``max_users`` without a promotion. The mSPRT is valid at every look, so acting before
  ``min_users`` is no peeking error: a bad candidate is stopped at its canary share;
- **promote** when the analysis promotes it (better, every guardrail shown within its margin);
- **grow** to the next share in ``shares`` once ``users_per_step`` new candidate users were seen
  at the current share and the always-valid interval shows the candidate at most ``max_drop``
  worse than production on the decision metric (a non-inferiority margin, on the metric's own
  scale: 0.05 is five points of thumbs-up rate). The mere absence of a verdict is not enough: a
  test with few users rarely finds anything, and a worse candidate would grow on silence;
- otherwise keep running at the current share.

Every action is written to the registry's history (`Registry.record`, with the test's estimate,
interval, p-value, users and guardrail states as evidence; a promotion also moves the promoted
model) and, with a database, to the feedback service's audit log (``canary_grow``,
``canary_promote``, ``canary_rollback``). `on_change` receives the experiment with the new
weights (a live server's router swaps it in); `path`, when given, is rewritten atomically so a
server following the file picks it up (:func:`follow_experiment`).

The candidate is the last arm, so its bucket range [1 - share, 1) only grows: a user who saw the
candidate keeps seeing it while the share grows.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.errors import ConfigError
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import AuditEvent
from rlhfkit.models.registry import Registry, RegistryError, metric_value
from rlhfkit.serving import ab
from rlhfkit.serving.experiments import Arm, Experiment, load_experiment
from rlhfkit.train.runs import atomic_write_text

DONE = ("promoted", "rolled back")


@dataclasses.dataclass(frozen=True)
class CanaryPlan:
    shares: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5)
    """The candidate's traffic share at each stage, first to last."""
    users_per_step: int = 50
    """New candidate users seen at a share before it grows to the next."""
    max_drop: float | None = 0.05
    """Grow only when the candidate is shown at most this much worse than production on the
    decision metric (the interval's worst end); None grows on the absence of a verdict."""

    def __post_init__(self) -> None:
        s = tuple(self.shares)
        if not s or any(not 0.0 < x < 1.0 for x in s) or list(s) != sorted(s):
            raise ConfigError(f"canary shares must be increasing numbers in (0, 1), got {list(s)}")
        if self.users_per_step < 1:
            raise ConfigError(f"canary users_per_step must be >= 1, got {self.users_per_step}")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise ConfigError(f"canary max_drop must be >= 0 (or None), got {self.max_drop}")


class Canary:
    """One candidate's canary release (module docstring)."""

    def __init__(self, base: Experiment, candidate_model: str, registry: Registry, db: Database,
                 plan: CanaryPlan = CanaryPlan(), arm: str = "candidate", on_change: Callable[[Experiment], Any] | None = None,
                 path: str | Path | None = None, printer: Callable[[str], Any] = print):
        if arm == base.control:
            raise ConfigError(f"canary arm {arm!r} is the experiment's control arm; name it differently")
        self.base, self.model, self.registry, self.db, self.plan = base, candidate_model, registry, db, plan
        self.arm, self.on_change, self.path, self.printer = arm, on_change, path, printer
        self.production = base.arm(base.control).model
        self.stage, self.status, self.events = 0, "running", []
        self.stage_start_users = 0
        self.registry.get(candidate_model)  # a clear error for an unknown model
        self._publish(self.experiment())

    @property
    def share(self) -> float:
        return 0.0 if self.status == "rolled back" else 1.0 if self.status == "promoted" else self.plan.shares[self.stage]

    def experiment(self) -> Experiment:
        """The experiment as now served: production and the candidate (last) at the current share."""
        control = Arm(self.base.control, self.production, 1.0 - self.share)
        return dataclasses.replace(self.base, arms=(control, Arm(self.arm, self.model, self.share)))

    def step(self) -> dict:
        """Read the evidence and act once; returns the event (action, share, evidence)."""
        if self.status in DONE:
            return {"action": "done", "status": self.status, "share": self.share}
        exp = self.experiment()
        r = ab.analyse(exp, self.db)
        comp = r["comparisons"][self.arm]
        users = r["arms"][self.arm]["users"]
        evidence = {"experiment": exp.name, "metric": r["metric"], "estimate": comp["estimate"], "low": comp["low"],
                    "high": comp["high"], "p_value": comp["p_value"], "verdict": comp["verdict"],
                    "candidate_users": users, "control_users": r["arms"][exp.control]["users"], "share": self.share,
                    "guardrails": {m: g["status"] for m, g in comp["guardrails"].items()}, "reasons": r["reasons"]}
        breached = [m for m, g in comp["guardrails"].items() if g["status"] == "breached"]
        if comp["verdict"] == "worse" or breached or r["decision"] == "roll back":
            why = (f"guardrail {', '.join(breached)} breached" if breached else
                   f"{r['metric']} worse than production" if comp["verdict"] == "worse" else "; ".join(r["reasons"]))
            return self._rollback(why, evidence)
        if r["decision"] == "promote" and r["arm"] == self.arm:
            return self._promote(evidence)
        enough = users - self.stage_start_users >= self.plan.users_per_step and self.stage + 1 < len(self.plan.shares)
        worst = self._worst_drop(comp, r["metric"])
        if enough and (self.plan.max_drop is None or (worst is not None and worst <= self.plan.max_drop)):
            self.stage += 1
            self.stage_start_users = users
            shown = "no verdict against it" if worst is None else f"at worst {worst:.3g} below production"
            return self._event("grow", f"{users} candidate users, {r['metric']} {shown}; share "
                                       f"{self.plan.shares[self.stage - 1]:g} -> {self.share:g}", evidence)
        return {"action": "keep running", "share": self.share, "evidence": evidence}

    @staticmethod
    def _worst_drop(comp: dict, metric: str) -> float | None:
        """How much worse than production the candidate may be, by the interval's worst end (None:
        no interval yet)."""
        end = comp["low"] if ab.METRICS[metric] else comp["high"]
        if end is None:
            return None
        return -end if ab.METRICS[metric] else end

    def _rollback(self, why: str, evidence: dict) -> dict:
        self.status = "rolled back"
        self.registry.record("canary_rollback", self.model, reason=f"canary {self.base.name}: {why}", evidence=evidence)
        return self._event("rollback", why, evidence, registry=False)

    def _promote(self, evidence: dict) -> dict:
        why = (f"{evidence['metric']} {evidence['estimate']:.3g} [{evidence['low']:.3g}, {evidence['high']:.3g}] vs "
               f"production, p={evidence['p_value']:.3g}, every guardrail within its margin")
        entry = self.registry.get(self.model)
        # live evidence decides; the registry's gold guard is bypassed only for a model without a
        # gold metric (production traffic has no gold panel), never to override a worse gold score
        force = metric_value(entry.get("metrics", {}), self.registry.gold_key) is None
        try:
            self.registry.promote(self.model, force=force, reason=f"canary {self.base.name}: {why}")
        except RegistryError as e:
            return self._rollback(f"the A/B test says better but the registry refused: {e}", evidence)
        self.status = "promoted"
        return self._event("promote", why, evidence)

    def _event(self, action: str, why: str, evidence: dict, registry: bool = True) -> dict:
        if registry:
            self.registry.record(f"canary_{action}", self.model, reason=f"canary {self.base.name}: {why}", evidence=evidence)
        with self.db.session() as s:
            s.add(AuditEvent(action=f"canary_{action}", target=self.base.name[:128],
                             detail={"model": self.model, "production": self.production, "reason": why, **evidence}))
        event = {"action": action, "reason": why, "share": self.share, "evidence": evidence}
        self.events.append(event)
        self.printer(f"canary {self.model}: {action} ({why}); share {self.share:g}")
        self._publish(self.experiment())
        return event

    def _publish(self, exp: Experiment) -> None:
        if self.path is not None:
            atomic_write_text(self.path, experiment_yaml(exp))
        if self.on_change is not None:
            self.on_change(exp)


def experiment_yaml(exp: Experiment) -> str:
    """An experiment file that `load_experiment` reads back as `exp` (weights included)."""
    d = exp.decision
    raw: dict[str, Any] = {
        "name": exp.name, "control": exp.control, "salt": exp.salt, "assign_by": list(exp.assign_by),
        "arms": {a.name: {"model": a.model, "weight": a.weight} for a in exp.arms},
        "decision": {k: v for k, v in dataclasses.asdict(d).items() if v is not None},
        "guardrails": dict(exp.guardrails), "registry": exp.registry}
    if exp.retention_days is not None:
        raw["retention_days"] = exp.retention_days
    if exp.monitor is not None:
        raw["monitor"] = dataclasses.asdict(exp.monitor)
    return yaml.safe_dump(raw, sort_keys=False)


def follow_experiment(app: Any, path: str | Path, load_arm: Callable[[Arm], Any], poll_s: float = 2.0
                      ) -> Callable[[], None]:
    """Reload the experiment file `path` into a running server when it changes: arms not yet
    served are loaded (``load_arm(arm)`` returns the served model) before the router switches to
    the new weights. Returns a function that stops following."""
    stop = threading.Event()
    seen = [Path(path).stat().st_mtime_ns if Path(path).is_file() else None]

    def run() -> None:
        while not stop.wait(poll_s):
            try:
                mtime = Path(path).stat().st_mtime_ns
                if mtime == seen[0]:
                    continue
                exp = load_experiment(path)
                for a in exp.arms:
                    if a.name not in app.state.models and a.weight > 0:
                        app.state.models[a.name] = load_arm(a)
                app.state.live.experiment = exp
                seen[0] = mtime
            except Exception as e:  # noqa: BLE001 -- a bad edit must not stop serving; the old experiment stays
                print(f"experiment {path}: not reloaded: {type(e).__name__}: {e}")
                seen[0] = Path(path).stat().st_mtime_ns if Path(path).is_file() else None

    threading.Thread(target=run, name="experiment-follow", daemon=True).start()
    return stop.set


def run_canary(canary: Canary, wait: Callable[[], Any], deadline_steps: int) -> dict:
    """Step `canary` until it is promoted or rolled back, calling `wait()` between looks (sleep,
    or let simulated users come); after `deadline_steps` looks it is rolled back: a candidate that
    cannot show it is better within the budget does not replace production."""
    for _ in range(deadline_steps):
        event = canary.step()
        if canary.status in DONE:
            return {"status": canary.status, "events": canary.events, "last": event}
        wait()
    canary._rollback(f"no decision after {deadline_steps} looks", {"share": canary.share})
    return {"status": canary.status, "events": canary.events, "last": canary.events[-1]}


def shares_arg(text: str | Sequence[float]) -> tuple[float, ...]:
    """'0.05,0.1,0.25' -> (0.05, 0.1, 0.25)."""
    if not isinstance(text, str):
        return tuple(float(x) for x in text)
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"canary shares: {text!r} is not a comma-separated list of numbers") from e

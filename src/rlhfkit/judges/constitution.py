"""Constitutions (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

A constitution is a list of principles. Each principle has

* ``critique``: the critique request of SL-CAI ("Identify ways in which the response is ..."),
* ``revision``: the revision request ("Please rewrite the response to ..."),
* ``comparison``: the question of RL-CAI's preference labels ("Which response is kinder?"),
* optionally ``judge``: a judge spec that scores this principle itself (a principle-specific
  labeller), used instead of asking the general judge the comparison question.

Files are YAML (``principles: [{name, critique, revision, comparison, judge}]``) or Markdown:
one ``## name`` heading per principle with ``critique:``, ``revision:``, ``comparison:`` and
``judge:`` lines under it.

RL-CAI (Bai et al. 2022, sec. 4.1): for each comparison one principle is drawn at random and
the feedback model is asked that principle's question. On the bundled task the tiny policy
cannot read or write critiques, so the bundled constitution gives every principle its own
labeller (``principle:NAME``, rlhfkit.judges.principles): a scorer that measures that one
principle and nothing else, independent of the gold panel.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from rlhfkit.errors import ConfigError
from rlhfkit.judges.load import load_judge


@dataclasses.dataclass
class Principle:
    name: str
    critique: str
    revision: str
    comparison: str
    judge: str = ""


FIELDS = ("critique", "revision", "comparison")


def load_constitution(path: str | Path) -> list[Principle]:
    """Principles from a YAML or Markdown file; a missing field names the principle and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"constitution file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".md", ".markdown"):
        raw = _parse_markdown(text)
    else:
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        raw = data.get("principles") if isinstance(data, dict) else data
        if not isinstance(raw, list):
            raise ConfigError(f"{path}: expected a 'principles' list")
    principles = []
    for k, p in enumerate(raw):
        if not isinstance(p, dict):
            raise ConfigError(f"{path}: principle {k + 1} must be a mapping")
        name = str(p.get("name") or f"principle-{k + 1}")
        for f in FIELDS:
            if not isinstance(p.get(f), str) or not p[f].strip():
                raise ConfigError(f"{path}: principle {name!r} has no '{f}' text")
        principles.append(Principle(name=name, critique=p["critique"].strip(), revision=p["revision"].strip(),
                                    comparison=p["comparison"].strip(), judge=str(p.get("judge") or "")))
    if not principles:
        raise ConfigError(f"{path}: the constitution has no principles")
    return principles


def _parse_markdown(text: str) -> list[dict]:
    out: list[dict] = []
    current: dict | None = None
    key = None
    for line in text.splitlines():
        head = re.match(r"^##\s+(.+?)\s*$", line)
        if head:
            current = {"name": head.group(1)}
            out.append(current)
            key = None
            continue
        if current is None:
            continue
        field = re.match(r"^\s*[-*]?\s*\**(critique|revision|comparison|judge)\**\s*:\s*(.*)$", line, re.I)
        if field:
            key = field.group(1).lower()
            current[key] = field.group(2).strip()
        elif key and line.strip():  # a continuation line
            current[key] = (current[key] + " " + line.strip()).strip()
        else:
            key = None
    return out


# -- RL-CAI labelling ------------------------------------------------------------------------------

def constitution_labeller(principles: Sequence[Principle], judge=None, seed: int = 0, chain_of_thought: bool = False):
    """labeller(prompts, a, b) -> label dicts: one principle drawn per comparison, asked of its own
    judge (``principle.judge``) or of ``judge`` with the principle's comparison question."""
    own = {p.name: load_judge(p.judge) for p in principles if p.judge}
    missing = [p.name for p in principles if not p.judge]
    if missing and judge is None:
        raise ConfigError(f"principles {', '.join(missing)} name no judge of their own: give --judge SPEC")
    if missing and not hasattr(judge, "compare_with_question"):
        raise ConfigError(f"judge {judge.name!r} cannot be asked a principle's question (use an llm: or http: "
                          f"judge, or give each principle a 'judge:')")
    rng = np.random.default_rng(seed + 7)

    def label(prompts, a, b):
        drawn = rng.integers(0, len(principles), size=len(a))
        out: list[dict | None] = [None] * len(a)
        for k, p in enumerate(principles):
            idx = [i for i in range(len(a)) if drawn[i] == k]
            if not idx:
                continue
            sub = ([prompts[i] for i in idx], [a[i] for i in idx], [b[i] for i in idx])
            if p.name in own:
                verdicts, who = own[p.name].compare(*sub), own[p.name].name
            else:
                verdicts = judge.compare_with_question(*sub, question=p.comparison, chain_of_thought=chain_of_thought)
                who = judge.name
            for i, v in zip(idx, verdicts):
                out[i] = {"label": v.label, "annotator_id": who, "reliable": True, "p_a": v.p_a,
                          "confidence": v.confidence, "principle": p.name}
                if v.consistent is not None:
                    out[i]["order_consistent"] = v.consistent
                if v.rationale:
                    out[i]["rationale"] = v.rationale
        return out

    return label

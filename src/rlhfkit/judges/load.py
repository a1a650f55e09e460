"""`load_judge(spec)`: one string names any AI judge.

    gold                          the bundled human panel (for reference runs and tests)
    afinn | textblob              lexicon AI labellers (rlhfkit.judges.lexicon)
    rm:PATH                       a reward model or ensemble folder (rlhfkit.models.reward.RewardScorer)
    llm:PATH                      LLM-as-judge with a local causal LM (rlhfkit.judges.llm)
    http:MODEL                    an OpenAI-compatible endpoint (rlhfkit.judges.http)
    ensemble:SPEC+SPEC+...        members vote (rlhfkit.judges.judge.EnsembleJudge); each member is a
                                  whole spec with its own options (below)
    principle:NAME                a principle-specific labeller of the bundled task (rlhfkit.judges.constitution)
    FILE.yaml                     a mapping with `kind:` (one of the above) and the options

Options follow a ``?``: ``http:gpt-4o-mini?base_url=http://127.0.0.1:8000/v1&concurrency=4``.
Each is passed to the judge's constructor as a keyword; numbers and true/false are converted.

An ensemble's members are separated by ``+`` (or ``,``) where the text after it starts a member
spec (``gold``, ``afinn``, ``textblob``, ``rm:``, ``llm:``, ``http:``, ``principle:`` or a YAML
file), so each member keeps its own options and a ``+`` or ``,`` inside an option value stays:

    ensemble:http:judge-model?base_url=http://127.0.0.1:8000/v1&concurrency=4+afinn

The ensemble's own options (``tie_margin``, ``name``) go in a YAML spec:
``kind: ensemble``, ``members: [SPEC, SPEC]``, ``tie_margin: 0.1``.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qsl

import yaml

from rlhfkit.errors import ConfigError
from rlhfkit.judges.http import HTTPJudge
from rlhfkit.judges.judge import EnsembleJudge, PanelJudge
from rlhfkit.judges.lexicon import AfinnJudge, TextBlobJudge
from rlhfkit.judges.llm import LLMJudge
from rlhfkit.judges.panel import GoldPanel
from rlhfkit.judges.principles import principle_judge
from rlhfkit.models.reward import RewardScorer

# a member separator: "+" or "," followed by the start of a judge spec
_MEMBER_START = re.compile(r"[+,](?=(?:gold|afinn|textblob)(?:[?+,]|$)|(?:rm|llm|http|principle):|[^+,?]+\.ya?ml(?:[+,]|$))")


def ensemble_members(arg: str) -> list[str]:
    """'http:m?base_url=...&k=v+afinn' -> ['http:m?base_url=...&k=v', 'afinn'] (module docstring)."""
    return [m.strip() for m in _MEMBER_START.split(arg) if m.strip()]


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """'kind:arg?k=v&k=v' -> (kind, arg, options); a YAML file -> its mapping."""
    spec = spec.strip()
    if spec.endswith((".yaml", ".yml")):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"judge spec file {spec} does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict) or "kind" not in data:
            raise ConfigError(f"{spec}: expected a mapping with a 'kind' field ({', '.join(JUDGE_KINDS)})")
        data = dict(data)
        kind = str(data.pop("kind"))
        arg = str(data.pop("model", data.pop("path", "")) or "")
        return kind, arg, data
    if spec.startswith("ensemble:"):  # the members carry their own "?options"
        return "ensemble", spec[len("ensemble:"):], {}
    head, _, query = spec.partition("?")
    kind, _, arg = head.partition(":")
    opts = {k: _value(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    return kind, arg, opts


def load_judge(spec: str):
    """Build the judge a spec names (see the module docstring); a clear error for a bad spec."""
    kind, arg, opts = parse_spec(spec)
    build = JUDGE_BUILDERS.get(kind)
    if build is None:
        raise ConfigError(f"unknown judge {kind!r} in spec {spec!r}; available: {', '.join(JUDGE_KINDS)}")
    try:
        return build(arg, opts, spec)
    except TypeError as e:  # an option the judge does not take
        raise ConfigError(f"judge spec {spec!r}: {e}") from e


# -- one builder per kind: (arg, options, the whole spec for messages) -> judge ----------------------

def _gold(arg: str, opts: dict, spec: str):
    return PanelJudge(GoldPanel(), name="gold", **opts)


def _afinn(arg: str, opts: dict, spec: str):
    return AfinnJudge(**opts)


def _textblob(arg: str, opts: dict, spec: str):
    return TextBlobJudge(**opts)


def _reward_model(arg: str, opts: dict, spec: str):
    if not arg:
        raise ConfigError(f"judge spec {spec!r}: give the reward model folder, rm:PATH")
    scale = opts.pop("scale", 1.0)
    tie = opts.pop("tie_margin", 0.0)
    return PanelJudge(RewardScorer(arg, **opts), name=f"rm:{arg}", scale=scale, tie_margin=tie)


def _llm(arg: str, opts: dict, spec: str):
    if not arg:
        raise ConfigError(f"judge spec {spec!r}: give a causal LM folder or name, llm:PATH")
    return LLMJudge(arg, **opts)


def _http(arg: str, opts: dict, spec: str):
    if not arg:
        raise ConfigError(f"judge spec {spec!r}: give the model name, http:MODEL?base_url=...")
    return HTTPJudge(model=arg, **opts)


def _ensemble(arg: str, opts: dict, spec: str):
    members = opts.pop("members", None)
    if isinstance(members, str):
        members = ensemble_members(members)
    parts = list(members) if members else ensemble_members(arg)
    if not parts:
        raise ConfigError(f"judge spec {spec!r}: give members, ensemble:afinn+textblob")
    return EnsembleJudge([load_judge(str(p)) for p in parts], **opts)


def _principle(arg: str, opts: dict, spec: str):
    return principle_judge(arg, **opts)


JUDGE_BUILDERS = {"gold": _gold, "afinn": _afinn, "textblob": _textblob, "rm": _reward_model, "llm": _llm,
                  "http": _http, "ensemble": _ensemble, "principle": _principle}
JUDGE_KINDS = tuple(JUDGE_BUILDERS)

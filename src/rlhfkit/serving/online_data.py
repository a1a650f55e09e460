"""Feedback from real use -> training data for the next model (``rlhfkit loop --source traffic:DB``).

What a round reads (`load_feedback`): the feedback logged in ``(since, until]`` on responses
served by the given model versions (a registry id matches ``id`` and ``id@<weights stamp>``, as
the traffic log writes it). Of the thumbs and ratings on one choice of a response the latest
wins (people change their minds); comments carry no label and are counted, not used.

The rules (`to_records`), one per kind of feedback and per training format:

====================  ==================================  ======================================
feedback              unpaired (KTO: prompt/completion/    pairs (DPO family, reward model:
                      label)                               prompt/chosen/rejected)
====================  ==================================  ======================================
thumbs up / down      label true / false                   an up and a down response to the same
                                                           prompt (any users), matched in order
rating 1-5            >= rating_up: true; <= rating_down:  two rated responses to the same prompt
                      false; between: left out             whose ratings differ by >= rating_margin
edit                  edited text true, original false     edited text chosen over the original
pick (regenerate and  picked true, other false             picked chosen over the other
choose, arena vote)
====================  ==================================  ======================================

A pick between two responses the same user also labelled alike (both thumbs up, both down, or
ratings on the same side of the thresholds) is left out by default (``alike_picks="drop"``,
counted as unused): that user found the two about equally good or bad, and the pick is close
to a coin toss. On the bundled task's simulated users (benchmarks/online_rlhf.py) such picks
agreed with the gold panel less often than picks whose labels differed, with a smaller gold gap,
and DPO on the decisive picks alone gained more than on all of them. A pick without labels on both responses is kept. ``alike_picks="keep"``
keeps every pick.

Every record keeps ``round``, ``users`` (the user keys behind it), ``source`` and the model
version(s) that produced it.

Off-policy data (`select_records`): a response logged under model M_k is off-policy for the model
trained in round r > k. DPO-family losses and KTO are offline objectives whose gradient needs no
samples from the policy, but the pairs say less about the responses the new policy writes the
further it has moved (Xiong et al. 2024, "Iterative Preference Learning from Human Feedback",
sec. 3: online iterative DPO uses the latest policy's samples). The rule: a round trains on the
records of the last ``window`` rounds only, and a record ``a`` rounds old counts ``decay**a``.
PPO, GRPO and RLOO never train the policy on logged responses: the logged pairs train the
reward model (same window), and the policy learns from its own fresh samples, on-policy.

Weights (user quality times age) are applied by Bernoulli thinning: a record of weight w is
kept with probability w (seeded), so its expected share of the gradient is w; the recipes take
no per-example weights, and a record kept is a whole record.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import select

from rlhfkit.errors import ConfigError
from rlhfkit.feedback.db import Database
from rlhfkit.serving.tables import ServedResponse, UseFeedback

FORMATS = ("unpaired", "pairs")


@dataclasses.dataclass(frozen=True)
class Rules:
    """How ratings become labels and pairs (see the module docstring)."""

    rating_up: int = 4
    rating_down: int = 2
    rating_margin: int = 2
    alike_picks: str = "drop"
    """'drop' (a pick between two responses its user labelled alike is left out) or 'keep'."""

    def __post_init__(self) -> None:
        if self.alike_picks not in ("drop", "keep"):
            raise ConfigError(f"rating rules: alike_picks must be 'drop' or 'keep', got {self.alike_picks!r}")
        if not 1 <= self.rating_down < self.rating_up <= 5:
            raise ConfigError(f"rating rules: need 1 <= rating_down < rating_up <= 5, got {self.rating_down}, {self.rating_up}")
        if self.rating_margin < 1:
            raise ConfigError(f"rating rules: rating_margin must be >= 1, got {self.rating_margin}")


@dataclasses.dataclass
class Feedback:
    """One piece of feedback with the served response(s) it is about."""

    id: int
    kind: str
    user: str | None
    prompt: Any
    text: str
    response_id: str
    model_version: str
    created_at: dt.datetime
    value: dict
    chat: bool
    other_text: str | None = None
    other_response_id: str | None = None
    other_model_version: str | None = None


def version_matches(version: str, wanted: Iterable[str]) -> bool:
    """`version` is one of `wanted`, or `wanted@<weights stamp>`."""
    return any(version == w or version.startswith(w + "@") for w in wanted)


def load_feedback(db: Database, since: dt.datetime | None = None, until: dt.datetime | None = None,
                  versions: Sequence[str] | None = None, experiment: str | None = None) -> list[Feedback]:
    """Feedback logged in (since, until] on responses of `versions` (all when None), oldest first."""
    with db.read_session() as s:
        q = (select(UseFeedback, ServedResponse).join(ServedResponse, ServedResponse.response_id == UseFeedback.response_id)
             .order_by(UseFeedback.id))
        if since is not None:
            q = q.where(UseFeedback.created_at > since)
        if until is not None:
            q = q.where(UseFeedback.created_at <= until)
        if experiment is not None:
            q = q.where(ServedResponse.experiment == experiment)
        rows = s.execute(q).all()
        others = {r.response_id: r for r in s.scalars(select(ServedResponse).where(
            ServedResponse.response_id.in_([f.other_response_id for f, _ in rows if f.other_response_id])))}
    out = []
    for f, r in rows:
        o = others.get(f.other_response_id) if f.other_response_id else None
        involved = [r.model_version] + ([o.model_version] if o is not None else [])
        if versions is not None and not any(version_matches(v, versions) for v in involved):
            continue
        choice = int(f.value.get("choice", 0))
        text = r.response[choice] if 0 <= choice < len(r.response) else ""
        out.append(Feedback(f.id, f.kind, f.user_key or r.user_key, r.request, text, r.response_id, r.model_version,
                            f.created_at, dict(f.value), r.endpoint == "chat",
                            other_text=(o.response[0] if o is not None and o.response else None),
                            other_response_id=f.other_response_id,
                            other_model_version=o.model_version if o is not None else None))
    return _latest_labels(out)


def _latest_labels(events: list[Feedback]) -> list[Feedback]:
    """Of the thumbs (and of the ratings) on one choice of a response, only the latest."""
    last: dict[tuple, int] = {}
    for i, e in enumerate(events):
        if e.kind in ("thumbs", "rating"):
            last[(e.kind, e.response_id, e.value.get("choice", 0))] = i
    keep = set(last.values())
    return [e for i, e in enumerate(events) if e.kind not in ("thumbs", "rating") or i in keep]


def _reply(e: Feedback, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if e.chat else text


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True)


def binary_label(e: Feedback, rules: Rules) -> bool | None:
    """True (desirable) / False / None (no binary label) of a thumbs or a rating."""
    if e.kind == "thumbs":
        return bool(e.value["up"])
    if e.kind == "rating":
        r = int(e.value["rating"])
        return True if r >= rules.rating_up else False if r <= rules.rating_down else None
    return None


def pair_sides(e: Feedback) -> tuple[str, str] | None:
    """(chosen text, rejected text) of an edit or a pick; None when it says nothing."""
    if e.kind == "edit":
        edited = e.value["text"]
        return (edited, e.text) if edited.strip() and edited.strip() != e.text.strip() else None
    if e.kind == "pairwise" and e.other_text is not None:
        picked_first = e.value["chosen"] == e.response_id
        a, b = (e.text, e.other_text) if picked_first else (e.other_text, e.text)
        return (a, b) if a.strip() and b.strip() and a != b else None
    return None


def own_labels(events: Sequence[Feedback], rules: Rules) -> dict[tuple, bool]:
    """(user, response id) -> that user's binary label of the response (thumbs or rating)."""
    out = {}
    for e in events:
        label = binary_label(e, rules)
        if label is not None and e.user is not None:
            out[(e.user, e.response_id)] = label
    return out


def labelled_alike(e: Feedback, labels: dict[tuple, bool]) -> bool:
    """Whether the user of pick `e` labelled both of its responses, the same way."""
    if e.kind != "pairwise" or e.other_response_id is None:
        return False
    a, b = labels.get((e.user, e.response_id)), labels.get((e.user, e.other_response_id))
    return a is not None and a == b


def to_records(events: Sequence[Feedback], fmt: str, rules: Rules = Rules(), round: int | None = None
               ) -> tuple[list[dict], dict]:
    """Training records of format `fmt` ('unpaired' or 'pairs') and counts of what each kind gave."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown training-data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    counts: dict[str, Any] = {"feedback": len(events), "by_kind": defaultdict(int), "records": 0, "unused": defaultdict(int)}
    out: list[dict] = []
    singles: dict[str, list[tuple[Feedback, bool]]] = defaultdict(list)   # prompt -> labelled responses
    rated: dict[str, list[Feedback]] = defaultdict(list)
    labels = own_labels(events, rules)
    for e in events:
        counts["by_kind"][e.kind] += 1
        meta = {"round": round, "users": [e.user], "feedback_id": e.id, "source": e.kind}
        sides = pair_sides(e)
        if sides is not None and rules.alike_picks == "drop" and labelled_alike(e, labels):
            counts["unused"]["pick between responses labelled alike"] += 1
            continue
        if sides is not None:
            versions = ["human_edit", e.model_version] if e.kind == "edit" else [e.model_version, e.other_model_version]
            if fmt == "pairs":
                out.append({"prompt": e.prompt, "chosen": _reply(e, sides[0]), "rejected": _reply(e, sides[1]),
                            **meta, "model_versions": versions})
            else:
                out += [{"prompt": e.prompt, "completion": _reply(e, t), "label": lab, **meta, "model_versions": versions}
                        for t, lab in ((sides[0], True), (sides[1], False))]
            continue
        label = binary_label(e, rules)
        if label is None or not e.text.strip():
            counts["unused"]["neutral rating" if e.kind == "rating" and e.text.strip() else e.kind] += 1
            continue
        if fmt == "unpaired":
            out.append({"prompt": e.prompt, "completion": _reply(e, e.text), "label": label, **meta,
                        "model_versions": [e.model_version]})
        else:
            singles[_prompt_key(e.prompt)].append((e, label))
            if e.kind == "rating":
                rated[_prompt_key(e.prompt)].append(e)
    if fmt == "pairs":
        out += _matched_pairs(singles, rated, rules, round, counts)
    counts["records"] = len(out)
    counts["by_kind"], counts["unused"] = dict(counts["by_kind"]), dict(counts["unused"])
    return out, counts


def _matched_pairs(singles: dict, rated: dict, rules: Rules, round: int | None, counts: dict) -> list[dict]:
    """Pairs from labels on single responses: rating gaps first, then up against down, in order;
    each response is used in at most one pair, and the ones left over are counted."""
    out, used = [], set()

    def pair(win: Feedback, lose: Feedback, source: str) -> None:
        used.update((win.id, lose.id))
        out.append({"prompt": win.prompt, "chosen": _reply(win, win.text), "rejected": _reply(lose, lose.text),
                    "round": round, "users": sorted({win.user, lose.user}, key=str), "feedback_id": win.id,
                    "source": source, "model_versions": [win.model_version, lose.model_version]})

    for group in rated.values():
        by_rating = sorted(group, key=lambda e: -int(e.value["rating"]))
        while len(by_rating) >= 2 and int(by_rating[0].value["rating"]) - int(by_rating[-1].value["rating"]) >= rules.rating_margin:
            hi, lo = by_rating.pop(0), by_rating.pop()
            if hi.text != lo.text:
                pair(hi, lo, "rating")
    for group in singles.values():
        ups = [e for e, lab in group if lab and e.id not in used]
        downs = [e for e, lab in group if not lab and e.id not in used]
        for up, down in zip(ups, downs):
            if up.text != down.text:
                pair(up, down, "thumbs" if up.kind == down.kind == "thumbs" else "thumbs+rating")
    for group in singles.values():
        for e, _ in group:
            if e.id not in used:
                counts["unused"][f"{e.kind} without a partner"] += 1
    return out


def select_records(history: dict[int, list[dict]], current: int, window: int, decay: float = 1.0,
                   user_weights: dict[str, float] | None = None, seed: int = 0) -> tuple[list[dict], dict]:
    """The records a round trains on (module docstring: last `window` rounds, age decay, user
    weights, by Bernoulli thinning); returns them with counts per round of records offered/kept."""
    if window < 1:
        raise ConfigError(f"traffic window must be >= 1 round, got {window}")
    if not 0.0 < decay <= 1.0:
        raise ConfigError(f"traffic decay must be in (0, 1], got {decay}")
    rng = np.random.default_rng(seed)
    weights = user_weights or {}
    kept, report = [], {}
    for r in sorted(history):
        age = current - r
        if age < 0:
            continue
        recs = history[r]
        if age >= window:
            report[r] = {"offered": len(recs), "kept": 0, "why": f"older than the window of {window} round(s)"}
            continue
        n = 0
        for rec in recs:
            w = decay**age * min((weights.get(u, 1.0) for u in rec.get("users") or [None]), default=1.0)
            # draw for every record, so one record's fate does not depend on another's weight
            if rng.random() < w:
                kept.append({**rec, "weight": round(float(w), 6)})
                n += 1
        report[r] = {"offered": len(recs), "kept": n, "age": age}
    return kept, report

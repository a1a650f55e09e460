"""Export collected labels as rlhfkit/TRL records (the admin API sends them as JSONL; `serve
export` writes JSONL or a `datasets` folder, see cli_data).

Kinds and the TRL columns they produce:

- ``preferences``: prompt / chosen / rejected, from pairwise answers ("both bad" is skipped and
  counted; ties too, unless ``ties="keep"`` writes them with ``label: 0.5`` and ``tie: true``
  for the tie-aware reward losses), from rankings (expanded to all K(K-1)/2 pairs) and from edits (the
  edited text is preferred over the response it rewrote);
- ``rankings``: prompt / responses / ranking (indices into responses, best first);
- ``sft``: prompt / completion, from edits;
- ``kto``: prompt / completion / label (bool), from thumbs up/down;
- ``ratings``: prompt / completion / ratings (rubric -> mean Likert score);
- ``critiques``: prompt / responses / critique.

``aggregate`` is ``none`` (one record per label, as annotators gave it) or ``majority``,
``weighted`` (reliability-weighted) or ``bt`` (Bradley-Terry), which emit one consensus record
per item. Gold (honeypot) items are left out unless ``include_gold``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhfkit.errors import DataError
from rlhfkit.feedback import qc
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import STRENGTHS, Item, Label, Task, User

KINDS = {
    "preferences": ("pairwise", "ranking", "edit"),
    "rankings": ("ranking",),
    "sft": ("edit",),
    "kto": ("thumbs",),
    "ratings": ("rating",),
    "critiques": ("critique",),
}
AGGREGATES = ("none", "majority", "weighted", "bt")


def json_line(record: dict) -> str:
    """One record as a JSONL line (UTF-8 text kept as is, not escaped)."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def kinds_for(question_type: str) -> list[str]:
    return [k for k, types in KINDS.items() if question_type in types]


def is_accepted(label: Label) -> bool:
    """Accepted by a reviewer other than its annotator: a self-approved label (stored before
    self-review was refused) does not count."""
    return label.review_status == "accepted" and label.reviewed_by != label.user_id


def _rows(s: Session, task: Task, only_accepted: bool = False
          ) -> tuple[list[qc.LabelRow], dict[int, qc.ItemRow], dict[int, Item], dict[int, dict]]:
    """Labels (as QC rows), items, and each label row's strength and comment by `id()` of the row."""
    items = {it.id: it for it in s.scalars(select(Item).where(Item.task_id == task.id))}
    labels, extras = [], {}
    for lab, name in s.execute(select(Label, User.username).join(User, User.id == Label.user_id)
                               .where(Label.task_id == task.id).order_by(Label.id)):
        if not only_accepted or is_accepted(lab):
            labels.append(qc.LabelRow(name, lab.item_id, lab.value, lab.display_order, lab.duration_ms))
            extras[id(labels[-1])] = {"strength": lab.strength, "comment": lab.comment}
    item_rows = {i: qc.ItemRow(i, len(it.responses), it.is_gold, it.gold_value) for i, it in items.items()}
    return labels, item_rows, items, extras


def _with_extras(records: list[dict], extra: dict, columns: tuple[str, ...]) -> list[dict]:
    """Add a label's strength (with TRL's reward `margin`) and comment to its records."""
    out = []
    for r in records:
        r = dict(r)
        if "strength" in columns:
            strength = extra["strength"] if "chosen" in r and r.get("tie") is None else None
            r["strength"], r["margin"] = strength, STRENGTHS.get(strength, 0.0)
        if "comment" in columns:
            r["comment"] = extra["comment"]
        out.append(r)
    return out


def task_qc(s: Session, task: Task, settings: qc.QCSettings | None = None) -> dict:
    """The QC report of a task (agreement, annotators, flags) plus aggregation coverage."""
    labels, item_rows, _, _ = _rows(s, task)
    report = qc.task_report(task.question_type, labels, item_rows, settings)
    report["task"] = {"id": task.id, "name": task.name, "overlap": task.overlap}
    if task.question_type in qc.METRIC:
        rel = {a["user"]: a["reliability"] for a in report["annotators"]}
        real = [lab for lab in labels if not item_rows[lab.item_id].is_gold]
        methods = ["majority", "weighted"] + (["bt"] if task.question_type in ("pairwise", "ranking") else [])
        report["aggregation"] = {m: _coverage(qc.aggregate(task.question_type, real, m, rel)) for m in methods}
    return report


def _coverage(consensus: dict) -> dict:
    return {"items": len(consensus), "decided": sum(v is not None for v in consensus.values())}


def export_records(s: Session, task: Task, kind: str = "preferences", aggregate: str = "none",
                   include_gold: bool = False, ties: str = "skip", only_accepted: bool = False
                   ) -> tuple[list[dict], dict[str, int]]:
    """Records of `kind` for one task, and the counts of labels skipped with the reason.

    `only_accepted` keeps the labels a reviewer accepted (pending and rejected ones are left out).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown export kind {kind!r}; choose from {sorted(KINDS)}")
    if ties not in ("skip", "keep"):
        raise ValueError(f"ties must be 'skip' or 'keep', got {ties!r}")
    if task.question_type not in KINDS[kind]:
        raise ValueError(f"task {task.name!r} holds {task.question_type} labels; kind {kind!r} needs one of "
                         f"{KINDS[kind]} (this task exports: {kinds_for(task.question_type)})")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; choose from {AGGREGATES}")
    if aggregate != "none" and task.question_type not in qc.METRIC:
        raise ValueError(f"{task.question_type} labels are free text and cannot be aggregated; use aggregate=none")
    labels, item_rows, items, extras = _rows(s, task, only_accepted)
    if not include_gold:
        labels = [lab for lab in labels if not item_rows[lab.item_id].is_gold]
    if aggregate != "none":
        report = qc.annotator_report(task.question_type, labels, item_rows, qc.QCSettings())
        rel = {u: a.reliability for u, a in report.items()}
        consensus = qc.aggregate(task.question_type, labels, aggregate, rel)
        values = [(i, v) for i, v in consensus.items()]
    else:
        values = [(lab.item_id, lab.value) for lab in labels]
    # one label's strength and comment follow its records (one record per label, so not when
    # aggregating); the columns appear when any exported label has one, in every record then
    per_label = [extras[id(lab)] for lab in labels] if aggregate == "none" else []
    columns = tuple(c for c in ("strength", "comment") if any(e[c] for e in per_label))
    if kind != "preferences":
        columns = tuple(c for c in columns if c != "strength")
    skipped: Counter = Counter()
    out: list[dict] = []
    for n, (item_id, value) in enumerate(values):
        if value is None:
            skipped["undecided"] += 1
            continue
        if kind == "preferences" and ties == "keep" and value.get("choice") == "tie":
            r = items[item_id].responses
            records = [{"prompt": items[item_id].prompt, "chosen": r[0], "rejected": r[1], "label": 0.5, "tie": True}]
        else:
            records = CONVERTERS[kind](items[item_id], value, skipped)
        out += _with_extras(records, per_label[n], columns) if columns else records
    return out, dict(skipped)


def _prefs(item: Item, v: dict, skipped: Counter) -> list[dict]:
    p, r = item.prompt, item.responses
    if "choice" in v:
        if v["choice"] not in ("a", "b"):
            skipped[v["choice"]] += 1
            return []
        win = "ab".index(v["choice"])
        return [{"prompt": p, "chosen": r[win], "rejected": r[1 - win]}]
    if "ranking" in v:
        rk = v["ranking"]
        return [{"prompt": p, "chosen": r[rk[a]], "rejected": r[rk[b]]}
                for a in range(len(rk)) for b in range(a + 1, len(rk))]
    if v["text"].strip() == r[v["response"]].strip():
        skipped["unchanged_edit"] += 1
        return []
    return [{"prompt": p, "chosen": v["text"], "rejected": r[v["response"]]}]


def _rankings(item: Item, v: dict, skipped: Counter) -> list[dict]:
    return [{"prompt": item.prompt, "responses": list(item.responses), "ranking": list(v["ranking"])}]


def _sft(item: Item, v: dict, skipped: Counter) -> list[dict]:
    return [{"prompt": item.prompt, "completion": v["text"]}]


def _kto(item: Item, v: dict, skipped: Counter) -> list[dict]:
    return [{"prompt": item.prompt, "completion": c, "label": bool(t)} for c, t in zip(item.responses, v["thumbs"])]


def _ratings(item: Item, v: dict, skipped: Counter) -> list[dict]:
    return [{"prompt": item.prompt, "completion": c, "ratings": dict(r)} for c, r in zip(item.responses, v["ratings"])]


def _critiques(item: Item, v: dict, skipped: Counter) -> list[dict]:
    return [{"prompt": item.prompt, "responses": list(item.responses), "critique": v["text"]}]


CONVERTERS = {"preferences": _prefs, "rankings": _rankings, "sft": _sft, "kto": _kto,
              "ratings": _ratings, "critiques": _critiques}


def load_preferences(db_url: str, task: str | int | None = None, aggregate: str = "none",
                     include_gold: bool = False, ties: str = "keep") -> list[dict[str, Any]]:
    """TRL preference records (prompt/chosen/rejected) straight from a feedback database.

    Reads every task whose question type yields preferences (pairwise, ranking, edit), or only
    `task` (its name or id). Ties are kept with label 0.5 by default: the reward recipe's loss
    decides (Bradley-Terry skips and counts them, soft_label and davidson learn from them).
    Used by `rlhfkit reward --from_feedback DB_URL`.
    """
    db = Database(db_url, pool_size=1)
    try:
        with db.session() as s:
            tasks = list(s.scalars(select(Task).order_by(Task.id)))
            if task is not None:
                tasks = [t for t in tasks if str(t.id) == str(task) or t.name == str(task)]
                if not tasks:
                    raise DataError(f"no task named or numbered {task!r}", source=db_url, field="task")
            out: list[dict] = []
            skipped: dict[str, int] = defaultdict(int)
            for t in tasks:
                if t.question_type in KINDS["preferences"]:
                    recs, sk = export_records(s, t, "preferences", aggregate if t.question_type != "edit" else "none",
                                              include_gold, ties)
                    out += recs
                    for k, v in sk.items():
                        skipped[k] += v
            if skipped:
                print(f"load_preferences: skipped {dict(skipped)} labels that give no preference pair")
            return out
    finally:
        db.dispose()

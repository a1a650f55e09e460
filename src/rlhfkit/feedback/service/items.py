"""Items: import records (prompt + responses, optional id, gold answer, meta) checked and stored."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from rlhfkit.errors import DataError
from rlhfkit.feedback.models import Item, Task, User
from rlhfkit.feedback.schemas import (
    MAX_RESPONSES,
    MAX_TEXT,
    json_text_problem,
    name_problem,
    text_problem,
)
from rlhfkit.feedback.service.answers import canonical_answer
from rlhfkit.feedback.service.audit import audit
from rlhfkit.feedback.service.errors import InvalidAnswer


def _record_responses(rec: dict, source: str, line: int) -> list[str]:
    if "responses" in rec:
        responses = rec["responses"]
    elif "response" in rec:
        responses = [rec["response"]]
    elif "chosen" in rec and "rejected" in rec:
        responses = [rec["chosen"], rec["rejected"]]
    elif "completion" in rec:
        responses = [rec["completion"]]
    else:
        raise DataError("needs 'responses' (list), 'response', 'completion' or 'chosen'+'rejected'",
                        source=source, line=line, field="responses")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise DataError("must be a non-empty list of strings", source=source, line=line, field="responses")
    if len(responses) > MAX_RESPONSES or any(len(r) > MAX_TEXT for r in responses):
        raise DataError(f"at most {MAX_RESPONSES} responses of {MAX_TEXT} characters", source=source,
                        line=line, field="responses")
    for i, r in enumerate(responses):
        if text_problem(r):
            raise DataError(text_problem(r), source=source, line=line, field=f"responses[{i}]")
    return responses


def _record_gold(task: Task, responses: list[str], gold: Any, source: str, line: int) -> dict:
    # gold answers in a file name responses by their file order: pairwise "a"/"b" (or
    # left/right), other types the same fields as a submission with responses in file order
    if task.question_type == "pairwise" and isinstance(gold, dict) and gold.get("choice") in ("a", "b"):
        gold = {"choice": {"a": "left", "b": "right"}[gold["choice"]]}
    try:
        return canonical_answer(task, responses, gold, list(range(len(responses))))
    except InvalidAnswer as e:
        raise DataError(str(e), source=source, line=line, field="gold") from e


def item_from_record(task: Task, rec: Any, source: str = "<records>", line: int = 0) -> Item:
    """Validate one import record (prompt + responses [+ id, gold, meta]) into an Item."""
    if not isinstance(rec, dict):
        raise DataError("each record must be a JSON object", source=source, line=line)
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_TEXT:
        raise DataError(f"must be a non-empty string of at most {MAX_TEXT} characters", source=source,
                        line=line, field="prompt")
    if text_problem(prompt):
        raise DataError(text_problem(prompt), source=source, line=line, field="prompt")
    responses = _record_responses(rec, source, line)
    rid, meta = rec.get("id"), rec.get("meta") or {}
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int) or name_problem(str(rid))
                            or len(str(rid)) > 128):
        raise DataError("must be a string or integer of at most 128 characters, without control characters",
                        source=source, line=line, field="id")
    if not isinstance(meta, dict) or json_text_problem(meta) or len(json.dumps(meta)) > MAX_TEXT:
        raise DataError(f"must be a JSON object of at most {MAX_TEXT} characters with storable text "
                        f"({json_text_problem(meta) or 'not an object or too large'})", source=source, line=line,
                        field="meta")
    need = {"pairwise": (2, 2), "ranking": (2, MAX_RESPONSES)}.get(task.question_type, (1, MAX_RESPONSES))
    if not need[0] <= len(responses) <= need[1]:
        raise DataError(f"a {task.question_type} item needs {need[0]}..{need[1]} responses, got {len(responses)}",
                        source=source, line=line, field="responses")
    item = Item(task_id=task.id, prompt=prompt, responses=responses, meta=meta,
                external_id=None if rid is None else str(rid))
    if rec.get("gold") is not None:
        item.gold_value = _record_gold(task, responses, rec["gold"], source, line)
        item.is_gold = True
    return item


def import_records(s: Session, task: Task, records: Iterable[Any], source: str = "<records>",
                   actor: User | None = None, **audit_detail: Any) -> int:
    """Add items from import records (all or nothing: any bad record raises DataError)."""
    items = [item_from_record(task, rec, source, i + 1) for i, rec in enumerate(records)]
    s.add_all(items)
    s.flush()
    audit(s, actor, "task.import", task.name, items=len(items), gold=sum(it.is_gold for it in items),
          source=source[-128:], **audit_detail)
    return len(items)


def read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 (byte {e.start + 1})", source=path, line=n) from None
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg})", source=path, line=n) from e
    return out


def get_item(s: Session, item_id: int) -> Item:
    """Item `item_id`; LookupError when there is none."""
    item = s.get(Item, item_id)
    if item is None:
        raise LookupError(f"item {item_id} not found")
    return item

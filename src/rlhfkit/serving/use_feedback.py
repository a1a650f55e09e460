"""Feedback from real use, tied to a served response, and its export for training.

The HTTP API (`router`, mounted by the policy server under ``/v1``):

    POST /v1/feedback                 {"response_id": "chatcmpl-...", "kind": "thumbs", "thumbs": "up"}
                                      kind thumbs: "thumbs": "up" | "down"; rating: "rating": 1..5;
                                      edit: "text" (the corrected response); comment: "text";
                                      pairwise: "other_response_id" and "chosen" (one of the two
                                      ids: regenerate and choose, or two arms side by side).
                                      "choice" picks a choice of an n > 1 response (default 0);
                                      "idempotency_key" makes a retried POST record it once.
    GET  /v1/feedback/{response_id}   the feedback given on a response

Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

Exports (`export_feedback`) produce the TRL layouts the recipes read, with the arm and model
version of each response kept as extra columns:

- ``preferences`` (reward, DPO): prompt / chosen / rejected from pairwise picks and from edits
  (the edited text is chosen over the response it corrects);
- ``kto``: prompt / completion / label from thumbs (up: desirable), one record per thumbed choice;
- ``sft``: prompt / completion from edits; ``ratings``: prompt / completion / rating;
  ``comments``: prompt / completion / comment.

Chat requests export as conversations (prompt: the request's messages; chosen, rejected and
completion: one assistant message), completion requests as plain text. The latest thumbs or
rating on a choice wins. Texts are redacted (e-mail addresses, phone numbers) unless asked not to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError

from rlhfkit.feedback.db import Database
from rlhfkit.serving.tables import ServedResponse, UseFeedback
from rlhfkit.serving.traffic import redact_value

EXPORT_KINDS = ("preferences", "kto", "sft", "ratings", "comments")
TEXT_COLUMNS = {"prompt", "chosen", "rejected", "completion", "comment"}  # what redaction touches


class FeedbackIn(BaseModel):
    response_id: str = Field(min_length=1, max_length=64)
    kind: Literal["thumbs", "rating", "edit", "comment", "pairwise"]
    thumbs: Literal["up", "down"] | None = None
    rating: int | None = Field(default=None, ge=1, le=5)
    text: str | None = Field(default=None, max_length=100_000)
    choice: int = Field(default=0, ge=0, le=127)
    other_response_id: str | None = Field(default=None, max_length=64)
    chosen: str | None = Field(default=None, max_length=64)
    idempotency_key: str | None = Field(default=None, max_length=64)


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _value(body: FeedbackIn) -> tuple[dict | None, str | None, str | None]:
    """The stored value of a feedback body, or (None, message, field) when it lacks a field."""
    if body.kind == "thumbs":
        if body.thumbs is None:
            return None, "thumbs feedback needs 'thumbs': 'up' or 'down'", "thumbs"
        return {"up": body.thumbs == "up", "choice": body.choice}, None, None
    if body.kind == "rating":
        if body.rating is None:
            return None, "rating feedback needs 'rating': an integer from 1 to 5", "rating"
        return {"rating": body.rating, "choice": body.choice}, None, None
    if body.kind in ("edit", "comment"):
        if not body.text or not body.text.strip():
            return None, f"{body.kind} feedback needs a non-empty 'text'", "text"
        return {"text": body.text, "choice": body.choice}, None, None
    if not body.other_response_id:
        return None, "pairwise feedback needs 'other_response_id' (the other response shown)", "other_response_id"
    if body.other_response_id == body.response_id:
        return None, "a pairwise pick compares two different responses", "other_response_id"
    if body.chosen not in (body.response_id, body.other_response_id):
        return None, "'chosen' must be 'response_id' or 'other_response_id' of this pick", "chosen"
    return {"chosen": body.chosen, "choice": body.choice}, None, None


def record_feedback(db: Database, body: FeedbackIn, flush: Callable[[], None] | None = None
                    ) -> tuple[int, dict] | JSONResponse:
    """Store one piece of feedback; returns (HTTP status, stored row) or an error response.
    `flush` writes out queued traffic (a response may still be on its way to the database)."""
    value, message, field = _value(body)
    if value is None:
        return error(400, message, field)
    ids = [body.response_id] + ([body.other_response_id] if body.other_response_id else [])
    served = _served(db, ids)
    if len(served) < len(ids) and flush is not None:
        flush()
        served = _served(db, ids)
    for rid, field in zip(ids, ("response_id", "other_response_id")):
        if rid not in served:
            return error(404, f"no served response {rid!r} (unknown, or deleted by retention)", field, "not_found")
    n_choices = len(served[body.response_id].response)
    if body.kind != "pairwise" and body.choice >= n_choices:
        return error(400, f"'choice' {body.choice} is out of range: the response has {n_choices} choice(s)", "choice")
    row = UseFeedback(response_id=body.response_id, other_response_id=body.other_response_id, kind=body.kind,
                      value=value, user_key=served[body.response_id].user_key,
                      idempotency_key=body.idempotency_key)
    try:
        with db.session() as s:
            s.add(row)
            s.flush()
            return 201, _as_dict(row)
    except IntegrityError:
        if body.idempotency_key is None:
            raise
        with db.read_session() as s:
            old = s.scalar(select(UseFeedback).where(UseFeedback.response_id == body.response_id,
                                                     UseFeedback.idempotency_key == body.idempotency_key))
        return 200, _as_dict(old)


def _served(db: Database, ids: list[str]) -> dict[str, ServedResponse]:
    with db.read_session() as s:
        return {r.response_id: r for r in s.scalars(select(ServedResponse).where(ServedResponse.response_id.in_(ids)))}


def _as_dict(row: UseFeedback) -> dict:
    return {"id": row.id, "response_id": row.response_id, "other_response_id": row.other_response_id,
            "kind": row.kind, "value": row.value, "created_at": row.created_at.isoformat()}


def make_router(db: Database, flush: Callable[[], None] | None = None, dependencies: list | None = None) -> APIRouter:
    """The feedback API over `db`; `dependencies` (e.g. the server's API-key check) guard every route."""
    router = APIRouter(dependencies=dependencies or [])

    @router.post("/feedback", status_code=201)
    def post_feedback(body: FeedbackIn):
        out = record_feedback(db, body, flush)
        if isinstance(out, JSONResponse):
            return out
        status, row = out
        return JSONResponse({"object": "feedback", **row}, status)

    @router.get("/feedback/{response_id}")
    def get_feedback(response_id: str, request: Request):
        with db.read_session() as s:
            rows = s.scalars(select(UseFeedback).where(or_(UseFeedback.response_id == response_id,
                                                           UseFeedback.other_response_id == response_id))
                             .order_by(UseFeedback.id)).all()
        return {"object": "list", "data": [_as_dict(r) for r in rows]}

    return router


def mount_experiment_routes(app, db: Database, traffic_log=None, dependencies: list | None = None,
                            prefix: str = "/v1") -> None:
    """Add the feedback API to a FastAPI `app`; `traffic_log` (a TrafficLog) is flushed when
    feedback names a response not yet written."""
    app.include_router(make_router(db, traffic_log.flush if traffic_log is not None else None, dependencies),
                       prefix=prefix)


# ---------------------------------------------------------------------------------------------
# export


def _prompt(r: ServedResponse) -> Any:
    return r.request if r.endpoint == "chat" else str(r.request)


def _reply(r: ServedResponse, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if r.endpoint == "chat" else text


def _text(r: ServedResponse, choice: int) -> str:
    return r.response[choice] if 0 <= choice < len(r.response) else ""


def _meta(r: ServedResponse, prefix: str = "") -> dict:
    return {f"{prefix}arm": r.arm, f"{prefix}model_version": r.model_version, f"{prefix}response_id": r.response_id}


def export_feedback(db: Database, kind: str, experiment: str | None = None, redacted: bool = True,
                    region: str = "US") -> list[dict]:
    """Records of `kind` (one of EXPORT_KINDS) from the feedback on served responses."""
    if kind not in EXPORT_KINDS:
        raise ValueError(f"unknown export kind {kind!r}; choose one of {', '.join(EXPORT_KINDS)}")
    with db.read_session() as s:
        q = (select(UseFeedback, ServedResponse).join(ServedResponse, ServedResponse.response_id == UseFeedback.response_id)
             .order_by(UseFeedback.id))
        if experiment is not None:
            q = q.where(ServedResponse.experiment == experiment)
        rows = s.execute(q).all()
        others = {r.response_id: r for r in s.scalars(select(ServedResponse).where(
            ServedResponse.response_id.in_([f.other_response_id for f, _ in rows if f.other_response_id])))}
    out = _BUILDERS[kind](rows, others)
    if redacted:
        for r in out:
            for k in TEXT_COLUMNS.intersection(r):
                r[k] = redact_value(r[k], region)
    return out


def _preferences(rows: list, others: dict) -> list[dict]:
    out = []
    for f, r in rows:
        if f.kind == "pairwise" and f.other_response_id in others:
            o = others[f.other_response_id]
            win, lose = (r, o) if f.value["chosen"] == r.response_id else (o, r)
            out.append({"prompt": _prompt(r), "chosen": _reply(win, _text(win, 0)),
                        "rejected": _reply(lose, _text(lose, 0)), "source": "pairwise", "experiment": r.experiment,
                        **_meta(win, "chosen_"), **_meta(lose, "rejected_")})
        elif f.kind == "edit" and f.value["text"].strip() != _text(r, f.value["choice"]).strip():
            out.append({"prompt": _prompt(r), "chosen": _reply(r, f.value["text"]),
                        "rejected": _reply(r, _text(r, f.value["choice"])), "source": "edit",
                        "experiment": r.experiment, "chosen_arm": None, "chosen_model_version": "human_edit",
                        "chosen_response_id": None, **_meta(r, "rejected_")})
    return out


def _latest(rows: list, kind: str) -> list:
    """The last feedback of `kind` per (response, choice): a user may change their mind."""
    last = {}
    for f, r in rows:
        if f.kind == kind:
            last[(f.response_id, f.value["choice"])] = (f, r)
    return list(last.values())


def _kto(rows: list, others: dict) -> list[dict]:
    return [{"prompt": _prompt(r), "completion": _reply(r, _text(r, f.value["choice"])), "label": bool(f.value["up"]),
             "experiment": r.experiment, **_meta(r)} for f, r in _latest(rows, "thumbs")]


def _sft(rows: list, others: dict) -> list[dict]:
    return [{"prompt": _prompt(r), "completion": _reply(r, f.value["text"]), "experiment": r.experiment, **_meta(r)}
            for f, r in rows if f.kind == "edit"]


def _ratings(rows: list, others: dict) -> list[dict]:
    return [{"prompt": _prompt(r), "completion": _reply(r, _text(r, f.value["choice"])), "rating": f.value["rating"],
             "experiment": r.experiment, **_meta(r)} for f, r in _latest(rows, "rating")]


def _comments(rows: list, others: dict) -> list[dict]:
    return [{"prompt": _prompt(r), "completion": _reply(r, _text(r, f.value["choice"])), "comment": f.value["text"],
             "experiment": r.experiment, **_meta(r)} for f, r in rows if f.kind == "comment"]


_BUILDERS = {"preferences": _preferences, "kto": _kto, "sft": _sft, "ratings": _ratings, "comments": _comments}

"""The admin JSON API under /api/admin: users, roles, tokens, audit log, tasks, items, review,
quality control and export."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from rlhfkit.feedback import export as ex
from rlhfkit.feedback.models import User
from rlhfkit.feedback.schemas import MemberBody, ReviewBody, RoleBody, TaskBody, TokenBody, UserBody
from rlhfkit.feedback.service import accounts, items, labels, review, tasks
from rlhfkit.feedback.service.audit import audit, recent_events
from rlhfkit.feedback.service.errors import Conflict
from rlhfkit.feedback.web import (
    AUTH,
    AuthError,
    PathId,
    PathName,
    authenticate,
    check_csrf,
    content_disposition,
    db_of,
    label_payload,
    require_admin,
    token_payload,
)

router = APIRouter(prefix="/api/admin", dependencies=AUTH)


def _admin(request: Request, s: Session, write: bool = False) -> User:
    user, csrf = authenticate(request, s)
    require_admin(user)
    if write:
        check_csrf(request, csrf)
    return user


def _may_manage(actor: User, role: str) -> None:
    # admins manage annotators; only an owner creates, changes or disables admins and owners
    if role != "annotator" and actor.role != "owner":
        raise AuthError(403, "only an owner can manage admins and owners")


def _user_row(u: User) -> dict:
    return {"id": u.id, "username": u.username, "role": u.role, "active": u.active}


@router.post("/users", status_code=201)
def new_user(body: UserBody, request: Request):
    with db_of(request).session() as s:
        actor = _admin(request, s, write=True)
        _may_manage(actor, body.role)
        return _user_row(accounts.create_user(s, body.username, body.password, body.role, actor=actor,
                                              reveal_lookalike=True))  # only admins reach this route


@router.get("/users")
def list_users(request: Request):
    with db_of(request).read_session() as s:
        _admin(request, s)
        return [_user_row(u) for u in accounts.all_users(s)]


@router.post("/users/{username}/role")
def set_role(username: PathName, body: RoleBody, request: Request):
    with db_of(request).session() as s:
        actor = _admin(request, s, write=True)
        user = accounts.named_user(s, username)
        _may_manage(actor, user.role)
        _may_manage(actor, body.role)
        accounts.set_role(s, user, body.role, actor)
        return _user_row(user)


@router.post("/users/{username}/tokens", status_code=201)
def new_token(username: PathName, request: Request, body: TokenBody | None = None):
    body = body or TokenBody(name="admin-issued")
    with db_of(request).session() as s:
        actor = _admin(request, s, write=True)
        user = accounts.named_user(s, username)
        _may_manage(actor, user.role)
        days = accounts.token_days(user, body.expires_days)
        return {"token": accounts.issue_token(s, user, body.name, days, actor=actor, expires_days=days)}


@router.get("/users/{username}/tokens")
def user_tokens(username: PathName, request: Request):
    with db_of(request).read_session() as s:
        actor = _admin(request, s)
        user = accounts.named_user(s, username)
        _may_manage(actor, user.role)
        return [token_payload(t) for t in accounts.tokens_of(s, user)]


@router.post("/users/{username}/{action}")
def set_active(username: PathName, action: Annotated[str, Path(pattern="^(disable|enable)$")], request: Request):
    with db_of(request).session() as s:
        actor = _admin(request, s, write=True)
        user = accounts.named_user(s, username)
        _may_manage(actor, user.role)
        if user.id == actor.id:
            raise Conflict("you cannot disable yourself")
        # labels stay; disabling also revokes every token and session, for good
        accounts.set_active(s, user, action == "enable", actor)
        return _user_row(user)


@router.get("/audit")
def audit_log(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 200):
    with db_of(request).read_session() as s:
        _admin(request, s)
        return [{"id": e.id, "at": e.at.isoformat() + "Z", "actor": name, "action": e.action, "target": e.target,
                 "detail": e.detail, "client": e.client} for e, name in recent_events(s, limit)]


@router.post("/tasks/{task_id}/members", status_code=201)
def add_member(task_id: PathId, body: MemberBody, request: Request):
    with db_of(request).session() as s:
        actor = _admin(request, s, write=True)
        tasks.add_member(s, tasks.get_task(s, task_id), accounts.named_user(s, body.username), actor)
        return {"ok": True}


@router.post("/tasks/{task_id}/close")
def close_task(task_id: PathId, request: Request):
    with db_of(request).session() as s:
        actor = _admin(request, s, write=True)
        tasks.close_task(s, tasks.get_task(s, task_id), actor)
    request.app.state.tasks.invalidate(task_id)  # after the commit: a re-read sees it closed
    return {"ok": True, "id": task_id, "open_to_all": False}


@router.get("/tasks/{task_id}/review")
def review_queue(task_id: PathId, request: Request,
                 status: Annotated[str, Query(pattern="^(pending|accepted|rejected)$")] = "pending"):
    with db_of(request).read_session() as s:
        _admin(request, s)
        tasks.get_task(s, task_id)
        return [{**label_payload(lab), "annotator": name}
                for lab, name in review.labels_with_annotators(s, task_id, status)]


@router.post("/labels/{label_id}/review")
def review_one(label_id: PathId, body: ReviewBody, request: Request):
    with db_of(request).session() as s:
        actor = _admin(request, s, write=True)
        label = labels.get_label(s, label_id)
        return label_payload(review.review_label(s, label, actor, body.decision, body.reason))


@router.post("/tasks", status_code=201)
def new_task(body: TaskBody, request: Request):
    with db_of(request).session() as s:
        actor = _admin(request, s, write=True)
        task = tasks.create_task(s, **body.model_dump(), actor=actor)
        return {"id": task.id, "name": task.name}


@router.post("/tasks/{task_id}/items", status_code=201)
def add_items(task_id: PathId, records: list[Any], request: Request):
    with db_of(request).session() as s:
        actor = _admin(request, s, write=True)
        return {"imported": items.import_records(s, tasks.get_task(s, task_id), records, source="request body",
                                                 actor=actor)}


@router.get("/tasks/{task_id}/labels")
def all_labels(task_id: PathId, request: Request):
    with db_of(request).read_session() as s:
        _admin(request, s)
        return [{**label_payload(lab), "annotator": name} for lab, name in review.labels_with_annotators(s, task_id)]


@router.get("/tasks/{task_id}/qc")
def qc(task_id: PathId, request: Request):
    with db_of(request).read_session() as s:
        _admin(request, s)
        return ex.task_qc(s, tasks.get_task(s, task_id))


@router.get("/tasks/{task_id}/export")
def export(task_id: PathId, request: Request, kind: str = "preferences", aggregate: str = "none",
           ties: str = "skip", status: Annotated[str, Query(pattern="^(all|accepted)$")] = "all"):
    with db_of(request).session() as s:
        actor = _admin(request, s)
        task = tasks.get_task(s, task_id)
        try:
            records, skipped = ex.export_records(s, task, kind, aggregate, ties=ties,
                                                 only_accepted=status == "accepted")
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        audit(s, actor, "task.export", task.name, kind=kind, aggregate=aggregate, status=status,
              records=len(records))
    body = "".join(ex.json_line(r) for r in records)
    return Response(body, media_type="application/x-ndjson",
                    headers={"Content-Disposition": content_disposition(f"{task.name}-{kind}.jsonl"),
                             "X-Skipped": json.dumps(skipped)})

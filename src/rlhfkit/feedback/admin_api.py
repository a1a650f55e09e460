"""The admin JSON API under /api/admin: users, roles, tokens, audit log, tasks, items, review,
quality control and export."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import HTTPException, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhfkit.feedback import accounts
from rlhfkit.feedback import service as svc
from rlhfkit.feedback.models import (
    ApiToken,
    AuditEvent,
    Label,
    User,
)
from rlhfkit.feedback.schemas import (
    MemberBody,
    ReviewBody,
    RoleBody,
    TaskBody,
    TokenBody,
    UserBody,
)
from rlhfkit.feedback.security import (
    create_api_token,
)
from rlhfkit.feedback.web import (
    AuthError,
    PathId,
    PathName,
    authenticate,
    check_csrf,
    content_disposition,
    label_payload,
    require_admin,
    task_or_404,
)


def admin_api_routes(app, db, templates, rng, secure, auth):
    from rlhfkit.feedback import export as ex

    def admin(request: Request, s: Session, write: bool = False) -> User:
        user, csrf = authenticate(request, s)
        require_admin(user)
        if write:
            check_csrf(request, csrf)
        return user

    def may_manage(actor: User, role: str) -> None:
        # admins manage annotators; only an owner creates, changes or disables admins and owners
        if role != "annotator" and actor.role != "owner":
            raise AuthError(403, "only an owner can manage admins and owners")

    def named_user(s: Session, username: str) -> User:
        user = svc.find_user(s, username)
        if user is None:
            raise LookupError(f"user {username!r} not found")
        return user

    def user_row(u: User) -> dict:
        return {"id": u.id, "username": u.username, "role": u.role, "active": u.active}

    @app.post("/api/admin/users", status_code=201, dependencies=auth)
    def new_user(body: UserBody, request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            may_manage(actor, body.role)
            return user_row(svc.create_user(s, body.username, body.password, body.role, actor=actor,
                                            reveal_lookalike=True))  # only admins reach this route

    @app.get("/api/admin/users", dependencies=auth)
    def list_users(request: Request):
        with db.read_session() as s:
            admin(request, s)
            return [user_row(u) for u in s.scalars(select(User).order_by(User.id))]

    @app.post("/api/admin/users/{username}/role", dependencies=auth)
    def set_role(username: PathName, body: RoleBody, request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            user = named_user(s, username)
            may_manage(actor, user.role)
            may_manage(actor, body.role)
            accounts.set_role(s, user, body.role, actor)
            return user_row(user)

    @app.post("/api/admin/users/{username}/tokens", status_code=201, dependencies=auth)
    def new_token(username: PathName, request: Request, body: TokenBody | None = None):
        body = body or TokenBody(name="admin-issued")
        with db.session() as s:
            actor = admin(request, s, write=True)
            user = named_user(s, username)
            may_manage(actor, user.role)
            days = accounts.token_days(user, body.expires_days)
            svc.audit(s, actor, "token.issue", user.username, name=body.name, expires_days=days)
            return {"token": create_api_token(s, user, body.name, days)}

    @app.get("/api/admin/users/{username}/tokens", dependencies=auth)
    def user_tokens(username: PathName, request: Request):
        with db.read_session() as s:
            actor = admin(request, s)
            user = named_user(s, username)
            may_manage(actor, user.role)
            return [{"id": t.id, "name": t.name, "revoked": t.revoked, "created_at": t.created_at.isoformat() + "Z",
                     "expires_at": None if t.expires_at is None else t.expires_at.isoformat() + "Z"}
                    for t in s.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id))]

    @app.post("/api/admin/users/{username}/{action}", dependencies=auth)
    def set_active(username: PathName, action: Annotated[str, Path(pattern="^(disable|enable)$")], request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            user = named_user(s, username)
            may_manage(actor, user.role)
            if user.id == actor.id:
                raise svc.Conflict("you cannot disable yourself")
            # labels stay; disabling also revokes every token and session, for good
            accounts.set_active(s, user, action == "enable", actor)
            return user_row(user)

    @app.get("/api/admin/audit", dependencies=auth)
    def audit_log(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 200):
        with db.read_session() as s:
            admin(request, s)
            rows = s.execute(select(AuditEvent, User.username).outerjoin(User, User.id == AuditEvent.actor_id)
                             .order_by(AuditEvent.id.desc()).limit(limit))
            return [{"id": e.id, "at": e.at.isoformat() + "Z", "actor": name, "action": e.action, "target": e.target,
                     "detail": e.detail, "client": e.client} for e, name in rows]

    @app.post("/api/admin/tasks/{task_id}/members", status_code=201, dependencies=auth)
    def add_member(task_id: PathId, body: MemberBody, request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            svc.add_member(s, task_or_404(s, task_id), named_user(s, body.username), actor)
            return {"ok": True}

    @app.post("/api/admin/tasks/{task_id}/close", dependencies=auth)
    def close_task(task_id: PathId, request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            svc.close_task(s, task_or_404(s, task_id), actor)
            return {"ok": True, "id": task_id, "open_to_all": False}

    @app.get("/api/admin/tasks/{task_id}/review", dependencies=auth)
    def review_queue(task_id: PathId, request: Request,
                     status: Annotated[str, Query(pattern="^(pending|accepted|rejected)$")] = "pending"):
        with db.read_session() as s:
            admin(request, s)
            task_or_404(s, task_id)
            return [{**label_payload(lab), "annotator": name} for lab, name in s.execute(
                select(Label, User.username).join(User, User.id == Label.user_id)
                .where(Label.task_id == task_id, Label.review_status == status).order_by(Label.id))]

    @app.post("/api/admin/labels/{label_id}/review", dependencies=auth)
    def review(label_id: PathId, body: ReviewBody, request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            label = s.get(Label, label_id)
            if label is None:
                raise LookupError(f"label {label_id} not found")
            return label_payload(svc.review_label(s, label, actor, body.decision, body.reason))

    @app.post("/api/admin/tasks", status_code=201, dependencies=auth)
    def new_task(body: TaskBody, request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            task = svc.create_task(s, **body.model_dump(), actor=actor)
            return {"id": task.id, "name": task.name}

    @app.post("/api/admin/tasks/{task_id}/items", status_code=201, dependencies=auth)
    def add_items(task_id: PathId, records: list[Any], request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            return {"imported": svc.import_records(s, task_or_404(s, task_id), records, source="request body",
                                                   actor=actor)}

    @app.get("/api/admin/tasks/{task_id}/labels", dependencies=auth)
    def all_labels(task_id: PathId, request: Request):
        with db.read_session() as s:
            admin(request, s)
            rows = s.execute(select(Label, User.username).join(User, User.id == Label.user_id)
                             .where(Label.task_id == task_id).order_by(Label.id))
            return [{**label_payload(lab), "annotator": name} for lab, name in rows]

    @app.get("/api/admin/tasks/{task_id}/qc", dependencies=auth)
    def qc(task_id: PathId, request: Request):
        with db.read_session() as s:
            admin(request, s)
            return ex.task_qc(s, task_or_404(s, task_id))

    @app.get("/api/admin/tasks/{task_id}/export", dependencies=auth)
    def export(task_id: PathId, request: Request, kind: str = "preferences", aggregate: str = "none",
               ties: str = "skip", status: Annotated[str, Query(pattern="^(all|accepted)$")] = "all"):
        with db.session() as s:
            actor = admin(request, s)
            task = task_or_404(s, task_id)
            try:
                records, skipped = ex.export_records(s, task, kind, aggregate, ties=ties,
                                                     only_accepted=status == "accepted")
            except ValueError as e:
                raise HTTPException(422, str(e)) from e
            svc.audit(s, actor, "task.export", task.name, kind=kind, aggregate=aggregate, status=status,
                      records=len(records))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": content_disposition(f"{task.name}-{kind}.jsonl"),
                                 "X-Skipped": json.dumps(skipped)})

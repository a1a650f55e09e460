"""The annotator's JSON API under /api: login, tokens, password, tasks, /next, labels."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from rlhfkit.feedback import accounts
from rlhfkit.feedback import service as svc
from rlhfkit.feedback.guard import (
    LoginGuard,
)
from rlhfkit.feedback.models import (
    ApiToken,
    Label,
    LabelVersion,
    User,
)
from rlhfkit.feedback.schemas import (
    CorrectionBody,
    LabelBody,
    LoginBody,
    PasswordBody,
    SkipBody,
    TokenBody,
)
from rlhfkit.feedback.security import (
    create_api_token,
    hash_password,
    verify_password,
)
from rlhfkit.feedback.web import (
    LOGIN_TOKEN_DAYS,
    AuthError,
    PathId,
    QueryId,
    authenticate,
    check_csrf,
    client_host,
    credential_digests,
    item_payload,
    label_payload,
    login_checker,
    visible_task,
)


def api_routes(app, db, templates, rng, secure, auth):
    check_login = login_checker(app, db)

    @app.post("/api/login")
    async def api_login(body: LoginBody, request: Request):
        user = await check_login(request, body.username, body.password, "api")
        if user is None:
            raise AuthError(401, "wrong username or password")
        token = await run_in_threadpool(_new_token, user.id, body.token_name)
        return {"token": token, "username": user.username, "role": user.role}

    def _new_token(user_id: int, name: str) -> str:
        with db.session() as s:
            user = s.get(User, user_id)
            svc.audit(s, user, "token.issue", user.username, name=name, via="login")
            return create_api_token(s, user, name, expires_days=LOGIN_TOKEN_DAYS)

    def token_row(t: ApiToken) -> dict:
        return {"id": t.id, "name": t.name, "created_at": t.created_at.isoformat() + "Z", "revoked": t.revoked,
                "expires_at": None if t.expires_at is None else t.expires_at.isoformat() + "Z"}

    @app.get("/api/tokens", dependencies=auth)
    def my_tokens(request: Request):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            return [token_row(t) for t in s.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id))]

    @app.post("/api/tokens", status_code=201, dependencies=auth)
    def issue_my_token(body: TokenBody, request: Request):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf)
            days = accounts.token_days(user, body.expires_days)
            svc.audit(s, user, "token.issue", user.username, name=body.name, expires_days=days)
            return {"token": create_api_token(s, user, body.name, days)}

    @app.delete("/api/tokens/{token_id}", dependencies=auth)
    def revoke_token(token_id: PathId, request: Request):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf)
            tok = s.get(ApiToken, token_id)
            if tok is None or (tok.user_id != user.id and not svc.is_admin(user)):
                raise LookupError(f"token {token_id} not found")
            if tok.user_id != user.id and tok.user.role != "annotator" and user.role != "owner":
                raise AuthError(403, "only an owner can manage the tokens of admins and owners")
            tok.revoked = True
            svc.audit(s, user, "token.revoke", tok.user.username, token_id=tok.id, name=tok.name)
            return token_row(tok)

    @app.post("/api/me/password", dependencies=auth)
    async def change_password(body: PasswordBody, request: Request):
        user, csrf = request.state.principal
        check_csrf(request, csrf)
        # The old password is a login in disguise: the same limits, and the Argon2 checks run
        # in the guard's pool, before any transaction, so no write lock waits on them.
        guard: LoginGuard = app.state.login_guard
        account = svc.username_key(user.username)[:64]
        ip = client_host(request)
        await guard.admit(ip, account)
        if not await guard.run(verify_password, user.password_hash, body.old_password):
            guard.failed(account, ip)
            raise AuthError(403, "the current password is wrong")
        await run_in_threadpool(svc.check_password_policy, body.new_password, user.username)
        new_hash = await guard.run(hash_password, body.new_password)
        return await run_in_threadpool(_store_password, request, user.password_hash, new_hash)

    def _store_password(request: Request, old_hash: str, new_hash: str) -> dict:
        with db.session() as s:
            user, _ = authenticate(request, s)
            s.refresh(user)
            if user.password_hash != old_hash:  # changed by a concurrent request since the check
                raise svc.Conflict("the password was changed meanwhile; log in again with the new one")
            user.password_hash = new_hash
            # every other credential ends (browser sessions, API tokens including /api/login's):
            # whoever knew the old password or held a token is logged out; the credential that
            # made the change stays
            keep_token, keep_session = credential_digests(request)
            revoked = accounts.revoke_credentials(s, user, keep_token=keep_token, keep_session=keep_session)
            svc.audit(s, user, "user.password", user.username, tokens_revoked=revoked)
            return {"ok": True, "tokens_revoked": revoked}

    @app.get("/api/me", dependencies=auth)
    def me(request: Request):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            return {"id": user.id, "username": user.username, "role": user.role}

    @app.get("/api/tasks", dependencies=auth)
    def tasks(request: Request):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            return [{"id": t.id, "name": t.name, "question_type": t.question_type, "overlap": t.overlap,
                     "progress": svc.progress(s, t, user)} for t in svc.visible_tasks(s, user)]

    single_statement = db.backend == "postgresql"  # see service: single-statement paths

    @app.get("/api/tasks/{task_id}/next", dependencies=auth)
    def next_item(task_id: PathId, request: Request):
        r, gold = rng(), None
        if single_statement:
            with db.lookup_session() as s:  # autocommit
                user, _ = authenticate(request, s)
                task = visible_task(s, task_id, user, app.state.tasks)
                try:
                    item, assignment = svc.next_assignment_autocommit(s, task, user, r)
                    return item_payload(task, item, assignment.display_order)
                except svc.NeedsTransaction as e:
                    gold = e.gold
        with db.session() as s:
            user, _ = authenticate(request, s)
            task = visible_task(s, task_id, user, app.state.tasks)
            got = svc.next_assignment(s, task, user, r, app.state.scorer, gold=gold)
            if got is None:
                return Response(status_code=204)
            item, assignment = got
            payload = item_payload(task, item, assignment.display_order)
        return payload

    @app.post("/api/tasks/{task_id}/labels", dependencies=auth)
    def submit(task_id: PathId, body: LabelBody, request: Request):
        if single_statement:
            with db.lookup_session() as s:  # autocommit: the label is durable once the statement returns
                user, csrf = authenticate(request, s)
                check_csrf(request, csrf)
                task = visible_task(s, task_id, user, app.state.tasks)
                try:
                    label, replay = svc.submit_label_autocommit(s, task, user, body.item_id, body.value,
                                                                body.idempotency_key, body.strength, body.comment)
                    return JSONResponse({**label_payload(label), "replayed": replay},
                                        status_code=200 if replay else 201)
                except svc.NeedsTransaction:
                    pass
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf)
            task = visible_task(s, task_id, user, app.state.tasks)
            label, replay = svc.submit_label(s, task, user, body.item_id, body.value, body.idempotency_key,
                                             body.duration_ms, body.strength, body.comment)
            s.commit()  # durable before we acknowledge
            out = label_payload(label)
        return JSONResponse({**out, "replayed": replay}, status_code=200 if replay else 201)

    @app.post("/api/tasks/{task_id}/skip", dependencies=auth)
    def skip(task_id: PathId, body: SkipBody, request: Request):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf)
            svc.skip_item(s, visible_task(s, task_id, user, app.state.tasks), user, body.item_id)
            return {"skipped": body.item_id}

    @app.get("/api/labels/mine", dependencies=auth)
    def my_labels(request: Request, task_id: QueryId = None):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            q = select(Label).where(Label.user_id == user.id).order_by(Label.id)
            if task_id is not None:
                q = q.where(Label.task_id == task_id)
            return [label_payload(lab) for lab in s.scalars(q)]

    @app.get("/api/labels/{label_id}", dependencies=auth)
    def get_label(label_id: PathId, request: Request):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            label = s.get(Label, label_id)
            # another annotator's label is reported as missing: not even its existence leaks
            if label is None or (label.user_id != user.id and not svc.is_admin(user)):
                raise LookupError(f"label {label_id} not found")
            return label_payload(label)

    @app.put("/api/labels/{label_id}", dependencies=auth)
    def correct(label_id: PathId, body: CorrectionBody, request: Request):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf)
            label = s.get(Label, label_id)
            if label is None:
                raise LookupError(f"label {label_id} not found")
            return label_payload(svc.correct_label(s, label, user, body.value, body.strength, body.comment))

    @app.get("/api/labels/{label_id}/versions", dependencies=auth)
    def versions(label_id: PathId, request: Request):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            label = s.get(Label, label_id)
            if label is None or (label.user_id != user.id and not svc.is_admin(user)):
                raise LookupError(f"label {label_id} not found")
            old = s.scalars(select(LabelVersion).where(LabelVersion.label_id == label_id).order_by(LabelVersion.version))
            return [{"version": v.version, "value": v.value, "superseded_at": v.created_at.isoformat() + "Z"}
                    for v in old] + [{"version": label.version, "value": label.value, "superseded_at": None}]

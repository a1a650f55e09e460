"""The annotator's JSON API under /api: login, tokens, password, tasks, /next, labels."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from rlhfkit.feedback.schemas import (
    CorrectionBody,
    LabelBody,
    LoginBody,
    PasswordBody,
    SkipBody,
    TokenBody,
)
from rlhfkit.feedback.security import hash_password
from rlhfkit.feedback.service import accounts, assign, fastpath, labels, tasks
from rlhfkit.feedback.web import (
    AUTH,
    LOGIN_TOKEN_DAYS,
    AuthError,
    PathId,
    QueryId,
    authenticate,
    check_csrf,
    check_login,
    check_own_password,
    credential_digests,
    db_of,
    item_payload,
    label_payload,
    rng_of,
    token_payload,
    visible_task,
)

router = APIRouter(prefix="/api")


@router.post("/login")
async def api_login(body: LoginBody, request: Request):
    user = await check_login(request, body.username, body.password, "api")
    if user is None:
        raise AuthError(401, "wrong username or password")
    token = await run_in_threadpool(_new_token, request, user.id, body.token_name)
    return {"token": token, "username": user.username, "role": user.role}


def _new_token(request: Request, user_id: int, name: str) -> str:
    with db_of(request).session() as s:
        return accounts.issue_login_token(s, user_id, name, LOGIN_TOKEN_DAYS)


@router.get("/tokens", dependencies=AUTH)
def my_tokens(request: Request):
    with db_of(request).read_session() as s:
        user, _ = authenticate(request, s)
        return [token_payload(t) for t in accounts.tokens_of(s, user)]


@router.post("/tokens", status_code=201, dependencies=AUTH)
def issue_my_token(body: TokenBody, request: Request):
    with db_of(request).session() as s:
        user, csrf = authenticate(request, s)
        check_csrf(request, csrf)
        days = accounts.token_days(user, body.expires_days)
        return {"token": accounts.issue_token(s, user, body.name, days, actor=user, expires_days=days)}


@router.delete("/tokens/{token_id}", dependencies=AUTH)
def revoke_token(token_id: PathId, request: Request):
    with db_of(request).session() as s:
        user, csrf = authenticate(request, s)
        check_csrf(request, csrf)
        tok, _ = accounts.revoke_token(s, token_id, actor=user)
        return token_payload(tok)


@router.post("/me/password", dependencies=AUTH)
async def change_password(body: PasswordBody, request: Request):
    user, csrf = request.state.principal
    check_csrf(request, csrf)
    # The old password is a login in disguise: the same limits, and the Argon2 checks run in
    # the guard's pool, before any transaction, so no write lock waits on them.
    if not await check_own_password(request, user, body.old_password):
        raise AuthError(403, "the current password is wrong")
    await run_in_threadpool(accounts.check_password_policy, body.new_password, user.username)
    new_hash = await request.app.state.login_guard.run(hash_password, body.new_password)
    return await run_in_threadpool(_store_password, request, user.password_hash, new_hash)


def _store_password(request: Request, old_hash: str, new_hash: str) -> dict:
    with db_of(request).session() as s:
        user, _ = authenticate(request, s)
        keep_token, keep_session = credential_digests(request)  # the credential making the change stays
        revoked = accounts.change_password(s, user, old_hash, new_hash, keep_token, keep_session)
        return {"ok": True, "tokens_revoked": revoked}


@router.get("/me", dependencies=AUTH)
def me(request: Request):
    with db_of(request).read_session() as s:
        user, _ = authenticate(request, s)
        return {"id": user.id, "username": user.username, "role": user.role}


@router.get("/tasks", dependencies=AUTH)
def my_tasks(request: Request):
    with db_of(request).read_session() as s:
        user, _ = authenticate(request, s)
        return [{"id": t.id, "name": t.name, "question_type": t.question_type, "overlap": t.overlap,
                 "progress": tasks.progress(s, t, user)} for t in tasks.visible_tasks(s, user)]


@router.get("/tasks/{task_id}/next", dependencies=AUTH)
def next_item(task_id: PathId, request: Request):
    db, r, gold = db_of(request), rng_of(request), None
    if db.backend == "postgresql":  # the single-statement path first (service.fastpath)
        with db.lookup_session() as s:  # autocommit
            user, _ = authenticate(request, s)
            task = visible_task(request, s, task_id, user)
            try:
                item, assignment = fastpath.next_assignment(s, task, user, r)
                return item_payload(task, item, assignment.display_order)
            except fastpath.NeedsTransaction as e:
                gold = e.gold
    with db.session() as s:
        user, _ = authenticate(request, s)
        task = visible_task(request, s, task_id, user)
        got = assign.next_assignment(s, task, user, r, request.app.state.scorer, gold=gold)
        if got is None:
            return Response(status_code=204)
        item, assignment = got
        payload = item_payload(task, item, assignment.display_order)
    return payload


@router.post("/tasks/{task_id}/labels", dependencies=AUTH)
def submit(task_id: PathId, body: LabelBody, request: Request):
    db = db_of(request)
    if db.backend == "postgresql":
        with db.lookup_session() as s:  # autocommit: the label is durable once the statement returns
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf)
            task = visible_task(request, s, task_id, user)
            try:
                label, replay = fastpath.submit_label(s, task, user, body.item_id, body.value,
                                                      body.idempotency_key, body.strength, body.comment)
                return JSONResponse({**label_payload(label), "replayed": replay}, status_code=200 if replay else 201)
            except fastpath.NeedsTransaction:
                pass
    with db.session() as s:
        user, csrf = authenticate(request, s)
        check_csrf(request, csrf)
        task = visible_task(request, s, task_id, user)
        label, replay = labels.submit_label(s, task, user, body.item_id, body.value, body.idempotency_key,
                                            body.duration_ms, body.strength, body.comment)
        s.commit()  # durable before we acknowledge
        out = label_payload(label)
    return JSONResponse({**out, "replayed": replay}, status_code=200 if replay else 201)


@router.post("/tasks/{task_id}/skip", dependencies=AUTH)
def skip(task_id: PathId, body: SkipBody, request: Request):
    with db_of(request).session() as s:
        user, csrf = authenticate(request, s)
        check_csrf(request, csrf)
        labels.skip_item(s, visible_task(request, s, task_id, user), user, body.item_id)
        return {"skipped": body.item_id}


@router.get("/labels/mine", dependencies=AUTH)
def my_labels(request: Request, task_id: QueryId = None):
    with db_of(request).read_session() as s:
        user, _ = authenticate(request, s)
        return [label_payload(lab) for lab in labels.labels_of(s, user, task_id)]


@router.get("/labels/{label_id}", dependencies=AUTH)
def get_label(label_id: PathId, request: Request):
    with db_of(request).read_session() as s:
        user, _ = authenticate(request, s)
        return label_payload(labels.visible_label(s, label_id, user))


@router.put("/labels/{label_id}", dependencies=AUTH)
def correct(label_id: PathId, body: CorrectionBody, request: Request):
    with db_of(request).session() as s:
        user, csrf = authenticate(request, s)
        check_csrf(request, csrf)
        label = labels.get_label(s, label_id)
        return label_payload(labels.correct_label(s, label, user, body.value, body.strength, body.comment))


@router.get("/labels/{label_id}/versions", dependencies=AUTH)
def versions(label_id: PathId, request: Request):
    with db_of(request).read_session() as s:
        user, _ = authenticate(request, s)
        label = labels.visible_label(s, label_id, user)
        return [{"version": v.version, "value": v.value, "superseded_at": v.created_at.isoformat() + "Z"}
                for v in labels.versions_of(s, label)] + \
            [{"version": label.version, "value": label.value, "superseded_at": None}]

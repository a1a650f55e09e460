"""The server-rendered pages for browsers: login, task list, labelling, corrections, the admin
dashboard and the review queue. Form posts parse their form on the event loop and do their
database work in a worker thread."""

from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from rlhfkit.feedback import export as ex
from rlhfkit.feedback.forms import form_answer, form_extras, review_notice
from rlhfkit.feedback.models import User
from rlhfkit.feedback.schemas import INT_MAX, text_problem
from rlhfkit.feedback.security import same
from rlhfkit.feedback.service import accounts, assign, items, labels, review, tasks
from rlhfkit.feedback.service.errors import Conflict, Forbidden, InvalidAnswer
from rlhfkit.feedback.web import (
    AUTH,
    PRELOGIN_COOKIE,
    SESSION_COOKIE,
    Annotator,
    AuthError,
    Page,
    PathId,
    ReviewStatus,
    authenticate,
    check_csrf,
    check_login,
    db_of,
    item_payload,
    require_admin,
    rng_of,
    visible_task,
)

router = APIRouter()
REVIEW_STATUSES = ("pending", "accepted", "rejected", "all")


def _render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    return request.app.state.templates.TemplateResponse(request, name, context, status_code=status)


def _login_form(request: Request, status: int = 200, error: str | None = None) -> HTMLResponse:
    """The login page with a fresh pre-login CSRF token (a cookie and the form's hidden field)."""
    token = secrets.token_urlsafe(24)
    resp = _render(request, "login.html", status, csrf_token=token, error=error, user=None)
    resp.set_cookie(PRELOGIN_COOKIE, token, httponly=True, samesite="strict", secure=request.app.state.secure_cookies)
    return resp


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request):
    return _login_form(request)


@router.post("/login")
async def login_submit(request: Request):
    form = await request.form()
    if not same(form.get("csrf_token"), request.cookies.get(PRELOGIN_COOKIE)):
        raise AuthError(403, "missing or wrong CSRF token; reload the login page")
    username, password = str(form.get("username", ""))[:64], str(form.get("password", ""))[:1024]
    user = await check_login(request, username, password, "browser")  # Argon2 in its own bounded pool
    return await run_in_threadpool(_login_done, request, user)


def _login_done(request: Request, user: User | None):
    if user is None:
        return _login_form(request, 401, "Wrong username or password.")
    with db_of(request).session() as s:
        secret = accounts.start_login_session(s, user.id)
    resp = RedirectResponse("/admin" if accounts.is_admin(user) else "/", status_code=303)
    resp.set_cookie(SESSION_COOKIE, secret, httponly=True, samesite="strict", secure=request.app.state.secure_cookies)
    resp.delete_cookie(PRELOGIN_COOKIE)
    return resp


@router.post("/logout")
async def logout(request: Request):
    if not request.cookies.get(SESSION_COOKIE):  # API tokens are revoked, not logged out
        raise AuthError(401, "not logged in (no session cookie)")
    form = await request.form()
    return await run_in_threadpool(_logout, request, form)


def _logout(request: Request, form):
    with db_of(request).session() as s:
        _, csrf = authenticate(request, s)
        check_csrf(request, csrf, form.get("csrf_token"))
        if csrf is None:
            raise AuthError(401, "not logged in with a browser session")
        accounts.end_login_session(s, request.cookies[SESSION_COOKIE])
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE)
    return resp


@router.get("/", response_class=HTMLResponse, dependencies=AUTH)
def home(request: Request):
    with db_of(request).read_session() as s:
        user, csrf = authenticate(request, s)
        shown = [(t, tasks.progress(s, t, user)) for t in tasks.visible_tasks(s, user)]
        return _render(request, "home.html", user=user, csrf_token=csrf, tasks=shown)


@router.get("/tasks/{task_id}", response_class=HTMLResponse, dependencies=AUTH)
def label_page(task_id: PathId, request: Request):
    return _label_page(task_id, request)


def _label_page(task_id: int, request: Request, error: str | None = None, status: int = 200) -> HTMLResponse:
    with db_of(request).session() as s:
        user, csrf = authenticate(request, s)
        task = visible_task(request, s, task_id, user)
        got = assign.next_assignment(s, task, user, rng_of(request), request.app.state.scorer)
        prog = tasks.progress(s, task, user)
        item = item_payload(task, got[0], got[1].display_order) if got else None
        s.commit()
        return _render(request, "label.html", status, user=user, csrf_token=csrf, task=task, item=item,
                       progress=prog, error=error)


@router.post("/tasks/{task_id}", dependencies=AUTH)
async def label_submit(task_id: PathId, request: Request):
    form = await request.form()  # parsed on the event loop; the database work runs in a thread
    return await run_in_threadpool(_label_submit, task_id, request, form)


def _label_submit(task_id: int, request: Request, form):
    error = None
    with db_of(request).session() as s:
        user, csrf = authenticate(request, s)
        check_csrf(request, csrf, form.get("csrf_token"))
        task = visible_task(request, s, task_id, user)
        try:
            item_id = int(str(form.get("item_id", "")))
            if not 1 <= item_id <= INT_MAX:
                raise LookupError(f"item {item_id} not found")
            item = items.get_item(s, item_id)
            if form.get("action") == "skip":
                labels.skip_item(s, task, user, item_id)
            else:
                raw = form_answer(task, form, len(item.responses))
                labels.submit_label(s, task, user, item_id, raw, str(form.get("idempotency_key", "")),
                                    **form_extras(form))
            s.commit()
        except (ValueError, InvalidAnswer, Conflict, LookupError) as e:
            s.rollback()
            error = str(e)
    if error is not None:  # re-render outside the write session (it takes the write lock)
        return _label_page(task_id, request, error=error, status=422)
    return RedirectResponse(f"/tasks/{task_id}", status_code=303)


@router.get("/admin", response_class=HTMLResponse, dependencies=AUTH)
def admin_home(request: Request):
    with db_of(request).read_session() as s:
        user, csrf = authenticate(request, s)
        require_admin(user)
        shown = [(t, tasks.progress(s, t)) for t in tasks.all_tasks(s)]
        return _render(request, "admin.html", user=user, csrf_token=csrf, tasks=shown)


@router.get("/admin/tasks/{task_id}", response_class=HTMLResponse, dependencies=AUTH)
def admin_task(task_id: PathId, request: Request):
    with db_of(request).read_session() as s:
        user, csrf = authenticate(request, s)
        require_admin(user)
        task = tasks.get_task(s, task_id)
        report = ex.task_qc(s, task)
        return _render(request, "admin_task.html", user=user, csrf_token=csrf, task=task, report=report,
                       kinds=ex.kinds_for(task.question_type), progress=tasks.progress(s, task))


@router.get("/labels", response_class=HTMLResponse, dependencies=AUTH)
def my_labels_page(request: Request):
    with db_of(request).read_session() as s:
        user, csrf = authenticate(request, s)
        return _render(request, "my_labels.html", user=user, csrf_token=csrf, rows=labels.recent_labels(s, user))


@router.get("/labels/{label_id}/edit", response_class=HTMLResponse, dependencies=AUTH)
def correction_page(label_id: PathId, request: Request):
    return _correction_page(label_id, request)


def _correction_page(label_id: int, request: Request, error: str | None = None, status: int = 200) -> HTMLResponse:
    with db_of(request).read_session() as s:
        user, csrf = authenticate(request, s)
        label = labels.own_label(s, label_id, user)
        task, item = labels.label_context(s, label)
        payload = item_payload(task, item, label.display_order)
        return _render(request, "label.html", status, user=user, csrf_token=csrf, task=task, item=payload,
                       progress=tasks.progress(s, task, user), error=error, correcting=label,
                       form_action=f"/labels/{label.id}/edit")


@router.post("/labels/{label_id}/edit", dependencies=AUTH)
async def correction_submit(label_id: PathId, request: Request):
    form = await request.form()
    return await run_in_threadpool(_correction_submit, label_id, request, form)


def _correction_submit(label_id: int, request: Request, form):
    error = None
    with db_of(request).session() as s:
        user, csrf = authenticate(request, s)
        check_csrf(request, csrf, form.get("csrf_token"))
        label = labels.own_label(s, label_id, user)
        task, _ = labels.label_context(s, label)
        try:
            raw = form_answer(task, form, len(label.display_order))
            labels.correct_label(s, label, user, raw, **form_extras(form))
            s.commit()
        except (ValueError, InvalidAnswer, Conflict) as e:
            s.rollback()
            error = str(e)
    if error is not None:
        return _correction_page(label_id, request, error=error, status=422)
    return RedirectResponse("/labels", status_code=303)


@router.get("/admin/review", dependencies=AUTH)
def review_filter(task: Annotated[int, Query(ge=1, le=INT_MAX)], request: Request, annotator: Annotator = "",
                  status: ReviewStatus = "pending"):
    """The filter form's target: the queue of the chosen task (a GET form cannot pick a path)."""
    return RedirectResponse(f"/admin/tasks/{task}/review?{urlencode({'annotator': annotator, 'status': status})}",
                            status_code=303)


@router.get("/admin/tasks/{task_id}/review", response_class=HTMLResponse, dependencies=AUTH)
def review_page(task_id: PathId, request: Request, annotator: Annotator = "", status: ReviewStatus = "pending",
                page: Page = 1):
    return _review_page(task_id, request, annotator, status, page)


def _review_page(task_id: int, request: Request, annotator: str = "", status: str = "pending", page: int = 1,
                 error: str | None = None, notice: str | None = None, code: int = 200):
    with db_of(request).read_session() as s:
        user, csrf = authenticate(request, s)
        require_admin(user)
        task = tasks.get_task(s, task_id)
        q = review.queue(s, task, user, status, annotator, page)
        return _render(request, "review.html", code, user=user, csrf_token=csrf, task=task, queue=q,
                       tasks=tasks.all_tasks(s), annotator=annotator, review_status=status, error=error,
                       notice=notice)


@router.post("/admin/tasks/{task_id}/review/bulk", dependencies=AUTH)
async def review_bulk(task_id: PathId, request: Request):
    form = await request.form()
    return await run_in_threadpool(_review_bulk, task_id, request, form)


def _review_bulk(task_id: int, request: Request, form):
    ids = [int(v) for v in form.getlist("label_id") if str(v).isdigit() and 1 <= int(v) <= INT_MAX]
    with db_of(request).session() as s:
        user, csrf = authenticate(request, s)
        require_admin(user)
        check_csrf(request, csrf, form.get("csrf_token"))
        counts = review.accept_many(s, tasks.get_task(s, task_id), user, ids) if ids else None
    status, page = str(form.get("status", "pending")), str(form.get("page", "1"))
    return _review_page(task_id, request, annotator=str(form.get("annotator", ""))[:64],
                        status=status if status in REVIEW_STATUSES else "pending",
                        page=int(page) if page.isdigit() and int(page) <= INT_MAX else 1, notice=review_notice(counts))


@router.post("/admin/labels/{label_id}/review", dependencies=AUTH)
async def review_submit(label_id: PathId, request: Request):
    form = await request.form()
    return await run_in_threadpool(_review_submit, label_id, request, form)


def _review_submit(label_id: int, request: Request, form):
    error = None
    with db_of(request).session() as s:
        user, csrf = authenticate(request, s)
        require_admin(user)
        check_csrf(request, csrf, form.get("csrf_token"))
        label = labels.get_label(s, label_id)
        task_id = label.task_id
        reason = str(form.get("reason", ""))[:2000]
        try:
            if text_problem(reason):
                raise InvalidAnswer("reason", text_problem(reason))
            review.review_label(s, label, user, str(form.get("decision", "")), reason)
            s.commit()
        except (InvalidAnswer, Forbidden) as e:
            s.rollback()
            error, status = str(e), 403 if isinstance(e, Forbidden) else 422
    if error is not None:
        return _review_page(task_id, request, error=error, code=status)
    return RedirectResponse(f"/admin/tasks/{task_id}/review", status_code=303)

"""The server-rendered pages for browsers: login, task list, labelling, corrections, the admin
dashboard and the review queue."""

from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import urlencode

from fastapi import Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from rlhfkit.feedback import review as rv
from rlhfkit.feedback import service as svc
from rlhfkit.feedback.models import (
    Item,
    Label,
    LoginSession,
    Task,
    User,
)
from rlhfkit.feedback.schemas import (
    INT_MAX,
    text_problem,
)
from rlhfkit.feedback.security import (
    create_login_session,
    digest,
    same,
)
from rlhfkit.feedback.web import (
    PRELOGIN_COOKIE,
    SESSION_COOKIE,
    Annotator,
    AuthError,
    Page,
    PathId,
    ReviewStatus,
    authenticate,
    check_csrf,
    item_payload,
    login_checker,
    require_admin,
    task_or_404,
    visible_task,
)


def _form_answer(task: Task, form, k: int) -> dict:
    """Build a display-position answer from a submitted HTML form."""
    qt = task.question_type
    if qt == "pairwise":
        return {"choice": form.get("choice")}
    if qt == "ranking":
        try:
            return {"ranking": [int(x) for x in str(form.get("ranking", "")).split(",") if x != ""]}
        except ValueError:
            raise svc.InvalidAnswer("ranking", "must be comma-separated positions") from None
    if qt == "rating":
        out = []
        for pos in range(k):
            r = {}
            for dim in task.rubric:
                v = form.get(f"r{pos}_{dim}")
                if v is None or not str(v).isdigit():
                    raise svc.InvalidAnswer(f"ratings[{pos}].{dim}", "choose a score")
                r[dim] = int(v)
            out.append(r)
        return {"ratings": out}
    if qt == "thumbs":
        vals = [form.get(f"t{pos}") for pos in range(k)]
        if any(v not in ("up", "down") for v in vals):
            raise svc.InvalidAnswer("thumbs", "choose thumbs up or down for every response")
        return {"thumbs": [v == "up" for v in vals]}
    if qt == "critique":
        return {"text": form.get("text")}
    pos = str(form.get("position", "0"))
    return {"position": int(pos) if pos.isdigit() else -1, "text": form.get("text")}


def _form_extras(form) -> dict:
    """The optional strength and comment of a submitted form (empty fields are none)."""
    strength, comment = form.get("strength") or None, form.get("comment") or None
    return {"strength": None if strength is None else str(strength)[:16],
            "comment": None if comment is None else str(comment)}


def page_routes(app, db, templates, rng, secure, auth):
    def render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request):
        token = secrets.token_urlsafe(24)
        resp = render(request, "login.html", csrf_token=token, error=None, user=None)
        resp.set_cookie(PRELOGIN_COOKIE, token, httponly=True, samesite="strict", secure=secure)
        return resp

    check_login = login_checker(app, db)

    @app.post("/login")
    async def login_submit(request: Request):
        form = await request.form()
        if not same(form.get("csrf_token"), request.cookies.get(PRELOGIN_COOKIE)):
            raise AuthError(403, "missing or wrong CSRF token; reload the login page")
        username, password = str(form.get("username", ""))[:64], str(form.get("password", ""))[:1024]
        user = await check_login(request, username, password, "browser")  # Argon2 in its own bounded pool
        return await run_in_threadpool(_login_done, request, user)

    def _login_done(request: Request, user: User | None):
        if user is None:
            token = secrets.token_urlsafe(24)
            resp = render(request, "login.html", 401, csrf_token=token, error="Wrong username or password.", user=None)
            resp.set_cookie(PRELOGIN_COOKIE, token, httponly=True, samesite="strict", secure=secure)
            return resp
        with db.session() as s:
            secret, _ = create_login_session(s, s.get(User, user.id))
        target = "/admin" if svc.is_admin(user) else "/"
        resp = RedirectResponse(target, status_code=303)
        resp.set_cookie(SESSION_COOKIE, secret, httponly=True, samesite="strict", secure=secure)
        resp.delete_cookie(PRELOGIN_COOKIE)
        return resp

    @app.post("/logout")
    async def logout(request: Request):
        if not request.cookies.get(SESSION_COOKIE):  # API tokens are revoked, not logged out
            raise AuthError(401, "not logged in (no session cookie)")
        form = await request.form()
        return await run_in_threadpool(_logout, request, form)

    def _logout(request: Request, form):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf, form.get("csrf_token"))
            if csrf is None:
                raise AuthError(401, "not logged in with a browser session")
            sess = s.scalar(select(LoginSession).where(LoginSession.session_hash == digest(request.cookies[SESSION_COOKIE])))
            if sess is not None:
                s.delete(sess)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    @app.get("/", response_class=HTMLResponse, dependencies=auth)
    def home(request: Request):
        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            tasks = [(t, svc.progress(s, t, user)) for t in svc.visible_tasks(s, user)]
            return render(request, "home.html", user=user, csrf_token=csrf, tasks=tasks)

    @app.get("/tasks/{task_id}", response_class=HTMLResponse, dependencies=auth)
    def label_page(task_id: PathId, request: Request, error: str | None = None, status: int = 200):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            task = visible_task(s, task_id, user, app.state.tasks)
            got = svc.next_assignment(s, task, user, rng(), app.state.scorer)
            prog = svc.progress(s, task, user)
            item = item_payload(task, got[0], got[1].display_order) if got else None
            s.commit()
            return render(request, "label.html", status, user=user, csrf_token=csrf, task=task, item=item,
                          progress=prog, error=error)

    @app.post("/tasks/{task_id}", dependencies=auth)
    async def label_submit(task_id: PathId, request: Request):
        form = await request.form()  # parsed on the event loop; the database work runs in a thread
        return await run_in_threadpool(_label_submit, task_id, request, form)

    def _label_submit(task_id: int, request: Request, form):
        error = None
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf, form.get("csrf_token"))
            task = visible_task(s, task_id, user, app.state.tasks)
            try:
                item_id = int(str(form.get("item_id", "")))
                if not 1 <= item_id <= INT_MAX:
                    raise LookupError(f"item {item_id} not found")
                item = s.get(Item, item_id)
                if item is None:
                    raise LookupError(f"item {item_id} not found")
                if form.get("action") == "skip":
                    svc.skip_item(s, task, user, item_id)
                else:
                    raw = _form_answer(task, form, len(item.responses))
                    svc.submit_label(s, task, user, item_id, raw, str(form.get("idempotency_key", "")),
                                     **_form_extras(form))
                s.commit()
            except (ValueError, svc.InvalidAnswer, svc.Conflict, LookupError) as e:
                s.rollback()
                error = str(e)
        if error is not None:  # re-render outside the write session (it takes the write lock)
            return label_page(task_id, request, error=error, status=422)
        return RedirectResponse(f"/tasks/{task_id}", status_code=303)

    @app.get("/admin", response_class=HTMLResponse, dependencies=auth)
    def admin_home(request: Request):
        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            require_admin(user)
            tasks = [(t, svc.progress(s, t)) for t in s.scalars(select(Task).order_by(Task.id))]
            return render(request, "admin.html", user=user, csrf_token=csrf, tasks=tasks)

    @app.get("/admin/tasks/{task_id}", response_class=HTMLResponse, dependencies=auth)
    def admin_task(task_id: PathId, request: Request):
        from rlhfkit.feedback import export as ex

        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            require_admin(user)
            task = task_or_404(s, task_id)
            report = ex.task_qc(s, task)
            return render(request, "admin_task.html", user=user, csrf_token=csrf, task=task, report=report,
                          kinds=ex.kinds_for(task.question_type), progress=svc.progress(s, task))

    @app.get("/labels", response_class=HTMLResponse, dependencies=auth)
    def my_labels_page(request: Request):
        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            rows = s.execute(select(Label, Task, Item).join(Task, Task.id == Label.task_id)
                             .join(Item, Item.id == Label.item_id).where(Label.user_id == user.id)
                             .order_by(Label.id.desc()).limit(500)).all()
            return render(request, "my_labels.html", user=user, csrf_token=csrf, rows=rows)

    def _own_label(s: Session, label_id: int, user: User) -> Label:
        label = s.get(Label, label_id)
        if label is None or label.user_id != user.id:
            raise LookupError(f"label {label_id} not found")
        return label

    @app.get("/labels/{label_id}/edit", response_class=HTMLResponse, dependencies=auth)
    def correction_page(label_id: PathId, request: Request, error: str | None = None, status: int = 200):
        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            label = _own_label(s, label_id, user)
            task, item = s.get(Task, label.task_id), s.get(Item, label.item_id)
            payload = item_payload(task, item, label.display_order)
            return render(request, "label.html", status, user=user, csrf_token=csrf, task=task, item=payload,
                          progress=svc.progress(s, task, user), error=error, correcting=label,
                          form_action=f"/labels/{label.id}/edit")

    @app.post("/labels/{label_id}/edit", dependencies=auth)
    async def correction_submit(label_id: PathId, request: Request):
        form = await request.form()
        return await run_in_threadpool(_correction_submit, label_id, request, form)

    def _correction_submit(label_id: int, request: Request, form):
        error = None
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf, form.get("csrf_token"))
            label = _own_label(s, label_id, user)
            task = s.get(Task, label.task_id)
            try:
                raw = _form_answer(task, form, len(label.display_order))
                svc.correct_label(s, label, user, raw, **_form_extras(form))
                s.commit()
            except (ValueError, svc.InvalidAnswer, svc.Conflict) as e:
                s.rollback()
                error = str(e)
        if error is not None:
            return correction_page(label_id, request, error=error, status=422)
        return RedirectResponse("/labels", status_code=303)

    @app.get("/admin/review", dependencies=auth)
    def review_filter(task: Annotated[int, Query(ge=1, le=INT_MAX)], request: Request, annotator: Annotator = "",
                      status: ReviewStatus = "pending"):
        """The filter form's target: the queue of the chosen task (a GET form cannot pick a path)."""
        return RedirectResponse(f"/admin/tasks/{task}/review?{urlencode({'annotator': annotator, 'status': status})}",
                                status_code=303)

    @app.get("/admin/tasks/{task_id}/review", response_class=HTMLResponse, dependencies=auth)
    def review_page(task_id: PathId, request: Request, annotator: Annotator = "", status: ReviewStatus = "pending",
                    page: Page = 1):
        return _review_page(task_id, request, annotator, status, page)

    def _review_page(task_id: int, request: Request, annotator: str = "", status: str = "pending", page: int = 1,
                     error: str | None = None, notice: str | None = None, code: int = 200):
        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            require_admin(user)
            task = task_or_404(s, task_id)
            q = rv.queue(s, task, user, status, annotator, page)
            tasks = list(s.scalars(select(Task).order_by(Task.id)))
            return render(request, "review.html", code, user=user, csrf_token=csrf, task=task, queue=q, tasks=tasks,
                          annotator=annotator, review_status=status, error=error, notice=notice)

    @app.post("/admin/tasks/{task_id}/review/bulk", dependencies=auth)
    async def review_bulk(task_id: PathId, request: Request):
        form = await request.form()
        return await run_in_threadpool(_review_bulk, task_id, request, form)

    def _review_bulk(task_id: int, request: Request, form):
        ids = [int(v) for v in form.getlist("label_id") if str(v).isdigit() and 1 <= int(v) <= INT_MAX]
        with db.session() as s:
            user, csrf = authenticate(request, s)
            require_admin(user)
            check_csrf(request, csrf, form.get("csrf_token"))
            counts = rv.accept_many(s, task_or_404(s, task_id), user, ids) if ids else None
        notice = "Select labels to accept first." if counts is None else \
            f"Accepted {counts['accepted']} label(s)" + (f"; left {counts['own']} of your own" if counts["own"] else "") \
            + (f"; {counts['not_pending']} already decided" if counts["not_pending"] else "") + "."
        status = str(form.get("status", "pending"))
        page = str(form.get("page", "1"))
        return _review_page(task_id, request, annotator=str(form.get("annotator", ""))[:64],
                           status=status if status in ("pending", "accepted", "rejected", "all") else "pending",
                           page=int(page) if page.isdigit() and int(page) <= INT_MAX else 1, notice=notice)

    @app.post("/admin/labels/{label_id}/review", dependencies=auth)
    async def review_submit(label_id: PathId, request: Request):
        form = await request.form()
        return await run_in_threadpool(_review_submit, label_id, request, form)

    def _review_submit(label_id: int, request: Request, form):
        error = None
        with db.session() as s:
            user, csrf = authenticate(request, s)
            require_admin(user)
            check_csrf(request, csrf, form.get("csrf_token"))
            label = s.get(Label, label_id)
            if label is None:
                raise LookupError(f"label {label_id} not found")
            task_id = label.task_id
            reason = str(form.get("reason", ""))[:2000]
            try:
                if text_problem(reason):
                    raise svc.InvalidAnswer("reason", text_problem(reason))
                svc.review_label(s, label, user, str(form.get("decision", "")), reason)
                s.commit()
            except (svc.InvalidAnswer, svc.Forbidden) as e:
                s.rollback()
                error, status = str(e), 403 if isinstance(e, svc.Forbidden) else 422
        if error is not None:
            return _review_page(task_id, request, error=error, code=status)
        return RedirectResponse(f"/admin/tasks/{task_id}/review", status_code=303)

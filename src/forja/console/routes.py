"""The operator's console at /console: login and logout, the pages (data, training, versions, feedback review,
keys and usage) and the few JSON routes they need beyond the API (/console/api/...). Every button of a page
is a call of the API itself (/v1/files, /v1/fine_tuning/jobs, /admin/...) made with the session.

A page without a session redirects to /console/login; a /console/api route answers 401.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import jinja2
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from forja import data, files, jobs, models
from forja.console import accounts
from forja.console.sessions import COOKIE, csrf_matches
from forja.feedback import GATE_FILE, last_question
from forja.serve.deps import ApiError, Caller, StateDep
from forja.serve.routes.files import found, store_of
from forja.store import StoreError

WEB_DIR = Path(__file__).parent / "web"
LOGIN_CSRF_COOKIE = "forja_login_csrf"  # the login form's double-submit token (there is no session yet)
PAGES = {"data": "Data", "training": "Training", "versions": "Versions", "feedback": "Feedback review",
         "knowledge": "Knowledge", "keys": "Keys and usage"}
ADMIN_PAGES = ("feedback", "knowledge", "keys")  # left out of a non-admin's navigation: every call on them needs an admin
STATIC = re.compile(r"^[a-z]+\.(js|css)$")
MAX_FEEDBACK_PAGE = 500
PREVIEW_ROWS = 5  # training rows shown under a file's report
# No inline script or style anywhere, so a stored text that slips into the page still cannot run.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
                    "Cache-Control": "no-store"}

router = APIRouter(prefix="/console", include_in_schema=False)
templates = jinja2.Environment(loader=jinja2.FileSystemLoader(WEB_DIR), autoescape=True,
                               undefined=jinja2.StrictUndefined)


# ------------------------------------------------------------------ who is signed in


def session_of(request: Request) -> accounts.Session | None:
    return getattr(request.state, "console_session", None)


def api_session(request: Request) -> accounts.Session:
    """A /console/api route: the session, else 401 (the middleware already refused a bad CSRF token)."""
    session = session_of(request)
    if session is None:
        raise ApiError(401, "sign in at /console/login first", type="authentication_error", code="not_signed_in")
    return session


def admin_session(request: Request) -> accounts.Session:
    session = api_session(request)
    if not session.user.admin:
        raise ApiError(403, f"{session.user.name} is not a console admin (forja users add NAME --admin)",
                       type="permission_error", code="admin_required")
    return session


SessionDep = Annotated[accounts.Session, Depends(api_session)]
AdminSessionDep = Annotated[accounts.Session, Depends(admin_session)]


def render(name: str, status: int = 200, **values: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(name).render(**values), status_code=status, headers=SECURITY_HEADERS)


def secure(request: Request) -> bool:
    return request.url.scheme == "https"


def safe_next(target: str | None) -> str:
    """Where to go after login: a console page of this server or its chat page, never another site
    (//evil.example)."""
    if target == "/":
        return target
    if target and target.startswith("/console") and not target.startswith("//") and "\\" not in target:
        return target
    return "/console"


# ------------------------------------------------------------------ login and logout


def login_page(request: Request, next_: str, message: str = "", status: int = 200,
               headers: dict[str, str] | None = None) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    page = render("login.html", status, csrf=token, next=safe_next(next_), message=message)
    page.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, path="/console/login", httponly=True, samesite="strict",
                    secure=secure(request))
    page.headers.update(headers or {})
    return page


@router.get("/login")
async def login_form(request: Request, next: str = "/console") -> Response:
    if session_of(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return login_page(request, next)


@router.post("/login")
async def login(request: Request, state: StateDep) -> Response:
    form = await request.form()
    name, password = str(form.get("name", "")).strip(), str(form.get("password", ""))
    next_ = str(form.get("next", "/console"))
    if not csrf_matches(str(form.get("csrf", "")), request.cookies.get(LOGIN_CSRF_COOKIE, "")):
        return login_page(request, next_, "The form expired or did not come from this page: sign in again.", 403)
    store = store_of(state)
    try:
        user = await asyncio.to_thread(accounts.login, store, name, password)
    except accounts.LockedOut as exc:
        return login_page(request, next_, f"Too many wrong passwords for this user: try again in {exc.retry_after} s.",
                          429, {"Retry-After": str(exc.retry_after)})
    if user is None:
        return login_page(request, next_, "Wrong user name or password.", 401)
    token, session = await asyncio.to_thread(accounts.open_session, store, user,
                                             state.settings.console.session_hours)
    page = RedirectResponse(safe_next(next_), status_code=303)
    page.set_cookie(COOKIE, token, max_age=int(session.expires_at - time.time()), path="/", httponly=True,
                    samesite="lax", secure=secure(request))
    page.delete_cookie(LOGIN_CSRF_COOKIE, path="/console/login")
    return page


@router.post("/logout")
async def logout(request: Request, state: StateDep) -> Response:
    session = session_of(request)
    if session is not None:
        form = await request.form()
        if not csrf_matches(str(form.get("csrf", "")), session.csrf):
            return render("message.html", 403, title="Not signed out",
                          message="The form did not carry this session's CSRF token: reload the page and try again.")
        await asyncio.to_thread(accounts.close_session, store_of(state), request.cookies.get(COOKIE, ""))
    page = RedirectResponse("/console/login", status_code=303)
    page.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax", secure=secure(request))
    return page


# ------------------------------------------------------------------ pages


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    if not STATIC.match(name) or not (WEB_DIR / name).is_file():
        raise ApiError(404, f"no console file {name!r}", code="not_found")
    return FileResponse(WEB_DIR / name, headers={"X-Content-Type-Options": "nosniff"})


def page(request: Request, name: str) -> Response:
    session = session_of(request)
    if session is None:
        return RedirectResponse(f"/console/login?next={quote(request.url.path)}", status_code=303)
    return render(f"{name}.html", page=name, pages=PAGES, admin_pages=ADMIN_PAGES, user=session.user,
                  csrf=session.csrf)


@router.get("")
async def home(request: Request) -> Response:
    if session_of(request) is None:
        return RedirectResponse("/console/login", status_code=303)
    return RedirectResponse("/console/data", status_code=303)


@router.get("/data")
async def data_page(request: Request) -> Response:
    return page(request, "data")


@router.get("/training")
async def training_page(request: Request) -> Response:
    return page(request, "training")


@router.get("/versions")
async def versions_page(request: Request) -> Response:
    return page(request, "versions")


@router.get("/feedback")
async def feedback_page(request: Request) -> Response:
    return page(request, "feedback")


@router.get("/knowledge")
async def knowledge_page(request: Request) -> Response:
    return page(request, "knowledge")


@router.get("/keys")
async def keys_page(request: Request) -> Response:
    return page(request, "keys")


# ------------------------------------------------------------------ the console's own API


@router.get("/api/me")
async def me(session: SessionDep) -> dict:
    """Who is signed in, and the CSRF token a page of this server sends back when it changes something (another
    site cannot read this answer: CORS never allows credentials here)."""
    return {"name": session.user.name, "admin": session.user.admin, "expires_at": int(session.expires_at),
            "csrf": session.csrf}


@router.get("/api/files/{file_id}/report")
async def file_report(file_id: str, state: StateDep, session: SessionDep) -> dict:
    """`forja data inspect` on an uploaded fine-tune file: formats, rows, bad rows, tokens, duplicates."""
    key = session.user.api_key()
    stored = await asyncio.to_thread(found, state, file_id, Caller(key.name, key.admin))
    return await asyncio.to_thread(inspect_report, files.path_of(state.settings, stored), stored.filename)


def inspect_report(path: Path, filename: str) -> dict[str, Any]:
    report = data.inspect([path])
    with tempfile.TemporaryDirectory(prefix="forja-preview-") as tmp:  # the rows as `forja data prepare` writes them
        try:
            prepared = data.prepare([path], Path(tmp) / "data.jsonl", skip_bad=True)
            preview = data.read_rows(prepared.train_path)[:PREVIEW_ROWS]
            split = {"train_rows": prepared.train_rows, "val_rows": prepared.val_rows,
                     "duplicates_removed": prepared.duplicates_removed, "skipped": len(prepared.skipped)}
        except data.DataError:  # nothing usable: the report says why
            preview, split = [], None

    def named(text: str) -> str:  # the client's filename, never where the file lies on the server
        return text.replace(str(path), filename)

    counts = [0] * (len(data.LENGTH_BINS) + 1)
    for n in report.lengths:
        counts[sum(n > bound for bound in data.LENGTH_BINS)] += 1
    labels = [f"≤{bound}" for bound in data.LENGTH_BINS] + [f">{data.LENGTH_BINS[-1]}"]
    return {
        "filename": filename,
        "token_unit": report.token_unit,
        "files": [{"container": f.container, "detail": f.detail, "format": f.format, "kind": f.kind, "rows": f.rows,
                   "turns": f.turns, "chunks": f.chunks, "tokens": f.tokens, "duplicates": f.duplicates,
                   "bad_rows": [named(m) for m in f.bad_rows], "empty_fields": f.empty_fields,
                   "error": named(f.error) if f.error else None, "notes": [named(n) for n in f.notes]}
                  for f in report.files],
        "histogram": [{"tokens": label, "rows": count} for label, count in zip(labels, counts)],
        "quality": [named(line) for line in report.quality.render()] if report.quality is not None else [],
        "prepared": split,
        "preview": [{k: named(v) if k == "source" else v for k, v in row.items() if k in ("messages", "text", "source")}
                    for row in preview],
    }


@router.get("/api/versions")
async def versions(state: StateDep, _: SessionDep) -> dict:
    """Every trained version with its base, metrics, gate result and whether it has a loss plot; the active
    one and the promotion log."""
    return await asyncio.to_thread(version_list, state.settings, state.active)


def version_list(settings, active: str) -> dict[str, Any]:
    rows = []
    for name in models.version_names(settings):
        directory = settings.versions_dir / name
        try:
            meta = models.read_version(directory)
        except models.ModelError as exc:
            rows.append({"name": name, "error": str(exc)})
            continue
        gate = None
        if (directory / GATE_FILE).is_file():
            try:
                full = json.loads((directory / GATE_FILE).read_text(encoding="utf-8"))
                gate = {k: full.get(k) for k in ("passed", "reason", "decided_by")}
            except (OSError, ValueError):
                gate = {"passed": None, "reason": f"{GATE_FILE} is unreadable", "decided_by": None}
        metrics = {k: v for k, v in (meta.get("metrics") or {}).items() if isinstance(v, (int, float, str))}
        rows.append({"name": name, "base": meta.get("base"), "method": meta.get("method"),
                     "created_at": meta.get("created_at"), "data": Path(str(meta.get("data") or "")).name or None,
                     "data_hash": meta.get("data_hash"), "metrics": metrics, "gate": gate,
                     "from_feedback": from_feedback(meta.get("from_feedback")), "loss_plot": (directory / "loss.png").is_file(),
                     "active": name == active})
    rows.sort(key=lambda r: r.get("created_at") or "", reverse=True)
    return {"active": active, "data": rows, "log": models.activation_log(settings)[-50:][::-1]}


def from_feedback(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a retrain learned from (feedback.json, noted in version.json): the feedback rows and the start."""
    if not record:
        return None
    return {k: record.get(k) for k in ("started_from", "train_feedback_ids", "holdout_feedback_ids", "replayed_rows",
                                       "replaced_rows")}


@router.get("/api/versions/{name}/loss.png")
async def loss_plot(name: str, state: StateDep, _: SessionDep) -> FileResponse:
    directory = models.version_dir(state.settings, name)  # None for a path or an unknown name
    if directory is None or not (directory / "loss.png").is_file():
        raise ApiError(404, f"no loss plot for a version named {name!r}", code="not_found")
    return FileResponse(directory / "loss.png", media_type="image/png")


@router.get("/api/feedback")
async def feedback_queue(state: StateDep, _: AdminSessionDep,
                         status: Literal["unreviewed", "all"] = "unreviewed",
                         rating: Literal["up", "down"] | None = None,
                         limit: int = Query(100, ge=1, le=MAX_FEEDBACK_PAGE)) -> dict:
    """The feedback to review (newest first): the question, the answer, the rating and correction."""
    rows = await asyncio.to_thread(store_of(state).feedback_rows, rating=rating)
    if status == "unreviewed":
        rows = [r for r in rows if r["review"] is None and not r["used_in"]]
    return {"object": "list", "data": [feedback_item(r) for r in rows[:limit]]}


def feedback_item(row: dict[str, Any]) -> dict[str, Any]:
    messages = row["messages"]
    question = last_question(messages) if isinstance(messages, list) else messages
    question = question if isinstance(question, str) else json.dumps(question, ensure_ascii=False)
    return {"id": row["id"], "created_at": row["created_at"], "exchange_id": row["exchange_id"], "model": row["model"],
            "persona": row["persona"], "rating": row["rating"], "question": question, "answer": row["answer"],
            "correction": row["correction"], "tool_call": row.get("tool_call"), "comment": row["comment"],
            "sender": row["sender"],
            "review": row["review"], "used_in": row["used_in"]}


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[int] = Field(..., min_length=1, max_length=MAX_FEEDBACK_PAGE)
    decision: Literal["approved", "rejected"]
    correction: str | None = Field(None, min_length=1, max_length=20_000, description="Approving one row: the "
                                   "answer it teaches, in the operator's words (replaces the sender's correction).")


@router.post("/api/feedback/review")
async def review(body: ReviewRequest, state: StateDep, session: AdminSessionDep) -> dict:
    """Approve or reject feedback rows before they train (rejected ones never do); a row approved with a
    `correction` teaches that wording."""
    if body.correction is not None and (len(body.ids) != 1 or body.decision != "approved"):
        raise ApiError(400, "correction: an edited correction approves one row (ids: [id], decision: approved)",
                       param="correction", code="invalid_value")
    try:
        if body.correction is not None:  # PII never reaches the store, whoever writes it
            await asyncio.to_thread(store_of(state).edit_correction, body.ids[0],
                                    state.guards.redact(body.correction.strip()))
        count = await asyncio.to_thread(store_of(state).review, body.ids, body.decision,
                                        accounts.KEY_PREFIX + session.user.name)
    except StoreError as exc:
        raise ApiError(404, str(exc), param="ids", code="feedback_not_found") from None
    return {"reviewed": count, "decision": body.decision}


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200)
    password: str = Field(..., min_length=accounts.MIN_PASSWORD_CHARS, max_length=1024)
    admin: bool = False


def user_item(user: accounts.User) -> dict[str, Any]:
    return {"name": user.name, "admin": user.admin, "created_at": user.created_at, "last_login_at": user.last_login_at}


@router.get("/api/users")
async def users(state: StateDep, _: AdminSessionDep) -> dict:
    return {"object": "list", "data": [user_item(u) for u in await asyncio.to_thread(accounts.list_users,
                                                                                      store_of(state))]}


@router.post("/api/users", status_code=201)
async def add_user(body: UserCreate, state: StateDep, _: AdminSessionDep) -> dict:
    """A new console user (as `forja users add`)."""
    try:
        user = await asyncio.to_thread(accounts.add_user, store_of(state), body.name, body.password, body.admin)
    except accounts.AccountError as exc:
        raise ApiError(400, str(exc), param="name", code="invalid_value") from None
    return user_item(user)


@router.delete("/api/users/{name}")
async def remove_user(name: str, state: StateDep, session: AdminSessionDep) -> dict:
    if name == session.user.name:
        raise ApiError(400, "you cannot remove yourself: another admin can (or forja users remove)",
                       param="name", code="invalid_value")
    try:
        await asyncio.to_thread(accounts.remove_user, store_of(state), name)
    except accounts.AccountError as exc:
        raise ApiError(404, str(exc), param="name", code="user_not_found") from None
    return {"name": name, "deleted": True}


# ------------------------------------------------------------------ comparisons and exports (jobs the worker runs)

MAX_COMPARED = 4  # versions answering one test set side by side
EXPORT_FORMATS = ("gguf", "ollama")  # what the versions page downloads; `forja export` writes the others


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(..., min_length=2, max_length=MAX_COMPARED, description="Versions, base models or "
                              "personas; the first is the one the others are compared with.")
    testset_file_id: str = Field(..., description="A test set uploaded with purpose evals (question, answer).")
    judge: str | None = Field(None, min_length=1, max_length=500, description="A model forja can load, or an "
                              "OpenAI-compatible base URL; none: no judge scores.")
    max_tokens: int = Field(128, ge=1, le=1024)


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["gguf", "ollama"] = "gguf"
    quant: Literal["f32", "f16", "q8_0", "q4_k_m"] = "q8_0"


def answerable(settings, names: list[str]) -> None:
    """Every name is a version, a model forja has or a persona: else a 400 naming the first that is not."""
    known = {row["name"] for row in models.list_models(settings)} | {p.name for p in settings.serve.personas}
    known |= {settings.model}
    for index, name in enumerate(names):
        if name not in known:
            raise ApiError(400, f"models[{index}]: no version, model or persona named {name!r}",
                           param=f"models[{index}]", code="model_not_found")
    if len(set(names)) != len(names):
        raise ApiError(400, "models: a model is named twice", param="models", code="invalid_value")


@router.post("/api/compare", status_code=201)
async def compare(body: CompareRequest, state: StateDep, session: SessionDep) -> dict:
    """Start `forja eval` of the models on the test set (a job the worker runs): answers side by side with
    their scores, and the judge's when one is named."""
    await asyncio.to_thread(answerable, state.settings, body.models)
    key = session.user.api_key()
    stored = await asyncio.to_thread(found, state, body.testset_file_id, Caller(key.name, key.admin),
                                     "testset_file_id", 400)
    if stored.purpose != "evals":
        raise ApiError(400, f"testset_file_id: {stored.filename} was uploaded for {stored.purpose!r}; upload the "
                       "test set with purpose evals", param="testset_file_id", code="invalid_value")
    job = await asyncio.to_thread(jobs.create, store_of(state), jobs.EVAL, body.model_dump(), key.name, "queued",
                                  [f"Comparison of {', '.join(body.models)} on {stored.filename} queued"])
    return task_item(job)


@router.post("/api/versions/{name}/export", status_code=201)
async def export_version(name: str, body: ExportRequest, state: StateDep, session: AdminSessionDep) -> dict:
    """Start `forja export` of a version (a job the worker runs); its files are then downloaded from
    /v1/files/ID/content."""
    if models.version_dir(state.settings, name) is None:
        raise ApiError(404, f"no version named {name!r}", param="name", code="model_not_found")
    key = session.user.api_key()
    job = await asyncio.to_thread(jobs.create, store_of(state), jobs.EXPORT, {"model": name, **body.model_dump()},
                                  key.name, "queued", [f"Export of {name} as {body.format} ({body.quant}) queued"])
    return task_item(job)


@router.get("/api/tasks/{job_id}")
async def task(job_id: str, state: StateDep, session: SessionDep) -> dict:
    """A comparison or export: its status, its last events and, once finished, what it made."""
    key = session.user.api_key()
    try:
        job = await asyncio.to_thread(jobs.get, store_of(state), job_id, None, key.name, key.admin)
    except jobs.UnknownJob as exc:
        raise ApiError(404, str(exc), param="job_id", code="not_found") from None
    if job.kind not in (jobs.EVAL, jobs.EXPORT):
        raise ApiError(404, f"no comparison or export with id {job_id!r}", param="job_id", code="not_found")
    events, _ = await asyncio.to_thread(jobs.events, store_of(state), job_id, None, 5)
    return {**task_item(job), "events": [{"at": e.created_at, "level": e.level, "message": e.message} for e in events]}


def task_item(job: jobs.Job) -> dict[str, Any]:
    made = {k: job.result[k] for k in ("summary", "rows", "report_file_id", "files") if k in job.result}
    return {"id": job.id, "kind": job.kind, "status": job.status, "request": job.request, "error": job.error,
            "created_at": job.created_at, "finished_at": job.finished_at, **made}


# ------------------------------------------------------------------ knowledge

@router.get("/api/knowledge")
async def knowledge_collections(state: StateDep, _: AdminSessionDep) -> dict:
    """Every knowledge collection with its files (indexed, being indexed, failed), chunks and tokens; the page
    changes them through /v1/vector_stores and /v1/files."""
    return {"object": "list", "data": await asyncio.to_thread(collection_list, state.settings, store_of(state))}


def collection_list(settings, store) -> list[dict[str, Any]]:
    from forja.knowledge import index, vector_stores

    sizes = {c.name: c for c in index.collections(settings)}
    rows = []
    for found in vector_stores.stores(settings, store):
        collection = sizes.get(found.name)
        rows.append({"id": found.id, "name": found.name, "created_at": found.created_at,
                     "indexed_at": collection.indexed_at if collection else None,
                     "chunks": collection.chunks if collection else 0, "tokens": collection.tokens if collection else 0,
                     "files": [{"id": f.id, "filename": f.filename, "status": f.status, "bytes": f.bytes,
                                "error": (f.last_error or {}).get("message")} for f in found.files]})
    return rows


@router.post("/api/knowledge/{name}/reindex")
async def reindex(name: str, state: StateDep, _: AdminSessionDep) -> dict:
    """Index the collection's files again: a file changed on disk (or indexed with other chunk settings) is
    replaced, an unchanged one is kept; a file no longer on disk is named, not removed."""
    return await asyncio.to_thread(reindexed, state.settings, store_of(state), name)


def reindexed(settings, store, name: str) -> dict[str, Any]:
    from forja.knowledge import index, vector_stores

    try:
        collection = index.show(settings, name)
    except index.UnknownCollection:
        raise ApiError(404, f"no knowledge collection named {name!r}", param="name", code="not_found") from None
    names = {f.id: f.filename for f in vector_stores.get(settings, store, vector_stores.ID_PREFIX + name).files}
    present = [Path(f.path) for f in collection.files if Path(f.path).is_file()]
    missing = [Path(f.path) for f in collection.files if not Path(f.path).is_file()]

    def filename(path: Path) -> str:  # an upload by the name it was sent with, never where it lies
        return names.get(vector_stores.file_id(settings, str(path)), path.name)

    try:
        results = index.add(settings, name, present) if present else []
    except index.KnowledgeError as exc:
        raise ApiError(400, str(exc), param="name", code="invalid_value") from None
    return {"name": name, "files": [{"filename": filename(Path(r.path)), "status": r.status, "chunks": r.chunks,
                                     "note": r.note} for r in results]
            + [{"filename": filename(p), "status": "missing", "chunks": 0,
                "note": "the file is no longer where it was indexed from"} for p in missing]}

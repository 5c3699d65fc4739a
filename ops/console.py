"""`apprentice console`: the operators' web console over the store, rendered on the server.

    apprentice console add-operator ana              # prints ana's token once; its hash goes to operators.toml
    apprentice console add-operator lee --read-only  # may look, may not decide
    apprentice console                               # http://127.0.0.1:8080, log in with the token

It runs beside the daemon and `apprentice serve` on the same store. A page is a view of the store
through the functions the CLI uses (loop/status.py and the store's typed rows); a decision posts to
the function the CLI command calls (loop/promotion.py, loop/production.py), so its refusals are the
CLI's, word for word. The console adds one rule: an approval carries a note, as the other
decisions already must.

Sessions live in memory (a restart logs everyone out) behind an HttpOnly, SameSite=Strict cookie.
Every POST carries a CSRF token: the session's, or for the login form one bound to a cookie. A page
asked for without a session redirects to /login; /api/* answers 401 instead, and also takes an
operator's token as a bearer token. No JavaScript: the pages forbid scripts and framing.
"""

import hashlib
import os
import re
import secrets
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

import numpy as np
from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from environments.pack import Pack
from loop.metrics import METRICS, Estimate, report
from loop.production import ReviewError, decide_review, review_items
from loop.promotion import DecisionRefused, approve, reject, rollback
from loop.records import outcomes_of
from loop.status import adapter_details, status
from store import AdapterRow, Store

HERE = Path(__file__).parent
SESSION_COOKIE, LOGIN_COOKIE = "apprentice_session", "apprentice_login"
SESSION_SECONDS = 12 * 3600
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HEADLINE = ("escalation_recall", "over_escalation_rate", "calibration_j", "valid_json_rate")
LOWER_IS_BETTER = {"over_escalation_rate"}
LABELS = {"calibration_j": "J (recall − over-esc.)", "valid_json_rate": "valid JSON", "over_escalation_rate": "over-escalation",
          "first_action_accuracy": "first action", "resolution_rate": "resolution"}
Role = Literal["operator", "read-only"]
ROLES: tuple[Role, ...] = ("operator", "read-only")


# --- operators ------------------------------------------------------------------------------


class OperatorsError(ValueError):
    pass


@dataclass(frozen=True)
class Operator:
    name: str
    role: Role
    token_sha256: str  # tokens are random (192 bits), so a plain SHA-256 is enough to store them

    @property
    def can_decide(self) -> bool:
        return self.role == "operator"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_operators(path: str | Path) -> list[Operator]:
    """The operators file: one `[[operator]]` table each with name, role and token_sha256. No file: none."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        entries = tomllib.loads(path.read_text()).get("operator", [])
    except tomllib.TOMLDecodeError as e:
        raise OperatorsError(f"{path}: {e}") from None
    operators = []
    for i, entry in enumerate(entries, 1):
        name, role, digest = entry.get("name"), entry.get("role", "operator"), entry.get("token_sha256")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise OperatorsError(f"{path}: operator {i}: name must match {NAME.pattern}, got {name!r}")
        if role not in ROLES:
            raise OperatorsError(f"{path}: operator {name}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise OperatorsError(f"{path}: operator {name}: token_sha256 must be 64 hex digits")
        if any(o.name == name for o in operators):
            raise OperatorsError(f"{path}: operator {name} is named twice")
        operators.append(Operator(name, role, digest))
    return operators


def add_operator(path: str | Path, name: str, role: Role) -> str:
    """Append an operator with a fresh token to the file (created readable by its owner only).
    Returns the token: only its hash is kept."""
    path = Path(path)
    if not NAME.fullmatch(name):
        raise OperatorsError(f"an operator name must match {NAME.pattern}, got {name!r}")
    if any(o.name == name for o in load_operators(path)):
        raise OperatorsError(f"{name} is already an operator in {path}")
    token = secrets.token_urlsafe(24)
    header = "" if path.exists() else "# Operators of `apprentice console`: role is operator (decides) or read-only (looks).\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f'{header}\n[[operator]]\nname = "{name}"\nrole = "{role}"\ntoken_sha256 = "{token_hash(token)}"\n')
    return token


# --- sessions -------------------------------------------------------------------------------


@dataclass
class Session:
    operator: Operator
    csrf: str
    expires: float
    flash: tuple[str, str] | None = None  # ("ok" | "refused", message), shown on the next page once


class LoginRequired(Exception):
    pass


class Forbidden(Exception):
    pass


class Console:
    """What the pages share: the store's path, who may log in, the packs (for review decisions),
    and the live sessions. Each request opens its own store connection (SQLite connections stay in
    their thread)."""

    def __init__(self, db: str | Path, operators: list[Operator], packs: list[Pack], *, production_weight: float = 1.0):
        if not operators:
            raise OperatorsError("no operator is defined: add one with `apprentice console add-operator NAME`")
        self.db, self.operators, self.packs, self.production_weight = str(db), operators, packs, production_weight
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def store(self) -> Store:
        return Store.open(self.db)

    def operator_for(self, token: str) -> Operator | None:
        digest = token_hash(token)
        return next((o for o in self.operators if secrets.compare_digest(o.token_sha256, digest)), None)

    def start_session(self, operator: Operator) -> str:
        sid, now = secrets.token_urlsafe(32), time.time()
        with self._lock:
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            self._sessions[sid] = Session(operator, secrets.token_urlsafe(32), now + SESSION_SECONDS)
        return sid

    def session(self, sid: str | None) -> Session | None:
        with self._lock:
            s = self._sessions.get(sid or "")
        return s if s is not None and s.expires > time.time() else None

    def end_session(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)


# --- what the pages show --------------------------------------------------------------------


@dataclass(frozen=True)
class PlotPoint:
    label: str
    status: str
    value: float
    low: float | None
    high: float | None
    x: float  # pixel coordinates inside the SVG
    y: float
    y_low: float
    y_high: float


@dataclass(frozen=True)
class JPlot:
    """Held-out J with its 95% interval per version, on a fixed [-1, 1] axis."""

    width: int
    height: int
    left: int
    right: int
    points: list[PlotPoint]
    ticks: list[tuple[float, str]]  # (y pixel, label)


def j_plot(versions: list[tuple[str, str, dict]], height: int = 220) -> JPlot:
    """`versions`: (label, status, metrics as stored on the adapter row) in order."""
    top, bottom, left, step = 16, 28, 44, 56
    width = max(360, left + step * len(versions) + 16)
    y = lambda v: top + (1 - v) / 2 * (height - top - bottom)  # noqa: E731 - the axis, in one place
    points = []
    for i, (name, state, m) in enumerate(versions):
        low, high = m.get("calibration_j_ci", [None, None])
        value = m["calibration_j"]
        points.append(PlotPoint(name, state, value, low, high, left + step * (i + 0.5), y(value),
                                y(low if low is not None else value), y(high if high is not None else value)))
    return JPlot(width, height, left, width - 8, points, [(y(v), f"{v:+.1f}" if v else "0") for v in (1, 0.5, 0, -0.5, -1)])


def _cell(value: float | None, low: float | None, high: float | None, sign: str = "") -> Markup:
    """A number over its 95% interval, for a table cell."""
    if value is None or np.isnan(value):
        return Markup('<span class="v">n/a</span>')
    interval = "" if low is None or np.isnan(low) else f'<span class="ci">[{low:{sign}.3f}, {high:{sign}.3f}]</span>'
    return Markup(f'<span class="v">{value:{sign}.3f}</span>{interval}')


def ci(metrics: dict, name: str) -> Markup:
    """A metric as the adapter row stores it: `name` and `name_ci`."""
    return _cell(metrics.get(name), *(metrics.get(f"{name}_ci") or (None, None)))


def est(e: Estimate) -> Markup:
    return _cell(e.value, e.low, e.high)


def signed(e: Estimate) -> Markup:
    return _cell(e.value, e.low, e.high, "+")


def label(name: str) -> str:
    return LABELS.get(name, name.replace("_", " "))


def delta_class(name: str, e: Estimate) -> str:
    """better / worse when the paired interval excludes 0, else flat."""
    if np.isnan(e.low):
        return "flat"
    up = e.low > 0 if name not in LOWER_IS_BETTER else e.high < 0
    down = e.high < 0 if name not in LOWER_IS_BETTER else e.low > 0
    return "better" if up else "worse" if down else "flat"


def _local(path: str) -> str:
    """Only redirect to a path on this site."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


def _default_candidate(adapters: list[AdapterRow]) -> str | None:
    """The newest version awaiting approval, else the newest evaluated one."""
    waiting = [a.version for a in adapters if a.status == "awaiting_approval"]
    evaluated = [a.version for a in adapters if a.metrics]
    return (waiting or evaluated or [None])[-1]


# --- the app --------------------------------------------------------------------------------


def create_app(console: Console) -> FastAPI:
    app = FastAPI(title="apprentice console", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(ci=ci, est=est, signed=signed, label=label)
    templates.env.globals.update(delta_class=delta_class, HEADLINE=HEADLINE, METRICS=METRICS)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = ("default-src 'self'; script-src 'none'; style-src 'self'; img-src 'self'; "
                                                       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _: LoginRequired) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "log in, or send an operator's token as a bearer token"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", 303)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, e: Forbidden) -> Response:
        return templates.TemplateResponse(request, "error.html", {"title": "Forbidden", "message": str(e), "session": None}, 403)

    def current(request: Request) -> Session:
        session = console.session(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise LoginRequired()
        return session

    def posted(request: Request, csrf: Annotated[str, Form()] = "") -> Session:
        """A POST from one of our own pages, by a logged-in operator."""
        session = current(request)
        if not secrets.compare_digest(csrf.encode(), session.csrf.encode()):
            raise Forbidden("The form's CSRF token is missing or wrong: reload the page and try again.")
        return session

    def deciding(session: Annotated[Session, Depends(posted)]) -> Session:
        if not session.operator.can_decide:
            raise Forbidden(f"{session.operator.name} is a read-only operator: looking is allowed, deciding is not.")
        return session

    def page(request: Request, session: Session, name: str, status_code: int = 200, **context) -> Response:
        flash, session.flash = session.flash, None
        return templates.TemplateResponse(request, name, {"session": session, "flash": flash, **context}, status_code)

    def decided(session: Session, next_page: str, act: Callable[[], str]) -> Response:
        """Run one decision; its outcome, or the refusal word for word, shows on the next page."""
        try:
            session.flash = ("ok", act())
        except (DecisionRefused, ReviewError) as e:
            session.flash = ("refused", f"refused: {e}")
        return RedirectResponse(_local(next_page), 303)

    # -- login ------------------------------------------------------------------------------

    @app.get("/login")
    def login_form(request: Request, next: str = "/") -> Response:
        token = secrets.token_urlsafe(32)
        response = templates.TemplateResponse(request, "login.html", {"session": None, "csrf": token, "next": _local(next), "error": None})
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    @app.post("/login")
    def login(request: Request, token: Annotated[str, Form()] = "", csrf: Annotated[str, Form()] = "",
              next: Annotated[str, Form()] = "/") -> Response:
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not secrets.compare_digest(csrf.encode(), expected.encode()):
            raise Forbidden("The login form's CSRF token is missing or wrong: reload the login page.")
        operator = console.operator_for(token.strip())
        if operator is None:
            return templates.TemplateResponse(request, "login.html", {"session": None, "csrf": csrf, "next": _local(next),
                                                                      "error": "unknown token"}, 401)
        response = RedirectResponse(_local(next), 303)
        response.set_cookie(SESSION_COOKIE, console.start_session(operator), max_age=SESSION_SECONDS, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    def logout(request: Request, session: Annotated[Session, Depends(posted)]) -> Response:
        console.end_session(request.cookies.get(SESSION_COOKIE, ""))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # -- pages ------------------------------------------------------------------------------

    @app.get("/")
    def overview(request: Request, session: Annotated[Session, Depends(current)]) -> Response:
        with console.store() as store:
            st = status(store, console.db)
            events = store.events()[-15:][::-1]
        return page(request, session, "overview.html", status=st, events=events)

    @app.get("/adapters")
    def adapters(request: Request, session: Annotated[Session, Depends(current)]) -> Response:
        with console.store() as store:
            rows, promoted = store.adapters(), store.promoted_version()
            base = store.evaluations("base")
        versions = [("base", "base", report(outcomes_of(base), by_company=False).as_json())] if base else []
        versions = [v for v in versions + [(a.version, a.status, a.metrics) for a in rows] if v[2].get("calibration_j") is not None]
        return page(request, session, "adapters.html", adapters=rows[::-1], promoted=promoted, plot=j_plot(versions) if versions else None,
                    rollback_targets=[a.version for a in rows if a.status == "retired"])

    @app.get("/compare")
    def compare(request: Request, session: Annotated[Session, Depends(current)], candidate: str = "", baseline: str = "") -> Response:
        with console.store() as store:
            rows, promoted = store.adapters(), store.promoted_version()
            candidate = candidate or _default_candidate(rows) or ""
            choices = ["base", *(a.version for a in rows if a.metrics)]
            if not candidate:
                return page(request, session, "compare.html", details=None, choices=choices, error="no adapter has been evaluated yet")
            try:
                d = adapter_details(store, candidate, baseline or None)
            except KeyError as e:
                return page(request, session, "compare.html", 404, details=None, choices=choices, error=str(e.args[0]))
            steps = {i: store.steps(i) for c in d.changed for i in (c.baseline_episode_id, c.candidate_episode_id)}
            openings = {(t.company_id, t.id): t.opening for company in {c.company_id for c in d.changed} for t in store.tickets(company)}
            by_version = {a.version: a for a in rows}
            # Calibration plots come from the evaluation (adapters/<v>/calibration.png); shown only where the file exists.
            plots = {v: f"/adapters/{v}/calibration.png" for v in (d.version, d.baseline)
                     if v in by_version and (Path(by_version[v].path) / "calibration.png").is_file()}
        return page(request, session, "compare.html", details=d, choices=choices, error=None, steps=steps, openings=openings,
                    adapter=by_version.get(d.version), baseline_adapter=by_version.get(d.baseline), promoted=promoted, plots=plots)

    @app.get("/adapters/{version}/calibration.png")
    def calibration_png(version: str, session: Annotated[Session, Depends(current)]) -> Response:
        with console.store() as store:
            adapter = store.adapter(version)
        path = Path(adapter.path) / "calibration.png" if adapter else None
        if path is None or not path.is_file():
            return Response("no calibration plot", 404, media_type="text/plain")
        return FileResponse(path, media_type="image/png")

    @app.get("/review")
    def review(request: Request, session: Annotated[Session, Depends(current)]) -> Response:
        with console.store() as store:
            items = []
            for c in review_items(store):
                episode = store.episode(c.episode_id)
                trace = store.trace(episode.trace_id) if episode and episode.trace_id else None
                items.append((c, trace, store.steps(c.episode_id)))
        return page(request, session, "review.html", items=items)

    @app.get("/decisions")
    def decisions(request: Request, session: Annotated[Session, Depends(current)]) -> Response:
        with console.store() as store:
            rows = store.decisions()[::-1]
        return page(request, session, "decisions.html", decisions=rows)

    # -- decisions: the CLI's functions, the CLI's refusals ---------------------------------------

    Note = Annotated[str, Form()]
    Next = Annotated[str, Form(alias="next")]

    @app.post("/adapters/{version}/approve")
    def approve_post(version: str, session: Annotated[Session, Depends(deciding)], note: Note = "", force: Annotated[bool, Form()] = False,
                     next_page: Next = "/") -> Response:
        def act() -> str:
            if not force and not note.strip():  # the console's one rule of its own; --force's is promotion.py's
                raise DecisionRefused("the console asks for a note with every approval: say why")
            with console.store() as store:
                approve(store, version, by=session.operator.name, note=note.strip(), force=force)
            return f"{version} promoted by {session.operator.name}"
        return decided(session, next_page, act)

    @app.post("/adapters/{version}/reject")
    def reject_post(version: str, session: Annotated[Session, Depends(deciding)], note: Note = "", next_page: Next = "/") -> Response:
        def act() -> str:
            with console.store() as store:
                reject(store, version, by=session.operator.name, note=note.strip())
            return f"{version} rejected by {session.operator.name}"
        return decided(session, next_page, act)

    @app.post("/rollback")
    def rollback_post(session: Annotated[Session, Depends(deciding)], note: Note = "", target: Annotated[str, Form()] = "",
                      next_page: Next = "/adapters") -> Response:
        def act() -> str:
            with console.store() as store:
                to = rollback(store, target or None, by=session.operator.name, note=note.strip())
            return f"promoted: {to or 'base model'} (rolled back by {session.operator.name})"
        return decided(session, next_page, act)

    @app.post("/review/{correction_id}/{verdict}")
    def review_post(correction_id: int, verdict: Literal["accept", "reject"], session: Annotated[Session, Depends(deciding)],
                    note: Note = "", next_page: Next = "/review") -> Response:
        def act() -> str:
            if verdict == "reject" and not note.strip():  # `apprentice review reject` requires --note
                raise ReviewError("a rejection needs a --note saying why")
            with console.store() as store:
                decide_review(store, console.packs, correction_id, accept=verdict == "accept", by=session.operator.name,
                              note=note.strip(), weight=console.production_weight)
            return f"correction {correction_id} {verdict}ed by {session.operator.name}"
        return decided(session, next_page, act)

    # -- the API: the same views as JSON ---------------------------------------------------------

    def api_reader(request: Request) -> Operator:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and (operator := console.operator_for(token.strip())) is not None:
            return operator
        return current(request).operator

    @app.get("/api/status")
    def api_status(_: Annotated[Operator, Depends(api_reader)]) -> dict:
        with console.store() as store:
            return asdict(status(store, console.db))

    @app.get("/api/adapters")
    def api_adapters(_: Annotated[Operator, Depends(api_reader)]) -> list[dict]:
        with console.store() as store:
            return [asdict(a) for a in store.adapters()]

    @app.get("/api/decisions")
    def api_decisions(_: Annotated[Operator, Depends(api_reader)]) -> list[dict]:
        with console.store() as store:
            return [asdict(d) for d in store.decisions()[::-1]]

    return app

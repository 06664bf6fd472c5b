"""Routes for getting in (all public, see `interop.access.RULES`):

* `GET /.well-known/smart-configuration` — SMART App Launch 2 discovery for backend clients.
* `POST /auth/token` — client_credentials with a private_key_jwt assertion -> access token.
* `GET /login`, `POST /login` — people with a local account; `GET /login/oidc` and
  `GET /login/callback` — people with the hospital's OpenID Connect account (code + PKCE).
* `POST /logout` — ends the login (CSRF-checked like every other state-changing form).

Logins and token requests are audited, successful or not; the audit names the account or
client and the address, never a password, an assertion or a token.
"""
from __future__ import annotations

import hmac
import logging
from typing import Any
from urllib.parse import parse_qsl

import orjson
import psycopg
from authlib.integrations.base_client import OAuthError as OidcError
from authlib.integrations.flask_client import OAuth
from flask import Blueprint, Flask, Request, Response, current_app, g, redirect, request, session, url_for
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from werkzeug.wrappers import Response as BaseResponse

from .. import access
from ..domain import audit, scopes
from ..fhir.capability import RESOURCES
from ..services.security import people
from ..services.security.principal import ROLES, Principal
from ..services.security.tokens import CLIENT_ALGORITHMS, OAuthError
from ..tls import ClientTls

log = logging.getLogger("interop.auth")
bp = Blueprint("auth", __name__, template_folder="templates", static_folder="static", static_url_path="/login/static")

MAX_TOKEN_REQUEST = 64 * 1024
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _hub() -> Any:
    return current_app.extensions["interop"]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json", headers=headers or {})


# -- machine clients ------------------------------------------------------------------------------
@bp.get("/.well-known/smart-configuration")
def smart_configuration() -> Response:
    settings = _hub().settings
    return _json({
        "issuer": settings.public_origin(),
        "token_endpoint": settings.token_url(),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(CLIENT_ALGORITHMS),
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": scopes.supported(list(RESOURCES) + ["AuditEvent"]),
        "capabilities": ["client-confidential-asymmetric", "permission-v2", "permission-v1"],
    }, headers={"Cache-Control": "public, max-age=3600"})


def _token_form() -> dict[str, str]:
    if (request.mimetype or "") != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    if (request.content_length or 0) > MAX_TOKEN_REQUEST:
        raise OAuthError("invalid_request", "the request is too large")
    raw = request.stream.read(MAX_TOKEN_REQUEST + 1)
    if len(raw) > MAX_TOKEN_REQUEST:
        raise OAuthError("invalid_request", "the request is too large")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw), max_num_fields=16)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not a valid form") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise OAuthError("invalid_request", f"parameter {key[:40]} is given more than once")
        form[key] = value
    return form


@bp.post("/auth/token")
def token() -> Response:
    hub = _hub()
    client_id: str | None = None
    try:
        form = _token_form()
        with hub.pool.connection() as conn, conn.transaction():
            body, client_id = hub.tokens.issue(conn, form, {hub.settings.token_url(), request.base_url},
                                               hub.pool.connection)
        outcome, description = audit.SUCCESS, f"token issued: {body['scope']}"
        answer = _json(body, 200, NO_STORE)
    except OAuthError as exc:
        client_id = exc.client_id
        outcome, description = audit.MINOR_FAILURE, f"{exc.error}: {exc.description}"
        log.info("token refused (%s): %s", exc.error, exc.description)
        answer = _json(exc.body(), exc.status, NO_STORE)
    access.record_now(audit.Event(audit.Who(request.remote_addr, client=client_id), audit.LOGIN, "E",
                                  outcome=outcome, description=description, type=audit.AUTHENTICATION))
    access.mark_audited()
    return answer


# -- people: local accounts -------------------------------------------------------------------------
def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this hub only (never //host or a scheme)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("worklist.worklist")
    return target


def _login_page(error: str | None = None, status: int = 200, next_: str | None = None) -> Response:
    return access.login_form(error, status, next_)


@bp.get("/login")
def login_page() -> Response:
    return _login_page()


def _start_login(person: Principal, next_: str) -> BaseResponse:
    hub = _hub()
    with hub.pool.connection() as conn, conn.transaction():
        login = people.start(conn, person)
        g.principal = login.principal
        access.audit_change(conn, audit.LOGIN, "E", what=[], patients=[],
                            description=f"login ({person.via}) as {person.role}")
    response = redirect(_safe_next(next_) if person.role != "analyst" else url_for("analytics.dashboard"), code=303)
    response.set_cookie(access.SESSION_COOKIE, login.token, httponly=True, secure=request.is_secure, samesite="Lax",
                        path="/")
    response.delete_cookie(access.LOGIN_CSRF_COOKIE, path="/login")
    return response


@bp.post("/login")
def login() -> BaseResponse:
    hub = _hub()
    sent, kept = request.form.get("csrf_token", ""), request.cookies.get(access.LOGIN_CSRF_COOKIE, "")
    next_ = request.form.get("next", "")
    if not access.same_origin() or not kept or not hmac.compare_digest(sent.encode(), kept.encode()):
        return _login_page("Phiên đăng nhập hết hạn, hãy thử lại · The login form expired; please try again", 403, next_)
    name, password = request.form.get("username", "").strip(), request.form.get("password", "")
    if not name or not password or len(name) > 128 or len(password) > 1024:
        return _login_page("Nhập tên và mật khẩu · Enter your user name and password", 400, next_)
    refused: people.LoginRefused | None = None
    with hub.pool.connection() as conn, conn.transaction():  # a failure is counted (committed), then answered
        try:
            person = people.check_password(conn, hub.settings, name, password)
        except people.LoginRefused as exc:
            refused = exc
    if refused is not None:
        access.record_now(audit.Event(audit.Who(request.remote_addr, person=name[:128]), audit.LOGIN, "E",
                                      outcome=audit.MINOR_FAILURE, description=f"login refused: {refused.reason}",
                                      type=audit.AUTHENTICATION))
        access.mark_audited()
        log.info("login refused (%s)", "locked" if refused.locked else "wrong name or password")
        message = ("Tài khoản tạm khoá do nhập sai nhiều lần · The account is locked after repeated failures"
                   if refused.locked else "Sai tên đăng nhập hoặc mật khẩu · Wrong user name or password")
        return _login_page(message, 401, next_)
    return _start_login(person, next_)


@bp.post("/logout")
def logout() -> BaseResponse:
    hub = _hub()
    with hub.pool.connection() as conn, conn.transaction():
        people.end(conn, request.cookies.get(access.SESSION_COOKIE, ""))
        access.audit_change(conn, audit.LOGOUT, "E", what=[], patients=[], description="logout")
    response = redirect(url_for("auth.login_page"), code=303)
    response.delete_cookie(access.SESSION_COOKIE, path="/")
    return response


# -- people: the hospital's OpenID Connect provider ---------------------------------------------------
def _oidc() -> Any:
    """The Authlib client for INTEROP_OIDC_ISSUER (made on first use in each process)."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    oauth: OAuth | None = app.extensions.get("interop.oidc")
    if oauth is None:
        settings = _hub().settings
        oauth = OAuth(app)
        tls = ClientTls.from_settings(settings).requests_kwargs()  # Authlib sets them on its requests session
        oauth.register("hospital", client_id=settings.oidc_client_id, client_secret=settings.oidc_client_secret,
                       server_metadata_url=f"{settings.oidc_issuer.rstrip('/')}/.well-known/openid-configuration",
                       client_kwargs={"scope": "openid profile", "code_challenge_method": "S256", **tls,
                                      "token_endpoint_auth_method": "client_secret_basic" if settings.oidc_client_secret
                                      else "none"})
        app.extensions["interop.oidc"] = oauth
    _ensure_secret_key()
    return oauth.hospital


def _ensure_secret_key() -> None:
    """Flask's signed cookie carries the OIDC state and PKCE verifier between the two legs; its
    key is derived from the hub's signing key, so every replica shares it."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if not app.secret_key:
        hub = _hub()
        app.secret_key = hub.tokens.derive_secret(b"flask session", hub.pool.connection).hex()
        app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                          SESSION_COOKIE_NAME="interop_oidc", SESSION_COOKIE_SECURE=hub.settings.tls)


class _OidcSessionInterface(SecureCookieSessionInterface):
    """Flask opens a request's session before any view runs, so its key must exist by then: derive
    it here, for the OIDC routes, on the first request each process serves there."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not app.secret_key and request.path.startswith("/login/") and app.extensions["interop"].settings.oidc_issuer:
            _ensure_secret_key()
        return super().open_session(app, request)


@bp.record_once
def _install_session_interface(state: Any) -> None:
    state.app.session_interface = _OidcSessionInterface()


@bp.get("/login/oidc")
def oidc_start() -> BaseResponse:
    if not _hub().settings.oidc_issuer:
        return _login_page("Đăng nhập OpenID chưa được cấu hình · OpenID Connect is not configured", 404)
    session["interop_next"] = _safe_next(request.args.get("next"))
    answer: BaseResponse = _oidc().authorize_redirect(url_for("auth.oidc_callback", _external=True))
    return answer


def _role(claims: dict[str, Any], claim: str) -> str | None:
    value = claims.get(claim)
    values = value if isinstance(value, list) else str(value or "").replace(",", " ").split()
    return next((str(v) for v in values if str(v) in ROLES), None)


@bp.get("/login/callback")
def oidc_callback() -> BaseResponse:
    settings = _hub().settings
    if not settings.oidc_issuer:
        return _login_page("Đăng nhập OpenID chưa được cấu hình · OpenID Connect is not configured", 404)
    try:
        token = _oidc().authorize_access_token()
    except (OidcError, ValueError, KeyError, psycopg.Error) as exc:
        log.info("OpenID Connect login failed (%s)", type(exc).__name__)
        return _login_page("Đăng nhập không thành công · The login did not succeed", 401)
    claims = dict(token.get("userinfo") or {})
    name = str(claims.get("preferred_username") or claims.get("email") or claims.get("sub") or "")
    role = _role(claims, settings.oidc_roles_claim)
    site = claims.get(settings.oidc_site_claim)
    if not name or role is None or (role == "clinician" and not site):
        access.record_now(audit.Event(audit.Who(request.remote_addr, person=name[:128] or None), audit.LOGIN, "E",
                                      outcome=audit.MINOR_FAILURE, type=audit.AUTHENTICATION,
                                      description="OpenID Connect login without a hub role (or a clinician without a site)"))
        access.mark_audited()
        return _login_page("Tài khoản chưa được cấp quyền dùng hệ thống · Your account has no role in this hub", 403)
    person = Principal("person", name[:128], role=role, site=str(site).upper() if site else None, via="oidc")
    return _start_login(person, session.pop("interop_next", ""))

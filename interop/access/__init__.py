"""Access control for the HTTP edges: who is calling, may they, and the audit record of it.

Every request passes `guard` before its view runs:

* A bearer token (`Authorization: Bearer ...`) names a machine client (SMART Backend Services):
  the hub's own tokens or a trusted provider's, checked without a database round trip. FHIR
  interactions need a `system/` scope for the type and interaction; the hub's own endpoints
  need `hub:admin`, `hub:analytics` or `hub:metrics`.
* A login cookie names a person with a role. People use the pages (worklist, dashboard) and
  admins the operators' endpoints; the FHIR API takes bearer tokens only (so a page elsewhere
  cannot drive it with a person's cookie), except that admins may search AuditEvents.
  State-changing requests from a login need its CSRF token (form field or X-CSRF-Token header)
  and a same-origin request.
* Nothing: only `RULES`' public endpoints answer (the SMART configuration, the token endpoint,
  /fhir/metadata, /healthz, /readyz, the login page). Others are 401 with
  `WWW-Authenticate: Bearer` (and the login form, for pages); an authenticated caller without
  the right scope or role gets 403. Both as OperationOutcome where JSON is spoken.

Views name what they served (`note`), changes are audited in their own transaction
(`audit_change`), and `after` records the rest: reads, searches, refusals.
"""
from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from flask import Flask, Response, current_app, g, render_template, request

from ..domain import audit
from ..services.security import audit as audit_store
from ..services.security import people
from ..services.security.audit import AuditBacklog
from ..services.security.principal import Principal
from ..services.security.tokens import InvalidToken

log = logging.getLogger("interop.access")

SESSION_COOKIE = "interop_session"
LOGIN_CSRF_COOKIE = "interop_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
FHIR_BLUEPRINTS = ("fhir", "operations", "stow")  # stow: STOW-RS, a create of ImagingStudy


@dataclass(frozen=True)
class Rule:
    public: bool = False
    roles: tuple[str, ...] = ()        # people with one of these roles may
    hub_scope: str | None = None       # clients with this scope may
    page: bool = False                 # an HTML page: 401 shows the login form
    client_scopes: bool = False        # any machine client; the view checks its scopes (Bulk Data, $status)


PERSON = ("radiologist", "clinician", "analyst", "admin")
RULES: dict[str, Rule] = {
    "fhir.metadata": Rule(public=True),
    # System-level interactions: the view checks each entry of a Bundle (transaction, batch) or
    # each resource type (history) against the token's scopes.
    "fhir.transaction_or_batch": Rule(client_scopes=True),
    "fhir.history_system": Rule(client_scopes=True),
    "auth.smart_configuration": Rule(public=True),
    "auth.token": Rule(public=True),
    "auth.login_page": Rule(public=True),
    "auth.login": Rule(public=True),
    "auth.oidc_start": Rule(public=True),
    "auth.oidc_callback": Rule(public=True),
    "auth.static": Rule(public=True),
    "health.healthz": Rule(public=True),
    "health.readyz": Rule(public=True),
    "auth.logout": Rule(roles=PERSON),
    "health.metrics": Rule(roles=("admin",), hub_scope="hub:metrics"),
    "worklist.worklist": Rule(roles=("radiologist", "clinician"), page=True),
    "worklist.study": Rule(roles=("radiologist", "clinician"), page=True),
    "worklist.review": Rule(roles=("radiologist", "clinician")),
    "worklist.rendered": Rule(roles=("radiologist", "clinician")),
    # the study page's DICOM viewer: the report's own study, read-only, radiologists only
    "worklist.viewer_layout": Rule(roles=("radiologist",)),
    "worklist.wado_study": Rule(roles=("radiologist",)),
    "worklist.wado_instance": Rule(roles=("radiologist",)),
    "worklist.static": Rule(roles=PERSON),
    "analytics.dashboard": Rule(roles=("analyst", "admin"), page=True),
    "analytics.static": Rule(roles=("analyst", "admin")),
    "admin.queue_page": Rule(roles=("admin",), hub_scope="hub:admin", page=True),
}
BLUEPRINT_RULES: dict[str, Rule] = {
    "analytics": Rule(roles=("analyst", "admin"), hub_scope="hub:analytics"),
    "admin": Rule(roles=("admin",), hub_scope="hub:admin"),
    "bulk": Rule(client_scopes=True),           # interop.fhir.bulk: $export, by scope (hub:analytics or system/)
    "subscription_status": Rule(client_scopes=True),  # interop.fhir.subscription_status: Subscription/$status
}
INTERACTIONS = {
    "fhir.create": "create", "fhir.update": "update", "fhir.read": "read", "fhir.vread": "vread",
    "fhir.history": "history-instance", "fhir.search_type": "search-type",
    "operations.review_report": "operation", "operations.acknowledge": "operation",
    "operations.transfer_decision": "operation",
    "fhir.conditional_update": "update", "fhir.patch": "patch", "fhir.conditional_patch": "patch",
    "fhir.delete": "delete", "fhir.conditional_delete": "delete", "fhir.history_type": "history-type",
    "fhir.transaction_or_batch": "transaction", "fhir.history_system": "history-system",
}
METHOD_INTERACTIONS = {"DELETE": "delete", "PATCH": "patch", "PUT": "update", "POST": "create", "GET": "search-type"}


class Refused(Exception):
    """401 (who are you?) or 403 (not you); the message is safe to show."""

    def __init__(self, status: int, reason: str, bearer_error: str | None = None):
        super().__init__(reason)
        self.status, self.reason, self.bearer_error = status, reason, bearer_error


def _hub() -> Any:
    return current_app.extensions["interop"]


def principal() -> Principal | None:
    """The caller of this request (None: anonymous, on a public endpoint)."""
    found: Principal | None = g.get("principal")
    return found


def who() -> audit.Who:
    p = principal()
    address = request.remote_addr
    if p is None:
        return audit.Who(address)
    if p.is_person:
        return audit.Who(address, person=p.name, role=p.role)
    return audit.Who(address, client=p.name)


def note(subtype: dict[str, str], action: str, *, what: list[str] | None = None, patients: list[str] | None = None,
         query: str | None = None) -> None:
    """What this request served or tried, for the audit record `after` writes."""
    g.audit = audit.Event(who(), subtype, action, what=list(what or []), patients=list(patients or []), query=query)


def audit_change(conn: Any, subtype: dict[str, str], action: str, *, what: list[str], patients: list[str],
                 description: str | None = None) -> None:
    """Record a change in the caller's transaction (the change and its record stand or fall together)."""
    audit_store.record(conn, audit.Event(who(), subtype, action, what=what, patients=patients,
                                                     description=description))
    g.audited = True


def audit_read(subtype: dict[str, str], action: str, *, what: list[str], patients: list[str],
               query: str | None = None) -> None:
    """Record what a read or search served (through the process's AuditWriter, written within
    a twentieth of a second; see interop.services.security.audit)."""
    _hub().audit.submit(audit.Event(who(), subtype, action, what=what, patients=patients, query=query))
    g.audited = True


def mark_audited() -> None:
    """This request's audit record is written (by the view itself)."""
    g.audited = True


def record_now(event: audit.Event) -> None:
    """Record an event on its own (a login, a refusal): its own transaction."""
    with _hub().pool.connection() as conn, conn.transaction():
        audit_store.record(conn, event)


# -- authentication -------------------------------------------------------------------------------
def _bearer() -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Refused(401, "Authorization must be `Bearer <access token>`", "invalid_request")
    return token.strip()


def _authenticate() -> Principal | None:
    hub = _hub()
    token = _bearer()
    if token is not None:
        try:
            return hub.tokens.check(token, hub.pool.connection)  # type: ignore[no-any-return]
        except InvalidToken as exc:
            raise Refused(401, str(exc), "invalid_token") from None
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        with hub.pool.connection() as conn:
            return people.resume(conn, hub.settings, cookie)
    return None


def _rule(endpoint: str) -> Rule | None:
    return RULES.get(endpoint) or BLUEPRINT_RULES.get(endpoint.split(".", 1)[0])


def _fhir_interaction(endpoint: str) -> tuple[str, str]:
    rtype = (request.view_args or {}).get("rtype") or "DiagnosticReport"
    return str(rtype), INTERACTIONS.get(endpoint) or METHOD_INTERACTIONS.get(request.method, "read")


def _authorize(endpoint: str, rule: Rule | None, who_: Principal | None) -> None:
    blueprint = endpoint.split(".", 1)[0]
    if rule is not None and rule.public:
        return
    if who_ is None:
        raise Refused(401, "authentication is required")
    if rule is not None and rule.client_scopes:
        if who_.is_person:
            raise Refused(403, "the FHIR API takes SMART backend access tokens; people use the pages")
        return
    if blueprint in FHIR_BLUEPRINTS:
        rtype, interaction = _fhir_interaction(endpoint)
        if who_.is_person:
            if who_.role == "admin" and rtype == "AuditEvent" and interaction in ("read", "search-type"):
                return
            raise Refused(403, "the FHIR API takes SMART backend access tokens; people use the pages")
        if not who_.grant.allows_interaction(rtype, interaction):
            raise Refused(403, f"the token's scopes do not allow {interaction} on {rtype}")
        return
    if rule is None:  # a route nobody gave a rule: closed
        raise Refused(403, "this endpoint is not open to this caller")
    if who_.is_person:
        if who_.role not in rule.roles:
            raise Refused(403, f"this needs the role {' or '.join(rule.roles) or 'of a machine client'}")
        return
    if rule.hub_scope is None or rule.hub_scope not in who_.grant.hub:
        raise Refused(403, f"this needs the scope {rule.hub_scope}" if rule.hub_scope else "this is for people, not clients")


def same_origin() -> bool:
    """The browser says the request comes from the hub's own pages (Fetch metadata, Origin)."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


def csrf_token() -> str:
    p = principal()
    return p.csrf if p is not None and p.csrf else ""


def _check_csrf(who_: Principal) -> None:
    if request.method not in STATE_CHANGING or not who_.is_person:
        return
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD) or ""
    if not same_origin() or not who_.csrf or not hmac.compare_digest(sent.encode(), who_.csrf.encode()):
        raise Refused(403, "cross-site or unsigned request refused (the page's CSRF token is missing or wrong)")


def _outcome(status: int, reason: str) -> bytes:
    code = "login" if status == 401 else "forbidden"
    return orjson.dumps({"resourceType": "OperationOutcome",
                         "issue": [{"severity": "error", "code": code, "diagnostics": reason}]})


def login_form(error: str | None = None, status: int = 200, next_: str | None = None) -> Response:
    """The login page, with a fresh login-CSRF token in its form and in a cookie (double submit:
    a page elsewhere cannot read the cookie, so it cannot post a login of its own choosing)."""
    login_csrf = secrets.token_urlsafe(24)
    body = render_template("auth/login.html", error=error, next=next_ if next_ is not None else request.args.get("next", ""),
                           login_csrf=login_csrf, oidc=bool(_hub().settings.oidc_issuer))
    response = Response(body, status=status, content_type="text/html; charset=utf-8", headers={
        "Cache-Control": "no-store",  # and never framed: a login form inside another page is a trap
        "Content-Security-Policy": "default-src 'self'; form-action 'self' " + _oidc_origin() + "; frame-ancestors 'none'"})
    response.set_cookie(LOGIN_CSRF_COOKIE, login_csrf, max_age=1800, httponly=True, secure=request.is_secure,
                        samesite="Strict", path="/login")
    return response


def _oidc_origin() -> str:
    issuer = _hub().settings.oidc_issuer
    if not issuer:
        return ""
    split = urlsplit(issuer)
    return f"{split.scheme}://{split.netloc}"


def refusal(exc: Refused, page: bool = False) -> Response:
    if page and exc.status == 401:
        response = login_form(None, 401, request.full_path.rstrip("?"))
    else:
        response = Response(_outcome(exc.status, exc.reason), status=exc.status,
                            content_type="application/fhir+json; charset=utf-8")
    if exc.status == 401:
        challenge = 'Bearer realm="interop-hub"'
        if exc.bearer_error:
            challenge += f', error="{exc.bearer_error}", error_description="{exc.reason}"'
        response.headers["WWW-Authenticate"] = challenge
    return response


def guard() -> Response | None:
    """before_request: authenticate, authorize, check CSRF; a refusal answers at once."""
    endpoint = request.endpoint
    if endpoint is None:  # no such route: the 404 follows, and says nothing about data
        return None
    rule = _rule(endpoint)
    try:
        who_ = _authenticate()
        g.principal = who_
        _authorize(endpoint, rule, who_)
        if who_ is not None and not (rule is not None and rule.public):
            _check_csrf(who_)
    except Refused as exc:
        g.refused = exc
        log.info("refused %s %s: %s (%s)", request.method, request.url_rule, exc.status, exc.reason)
        return refusal(exc, page=bool(rule and rule.page))
    return None


def _should_audit_refusal(exc: Refused) -> bool:
    # Presented but wrong credentials, and authenticated callers going where they may not: yes.
    # Plain anonymous knocks: no (they would let anyone fill the audit table).
    return exc.status == 403 or exc.bearer_error is not None


def after(response: Response) -> Response:
    """after_request: security headers, and the audit record of what was not recorded yet."""
    if request.is_secure:
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if g.get("audited") and response.status_code < 400:  # recorded with the change (a failure rolled it back)
        return response
    event: audit.Event | None = g.get("audit")
    refused: Refused | None = g.get("refused")
    if refused is not None and _should_audit_refusal(refused):
        event = audit.Event(who(), audit.interaction(request.method.lower()), "E", what=[request.path[:200]])
        event.outcome, event.description = audit.MINOR_FAILURE, f"refused {refused.status}: {refused.reason}"
    elif event is not None and response.status_code >= 400:
        event.outcome = audit.MINOR_FAILURE if response.status_code < 500 else audit.SERIOUS_FAILURE
        event.description = f"HTTP {response.status_code}"
    elif event is None and request.blueprint in FHIR_BLUEPRINTS and request.endpoint != "fhir.metadata" \
            and principal() is not None:
        rtype, interaction = _fhir_interaction(request.endpoint or "")
        event = audit.Event(who(), audit.interaction(interaction), audit.ACTIONS.get(interaction, "E"),
                            what=[request.path[:200]])
        if response.status_code >= 400:
            event.outcome, event.description = audit.MINOR_FAILURE, f"HTTP {response.status_code}"
    if event is None:
        return response
    try:
        _hub().audit.submit(event)
    except AuditBacklog:  # a read that cannot be recorded is not served
        log.error("audit records cannot be written: refusing the response")
        return Response(_outcome(503, "the audit trail cannot be written now; nothing was served"),
                        status=503, content_type="application/fhir+json; charset=utf-8")
    return response


def install(app: Flask) -> None:
    app.before_request(guard)
    app.after_request(after)
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["current_person"] = principal


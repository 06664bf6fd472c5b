"""Security (issue 12): SMART Backend Services as ONC's Inferno checks it, scopes on every FHIR
interaction, every route closed to strangers, people's logins and roles, CSRF, the audit trail,
and the allow-list of URLs the hub calls. Against the Flask app on a real PostgreSQL; the CLI
as operators run it."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient

from interop.app import create_app
from interop.config import Settings
from interop.store.db import connect
from tests.fixtures.auth import (
    PASSWORD,
    ClientKey,
    PersonClient,
    add_person,
    csrf_of,
    log_in,
    register,
    token_form,
    with_token,
)
from tests.fixtures.hub import TEST_URL_ALLOW
from tests.test_fhir_api import FHIR, outcome, post, study

TOKEN_URL = "http://localhost/auth/token"  # where Flask's test client reaches the token endpoint


def ask(anonymous: FlaskClient, form: dict[str, str]) -> Any:
    return anonymous.post("/auth/token", data=form)


def oauth_error(answer: Any, status: int, error: str) -> None:
    assert answer.status_code == status, answer.get_data(as_text=True)
    assert answer.mimetype == "application/json" and answer.get_json()["error"] == error
    assert answer.headers["Cache-Control"] == "no-store"


def assertions_kept(db_url: str) -> int:
    with connect(db_url) as conn:
        return int(conn.execute("SELECT count(*) AS n FROM client_assertion").fetchone()["n"])


def audit_events(app: Flask, db_url: str) -> list[dict[str, Any]]:
    assert app.extensions["interop"].audit.flush()  # the records of reads are written in batches
    return every_audit_event(db_url)


def every_audit_event(db_url: str) -> list[dict[str, Any]]:
    """The whole audit trail, oldest first, as the hub shows it (AuditEvent resources)."""
    from interop.domain.audit import AuditQuery
    from interop.services.security import audit

    with connect(db_url) as conn:
        return audit.search(conn, AuditQuery(count=1000, newest_first=False))[1]


# -- discovery --------------------------------------------------------------------------------------
def test_smart_configuration_and_capability_statement_are_public(anonymous: FlaskClient) -> None:
    found = anonymous.get("/.well-known/smart-configuration")
    assert found.status_code == 200 and found.mimetype == "application/json"
    config = found.get_json()
    assert config["token_endpoint"].endswith("/auth/token")
    assert "client_credentials" in config["grant_types_supported"]
    assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
    assert {"RS384", "ES384"} <= set(config["token_endpoint_auth_signing_alg_values_supported"])
    assert {"client-confidential-asymmetric", "permission-v2"} <= set(config["capabilities"])
    assert "system/DiagnosticReport.rs" in config["scopes_supported"]
    meta = anonymous.get("/fhir/metadata").get_json()
    security = meta["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    [uris] = [e for e in security["extension"] if e["url"].endswith("/oauth-uris")]
    assert uris["extension"] == [{"url": "token", "valueUri": config["token_endpoint"]}]


# -- the token endpoint, as Inferno's SMART Backend Services suite checks it --------------------------
def test_a_valid_assertion_gets_a_short_lived_token(anonymous: FlaskClient, db_url: str, smart_key: ClientKey) -> None:
    client_id = register(db_url, smart_key, "system/Patient.rs system/DiagnosticReport.rs")
    answer = ask(anonymous, token_form(smart_key.assertion(client_id, TOKEN_URL), "system/Patient.rs"))
    assert answer.status_code == 200 and answer.headers["Cache-Control"] == "no-store"
    body = answer.get_json()
    assert body["token_type"].lower() == "bearer" and 0 < body["expires_in"] <= 300
    assert body["scope"] == "system/Patient.rs" and "refresh_token" not in body
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] <= 300 and claims["sub"] == client_id
    assert with_token(anonymous, body["access_token"]).get("/fhir/Patient").status_code == 200


def test_an_rs384_client_is_served_too(anonymous: FlaskClient, db_url: str) -> None:
    key = ClientKey.new("RS384")
    client_id = register(db_url, key, "system/Patient.rs")
    assert ask(anonymous, token_form(key.assertion(client_id, TOKEN_URL), "system/Patient.rs")).status_code == 200


def test_bad_requests_are_refused_and_change_nothing(anonymous: FlaskClient, db_url: str, smart_key: ClientKey) -> None:
    client_id = register(db_url, smart_key)
    good = smart_key.assertion(client_id, TOKEN_URL)
    oauth_error(ask(anonymous, {**token_form(good), "grant_type": "password"}), 400, "unsupported_grant_type")
    oauth_error(ask(anonymous, {**token_form(good), "client_assertion_type": "urn:other"}), 400, "invalid_request")
    oauth_error(ask(anonymous, {k: v for k, v in token_form(good).items() if k != "client_assertion"}), 400,
                "invalid_request")
    oauth_error(anonymous.post("/auth/token", data=json.dumps(token_form(good)), content_type="application/json"),
                400, "invalid_request")
    oauth_error(anonymous.post("/auth/token", data=b"grant_type=client_credentials&x=" + b"a" * (70 * 1024),
                               content_type="application/x-www-form-urlencoded"), 400, "invalid_request")
    oauth_error(anonymous.post("/auth/token", data=b"\xff\xfe=%%%", content_type="application/x-www-form-urlencoded"),
                400, "invalid_request")
    oauth_error(anonymous.post("/auth/token", data="grant_type=client_credentials&grant_type=client_credentials",
                               content_type="application/x-www-form-urlencoded"), 400, "invalid_request")
    assert assertions_kept(db_url) == 0  # nothing was taken from those
    # the same assertion is still good: none of the refusals used it up
    assert ask(anonymous, token_form(good)).status_code == 200


def test_bad_assertions_are_invalid_client(anonymous: FlaskClient, db_url: str, smart_key: ClientKey,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    client_id = register(db_url, smart_key)
    impostor = ClientKey(ClientKey.new().private, smart_key.kid, "ES384")  # another key, the same kid
    cases = {
        "bad signature": impostor.assertion(client_id, TOKEN_URL),
        "expired": smart_key.assertion(client_id, TOKEN_URL, exp=int(time.time()) - 120),
        "exp too far ahead": smart_key.assertion(client_id, TOKEN_URL, lifetime=3600),
        "wrong aud": smart_key.assertion(client_id, "https://other.example/token"),
        "iss is not sub": smart_key.assertion(client_id, TOKEN_URL, sub="someone-else"),
        "no jti": smart_key.assertion(client_id, TOKEN_URL, jti=None),
        "unknown client": smart_key.assertion("nobody", TOKEN_URL),
        "unknown kid": ClientKey(smart_key.private, "other-kid", "ES384").assertion(client_id, TOKEN_URL),
        "alg none": jwt.encode({"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": int(time.time()) + 60,
                                "jti": "n1"}, None, algorithm="none", headers={"kid": smart_key.kid}),
        "not a JWT": "not.a.jwt",
    }
    # HS256 signed with the registered public key as the secret (the classic confusion attack)
    public_pem = json.dumps(smart_key.jwk).encode()
    claims = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": int(time.time()) + 60, "jti": "h1"}
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": smart_key.kid}).encode()).rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    signature = base64.urlsafe_b64encode(hmac.new(public_pem, header + b"." + payload, hashlib.sha256).digest()).rstrip(b"=")
    cases["HS256 with the public key"] = (header + b"." + payload + b"." + signature).decode()
    for why, assertion in cases.items():
        answer = ask(anonymous, token_form(assertion))
        assert answer.status_code == 401 and answer.get_json()["error"] == "invalid_client", why
    replayed = smart_key.assertion(client_id, TOKEN_URL)
    token = ask(anonymous, token_form(replayed)).get_json()["access_token"]
    oauth_error(ask(anonymous, token_form(replayed)), 401, "invalid_client")  # the same jti again
    logged = caplog.text
    assert "refused" in logged  # the refusals were logged ...
    for secret in [*cases.values(), replayed, token]:  # ... without an assertion or a token in them
        assert not secret.split(".")[-1] or secret.split(".")[-1] not in logged


def test_scopes_are_narrowed_to_the_registration(anonymous: FlaskClient, db_url: str, smart_key: ClientKey) -> None:
    client_id = register(db_url, smart_key, "system/*.rs")
    narrowed = ask(anonymous, token_form(smart_key.assertion(client_id, TOKEN_URL), "system/Patient.cruds"))
    assert narrowed.status_code == 200 and narrowed.get_json()["scope"] == "system/Patient.rs"
    for scope in ("system/Patient.c", "hub:admin", "patient/Patient.rs", "system/Observation.rs?category=x",
                  "launch openid", ""):
        oauth_error(ask(anonymous, token_form(smart_key.assertion(client_id, TOKEN_URL), scope)), 400, "invalid_scope")


class JwksServer:
    """A key server on loopback: serves `keys` as a JWKS with Cache-Control max-age=600, counting fetches."""

    def __init__(self, keys: list[ClientKey]):
        self.fetches: list[str] = []
        outer = self

        class Keys(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches.append(self.path)
                body = json.dumps({"keys": [k.jwk for k in keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "public, max-age=600")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Keys)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/jwks.json"

    def close(self) -> None:
        self.server.shutdown()


def test_a_client_registered_by_jwks_url_is_served_from_the_cache(anonymous: FlaskClient, db_url: str,
                                                                  smart_key: ClientKey) -> None:
    keys = JwksServer([smart_key])
    try:
        from interop.store import security as accounts

        with connect(db_url, autocommit=True) as conn:
            accounts.add_client(conn, "by-url", "vendor", "system/Patient.rs", jwks_url=keys.url)
        for _ in range(3):
            assert ask(anonymous, token_form(smart_key.assertion("by-url", TOKEN_URL), "system/Patient.rs")).status_code == 200
        assert keys.fetches == ["/jwks.json"]  # max-age=600: fetched once
    finally:
        keys.close()


def test_tokens_of_a_trusted_identity_provider(db_url: str) -> None:
    idp = ClientKey.new("RS384")
    keys = JwksServer([idp])
    app = create_app(Settings.from_env({"DATABASE_URL": db_url, "INTEROP_TRUSTED_ISSUER": "https://idp.benhvien.example",
                                        "INTEROP_TRUSTED_JWKS_URL": keys.url}))
    try:
        def issued(**changes: Any) -> str:
            now = int(time.time())
            claims = {"iss": "https://idp.benhvien.example", "sub": "svc-ris", "azp": "hospital-ris",
                      "aud": "http://127.0.0.1:8080/fhir", "iat": now, "exp": now + 300, "scope": "system/Patient.rs"}
            return jwt.encode({**claims, **changes}, idp.private, algorithm="RS384", headers={"kid": idp.kid})

        caller = app.test_client()
        assert caller.get("/fhir/Patient", headers={"Authorization": f"Bearer {issued()}"}).status_code == 200
        outcome(post(caller, "Patient", {"resourceType": "Patient"}, Authorization=f"Bearer {issued()}"), 403)
        for bad in (issued(aud="https://elsewhere/fhir"), issued(iss="https://other-idp.example"),
                    issued(exp=int(time.time()) - 600),
                    jwt.encode({"iss": "https://idp.benhvien.example", "aud": "http://127.0.0.1:8080/fhir",
                                "exp": int(time.time()) + 60, "scope": "system/*.cruds"}, ClientKey.new("RS384").private,
                               algorithm="RS384", headers={"kid": idp.kid})):
            outcome(caller.get("/fhir/Patient", headers={"Authorization": f"Bearer {bad}"}), 401)
        assert keys.fetches[:1] == ["/jwks.json"]
        events = [e for e in audit_events(app, db_url) if e["subtype"][0]["code"] == "read" or
                  e["subtype"][0]["code"] == "search-type"]
        assert any(e["agent"][0]["name"] == "hospital-ris" for e in events)
    finally:
        app.extensions["interop"].close()
        keys.close()


# -- bearer tokens on the API -----------------------------------------------------------------------
def token_for(anonymous: FlaskClient, db_url: str, scopes: str) -> str:
    key = ClientKey.new()
    client_id = register(db_url, key, scopes)
    answer = ask(anonymous, token_form(key.assertion(client_id, TOKEN_URL), scopes))
    assert answer.status_code == 200, answer.get_json()
    return str(answer.get_json()["access_token"])


def test_missing_bad_and_tampered_tokens_are_401(app: Flask, db_url: str) -> None:
    anonymous = app.test_client()
    none = anonymous.get("/fhir/Patient")
    outcome(none, 401, "login")
    assert none.headers["WWW-Authenticate"].startswith("Bearer")
    garbage = anonymous.get("/fhir/Patient", headers={"Authorization": "Bearer nonsense"})
    outcome(garbage, 401)
    assert 'error="invalid_token"' in garbage.headers["WWW-Authenticate"]
    outcome(anonymous.get("/fhir/Patient", headers={"Authorization": "Basic dXNlcjpwdw=="}), 401)
    token = token_for(anonymous, db_url, "system/Patient.rs")
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["scope"] = "system/*.cruds"
    forged = ".".join([head, base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode(), sig])
    outcome(anonymous.get("/fhir/Patient", headers={"Authorization": f"Bearer {forged}"}), 401)
    other_hub = jwt.encode({**claims, "scope": "system/*.cruds"}, ClientKey.new().private, algorithm="ES384",
                           headers={"kid": jwt.get_unverified_header(token)["kid"]})
    outcome(anonymous.get("/fhir/Patient", headers={"Authorization": f"Bearer {other_hub}"}), 401)


def test_an_expired_token_is_401(db_url: str) -> None:
    app = create_app(Settings.from_env({"DATABASE_URL": db_url, "INTEROP_TOKEN_SECONDS": "1"}))
    try:
        anonymous = app.test_client()
        token = token_for(anonymous, db_url, "system/Patient.rs")
        time.sleep(2.1)  # the token's whole life: the refusal is what is checked, not a duration
        refused = anonymous.get("/fhir/Patient", headers={"Authorization": f"Bearer {token}"})
        outcome(refused, 401)
        assert "expired" in refused.headers["WWW-Authenticate"]
    finally:
        app.extensions["interop"].close()
    with pytest.raises(ValueError):
        Settings.from_env({"INTEROP_TOKEN_SECONDS": "3600"})


def test_scopes_are_enforced_per_type_and_interaction(app: Flask, db_url: str) -> None:
    anonymous = app.test_client()
    readers = with_token(app.test_client(), token_for(anonymous, db_url, "system/Patient.rs"))
    assert readers.get("/fhir/Patient").status_code == 200
    outcome(post(readers, "Patient", {"resourceType": "Patient"}), 403, "forbidden")
    outcome(readers.get("/fhir/ImagingStudy"), 403, "forbidden")
    outcome(readers.post("/fhir/DiagnosticReport/x/$review", data="{}", content_type=FHIR), 403)
    writers = with_token(app.test_client(), token_for(anonymous, db_url, "system/Patient.c"))
    created = post(writers, "Patient", {"resourceType": "Patient", "name": [{"family": "Trần"}]})
    assert created.status_code == 201
    outcome(writers.get("/fhir/Patient"), 403)
    outcome(writers.get(f"/fhir/Patient/{created.get_json()['id']}"), 403)
    outcome(writers.put(f"/fhir/Patient/{created.get_json()['id']}", data=json.dumps(
        {**created.get_json(), "gender": "male"}), content_type=FHIR), 403)
    v1 = with_token(app.test_client(), token_for(anonymous, db_url, "system/Patient.read"))
    assert v1.get(f"/fhir/Patient/{created.get_json()['id']}").status_code == 200
    outcome(post(v1, "Patient", {"resourceType": "Patient"}), 403)
    # _include stays within the scopes: the Patient is left out for a token that cannot read Patients
    studies = with_token(app.test_client(), token_for(anonymous, db_url, "system/ImagingStudy.crs"))
    assert post(studies, "ImagingStudy", study(subject=f"Patient/{created.get_json()['id']}")).status_code == 201
    bundle = studies.get("/fhir/ImagingStudy?_include=ImagingStudy:patient").get_json()
    assert {e["resource"]["resourceType"] for e in bundle["entry"]} == {"ImagingStudy"}


def test_a_disabled_client_is_refused_tokens_and_its_tokens_stop(app: Flask, db_url: str) -> None:
    anonymous = app.test_client()
    key = ClientKey.new()
    client_id = register(db_url, key, "system/Patient.rs")
    token = ask(anonymous, token_form(key.assertion(client_id, TOKEN_URL), "system/Patient.rs")).get_json()["access_token"]
    reader = with_token(app.test_client(), token)
    assert reader.get("/fhir/Patient").status_code == 200
    with connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE client SET disabled_at = now() WHERE client_id = %s", (client_id,))
    oauth_error(ask(anonymous, token_form(key.assertion(client_id, TOKEN_URL), "system/Patient.rs")), 401, "invalid_client")
    deadline = time.monotonic() + 30
    while reader.get("/fhir/Patient").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    outcome(reader.get("/fhir/Patient"), 401)


# -- every route -------------------------------------------------------------------------------------
PUBLIC = {"/fhir/metadata", "/.well-known/smart-configuration", "/healthz", "/readyz", "/login", "/auth/token",
          "/login/oidc", "/login/callback", "/login/static/<path:filename>"}


def _routes(app: Flask) -> Iterator[tuple[str, str, str]]:
    values = {"rtype": "Patient", "rid": "p1", "vid": "1", "report_id": "r1", "item_id": "1", "message_id": "1",
              "name": "workload", "filename": "x.css", "study_uid": "1.2.3", "decision": "release",
              "export_id": "0" * 32, "n": "1",
              "study": "1.2.3", "series": "1.2.3.4", "sop": "1.2.3.5"}  # the worklist's WADO-RS proxy
    for rule in app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            path = rule.rule
            for arg in rule.arguments:
                path = path.replace(f"<{arg}>", values[arg]).replace(f"<int:{arg}>", values[arg]) \
                    .replace(f"<path:{arg}>", values[arg])
            yield rule.rule, method, path


# A transaction is checked entry by entry (tests/test_fhir_transaction.py): this one needs system/Patient.c
TRANSACTION = ('{"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "POST", "url":'
               ' "Patient"}, "resource": {"resourceType": "Patient"}}]}')


def test_every_route_is_closed_to_strangers_and_to_tokens_without_the_scope(app: Flask, db_url: str) -> None:
    anonymous = app.test_client()
    narrow = with_token(app.test_client(), token_for(anonymous, db_url, "system/Observation.s"))
    walked = 0
    for rule, method, path in _routes(app):
        if rule in PUBLIC:
            continue
        walked += 1
        body = TRANSACTION if rule in ("/fhir", "/fhir/") else "{}"
        stranger = anonymous.open(path, method=method, data=body, content_type=FHIR)
        assert stranger.status_code == 401, (method, rule, stranger.status_code)
        assert stranger.headers["WWW-Authenticate"].startswith("Bearer"), rule
        unscoped = narrow.open(path, method=method, data=body, content_type=FHIR)
        assert unscoped.status_code == 403, (method, rule, unscoped.status_code)
    assert walked >= 25
    for path in ("/fhir/metadata", "/.well-known/smart-configuration", "/healthz", "/login"):
        assert anonymous.get(path).status_code == 200, path


def test_cross_site_posts_are_refused_everywhere(app: Flask, login: Callable[..., PersonClient]) -> None:
    person = login("radiologist")  # the browser holds a login cookie: the attack's precondition
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    for rule, method, path in _routes(app):
        if method not in ("POST", "PUT", "PATCH", "DELETE") or rule in PUBLIC:
            continue
        for ctype, body in (("text/plain", '{"resourceType":"Parameters","parameter":[{"name":"action","valueCode":"sign"}]}'),
                            ("application/x-www-form-urlencoded", "action=sign&reviewer=evil")):
            answer = person.test_client.open(path, method=method, data=body, content_type=ctype, headers=evil)
            assert answer.status_code in (401, 403), (method, rule, ctype, answer.status_code)
            same_site = person.test_client.open(path, method=method, data=body, content_type=ctype)
            assert same_site.status_code in (401, 403), (method, rule, ctype, "no CSRF token")


# -- people -------------------------------------------------------------------------------------------
def test_login_cookie_flags_logout_and_idle_timeout(app: Flask, db_url: str) -> None:
    add_person(db_url, "bs.lan", "radiologist")
    browser = app.test_client()
    answer = log_in(browser, "bs.lan")
    assert answer.status_code == 303 and answer.headers["Location"] == "/worklist/"
    cookie = next(c for c in answer.headers.getlist("Set-Cookie") if c.startswith("interop_session="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    page = browser.get("/worklist/")
    assert page.status_code == 200 and "bs.lan" in page.text
    out = browser.post("/logout", data={"csrf_token": csrf_of(page.text)})
    assert out.status_code == 303
    assert browser.get("/worklist/").status_code == 401  # the login ended on the server, not just in the browser
    secure = app.test_client()
    secure_page = secure.get("/login", base_url="https://localhost")
    assert secure_page.headers["Strict-Transport-Security"].startswith("max-age=")
    answer = secure.post("/login", base_url="https://localhost", data={
        "username": "bs.lan", "password": PASSWORD, "csrf_token": csrf_of(secure_page.text)})
    assert "Secure" in next(c for c in answer.headers.getlist("Set-Cookie") if c.startswith("interop_session="))
    idle = app.test_client()
    log_in(idle, "bs.lan")
    assert idle.get("/worklist/").status_code == 200
    with connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE login_session SET last_seen = now() - interval '16 minutes' WHERE ended_at IS NULL")
    assert idle.get("/worklist/").status_code == 401


def test_wrong_passwords_lock_the_account(app: Flask, db_url: str) -> None:
    add_person(db_url, "bs.khoa", "radiologist")
    browser = app.test_client()
    for _ in range(5):
        refused = log_in(browser, "bs.khoa", "wrong password!")
        assert refused.status_code == 401 and ("Wrong user name or password" in refused.text or "locked" in refused.text)
    locked = log_in(browser, "bs.khoa")  # the right password, too late
    assert locked.status_code == 401 and "locked" in locked.text
    assert log_in(browser, "nobody-at-all").status_code == 401
    with connect(db_url) as conn:
        row = conn.execute("SELECT failures, locked_until > now() AS locked FROM person WHERE name = 'bs.khoa'").fetchone()
    assert row["failures"] == 5 and row["locked"]
    failed = [e for e in audit_events(app, db_url) if e["type"]["code"] == "110114" and e["outcome"] != "0"]
    assert len(failed) >= 7 and all("bs.khoa" in json.dumps(e) or "nobody" in json.dumps(e) for e in failed)
    assert not any("wrong password!" in json.dumps(e) or PASSWORD in json.dumps(e) for e in audit_events(app, db_url))
    # a login form posted from elsewhere (no login-CSRF cookie) is refused before any password is checked
    assert app.test_client().post("/login", data={"username": "bs.khoa", "password": PASSWORD}).status_code == 403


def test_roles_decide_the_pages(app: Flask, db_url: str, login: Callable[..., PersonClient]) -> None:
    from tests.test_worklist import make_report

    here = make_report(db_url, mrn="MRN-R1", critical_finding=True)  # tagged BVDKDN
    analyst, admin = login("analyst"), login("admin")
    clinician, elsewhere = login("clinician", site="BVDKDN"), login("clinician", site="BVND115")
    radiologist = login("radiologist")
    assert analyst.get("/analytics/").status_code == 200 and analyst.get("/worklist/").status_code == 403
    assert radiologist.get("/analytics/").status_code == 403 and radiologist.get("/outbox").status_code == 403
    assert admin.get("/outbox").status_code == 200 and admin.get("/worklist/").status_code == 403
    assert admin.get("/fhir/AuditEvent").status_code == 200  # admins search the audit trail
    assert radiologist.get("/fhir/Patient").status_code == 403  # people use the pages; the API takes tokens
    # a clinician reads their own site's reports only, and may acknowledge a critical finding but not sign
    assert here["id"] in clinician.get("/worklist/").text and here["id"] not in elsewhere.get("/worklist/").text
    assert clinician.get(f"/worklist/{here['id']}").status_code == 200
    assert elsewhere.get(f"/worklist/{here['id']}").status_code == 404
    assert 'id="sign"' not in clinician.get(f"/worklist/{here['id']}").text
    assert clinician.post(f"/worklist/{here['id']}/review", data={"action": "sign", "version": "1"}).status_code == 403
    assert elsewhere.post(f"/worklist/{here['id']}/review", data={"action": "acknowledge"}).status_code == 404
    assert clinician.post(f"/worklist/{here['id']}/review", data={"action": "acknowledge"}).status_code == 303
    with connect(db_url) as conn:
        assert conn.execute("SELECT acknowledged_by FROM critical_alert WHERE report_id = %s",
                            (here["id"],)).fetchone()["acknowledged_by"] == clinician.name
    signed = radiologist.post(f"/worklist/{here['id']}/review", data={"action": "sign", "version": "1",
                                                                       "reviewer": "somebody else"})
    assert signed.status_code == 303
    page = radiologist.get(f"/worklist/{here['id']}").text
    assert f"<strong>{radiologist.name}</strong>" in page and 'id="signed-by"' in page  # who signed, and when
    assert "somebody else" not in page


# -- the audit trail ------------------------------------------------------------------------------------
def test_reads_changes_and_signatures_are_audited(app: Flask, db_url: str, login: Callable[..., PersonClient]) -> None:
    anonymous = app.test_client()
    token = token_for(anonymous, db_url, "system/Patient.crs system/AuditEvent.rs")
    vendor = with_token(app.test_client(), token)
    created = post(vendor, "Patient", {"resourceType": "Patient", "name": [{"family": "Lê"}]}).get_json()
    assert vendor.get(f"/fhir/Patient/{created['id']}").status_code == 200
    assert vendor.get("/fhir/Patient?family=L").status_code == 200
    outcome(vendor.get("/fhir/Observation"), 403)
    client_id = jwt.decode(token, options={"verify_signature": False})["sub"]
    mine = vendor.get("/fhir/AuditEvent", query_string={"altid": client_id, "_count": "50"}).get_json()
    events = [e["resource"] for e in mine["entry"]]
    by_kind = {(e["subtype"][0]["code"], e["outcome"]) for e in events}
    assert {("create", "0"), ("read", "0"), ("search-type", "0"), ("get", "4")} <= by_kind
    read = next(e for e in events if e["subtype"][0]["code"] == "read")
    assert read["action"] == "R" and read["agent"][0]["network"]["address"] == "127.0.0.1"
    assert {"reference": f"Patient/{created['id']}"} in [x["what"] for x in read["entity"] if x["role"]["code"] == "1"]
    search = next(e for e in events if e["subtype"][0]["code"] == "search-type")
    assert base64.b64decode(next(x["query"] for x in search["entity"] if "query" in x)).decode() == "family=L"
    everything = json.dumps(audit_events(app, db_url))
    assert token not in everything and token.split(".")[2] not in everything
    # a sign-off from the worklist names the logged-in person, with the report version it made
    from tests.test_worklist import make_report

    rep = make_report(db_url, mrn="MRN-A1")
    radiologist = login("radiologist")
    assert radiologist.post(f"/worklist/{rep['id']}/review", data={"action": "sign", "version": "1"}).status_code == 303
    signed = [e for e in audit_events(app, db_url) if e["subtype"][0]["code"] == "worklist-sign"]
    assert len(signed) == 1 and signed[0]["agent"][0]["name"] == radiologist.name
    assert signed[0]["entity"][0]["what"]["reference"] == f"DiagnosticReport/{rep['id']}/_history/2"
    logins = [e for e in audit_events(app, db_url) if e["subtype"][0]["code"] == "110122" and e["outcome"] == "0"]
    assert any(e["agent"][0]["name"] == radiologist.name for e in logins)


def test_a_failed_change_leaves_no_success_in_the_audit(client: FlaskClient, app: Flask, db_url: str) -> None:
    before = len(audit_events(app, db_url))
    outcome(post(client, "ImagingStudy", study(endpoint="https://evil.example/dicom-web")), 422)
    after = audit_events(app, db_url)[before:]
    assert [(e["subtype"][0]["code"], e["outcome"]) for e in after] == [("create", "4")]


# -- URLs the hub may call ----------------------------------------------------------------------------------
def test_only_allowed_urls_are_taken(client: FlaskClient) -> None:
    sub = {"resourceType": "Subscription", "status": "requested", "reason": "x", "criteria": "DiagnosticReport?status=final",
           "channel": {"type": "rest-hook", "endpoint": "https://evil.example/steal"}}
    refused = outcome(post(client, "Subscription", sub), 422)
    assert refused["issue"][0]["code"] == "security" and "INTEROP_URL_ALLOW" in refused["issue"][0]["diagnostics"]
    endpoint = {"resourceType": "Endpoint", "status": "active", "connectionType": {"code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM"}], "address": "http://169.254.169.254/latest/meta-data"}
    outcome(post(client, "Endpoint", endpoint), 422)
    outcome(post(client, "ImagingStudy", study(endpoint="http://10.0.0.9:8042/dicom-web")), 422)
    allowed = {**sub, "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook"}}
    assert post(client, "Subscription", allowed).status_code == 201  # 127.0.0.1:* is allowed in the tests


# -- the operators' commands -----------------------------------------------------------------------------------
def test_clients_and_users_commands(db_url: str, tmp_path: Any, smart_key: ClientKey) -> None:
    env = {**os.environ, "DATABASE_URL": db_url, "INTEROP_URL_ALLOW": TEST_URL_ALLOW}
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(smart_key.jwks))

    def interop(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "interop.cli", *args], env=env, input=stdin, capture_output=True,
                              text=True, timeout=120)

    added = interop("clients", "add", "HIS vendor", "--jwks", str(jwks), "--scopes",
                    "system/DiagnosticReport.rs system/ImagingStudy.cru", "--site", "bvdkdn")
    assert added.returncode == 0, added.stderr
    client_id = added.stdout.split()[-1]
    listed = [json.loads(line) for line in interop("clients", "list").stdout.splitlines()]
    assert [(c["client_id"], c["scopes"], c["site"]) for c in listed] == \
        [(client_id, "system/DiagnosticReport.rs system/ImagingStudy.cru", "BVDKDN")]
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"keys": [{**smart_key.jwk, "d": "secret"}]}))
    refused = interop("clients", "add", "careless", "--jwks", str(private), "--scopes", "system/Patient.rs")
    assert refused.returncode == 2 and "private" in refused.stderr
    assert interop("clients", "add", "odd", "--jwks", str(jwks), "--scopes", "user/Patient.rs").returncode == 2
    assert interop("clients", "disable", client_id).returncode == 0
    assert interop("clients", "disable", client_id).returncode == 1
    made = interop("users", "add", "bs.minh", "--role", "radiologist", "--password-stdin", stdin=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    assert interop("users", "add", "bs.short", "--role", "radiologist", "--password-stdin", stdin="short\n").returncode == 2
    assert interop("users", "add", "dr.x", "--role", "clinician", "--password-stdin", stdin=PASSWORD + "\n").returncode == 2
    people = [json.loads(line) for line in interop("users", "list").stdout.splitlines()]
    assert [(p["name"], p["role"]) for p in people] == [("bs.minh", "radiologist")]
    assert "password" not in json.dumps(people)
    with connect(db_url) as conn:
        stored = conn.execute("SELECT password_hash FROM person WHERE name = 'bs.minh'").fetchone()["password_hash"]
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


def test_a_signing_key_file_signs_the_tokens(db_url: str, tmp_path: Any, smart_key: ClientKey) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP384R1())
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(pem.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    app = create_app(Settings.from_env({"DATABASE_URL": db_url, "INTEROP_SIGNING_KEY_FILE": str(key_file)}))
    try:
        anonymous = app.test_client()
        client_id = register(db_url, smart_key, "system/Patient.rs")
        token = ask(anonymous, token_form(smart_key.assertion(client_id, TOKEN_URL), "system/Patient.rs")).get_json()
        claims = jwt.decode(token["access_token"], pem.public_key(), algorithms=["ES384"], audience="http://127.0.0.1:8080/fhir")
        assert claims["sub"] == client_id
        assert with_token(anonymous, token["access_token"]).get("/fhir/Patient").status_code == 200
    finally:
        app.extensions["interop"].close()
    with connect(db_url) as conn:  # the file's key is used; none is made in the database
        assert conn.execute("SELECT count(*) AS n FROM signing_key").fetchone()["n"] == 0


def test_reads_are_not_served_when_they_cannot_be_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    from interop.domain import audit as events
    from interop.services.security import audit

    def unavailable() -> Any:
        raise OSError("the database is away")

    monkeypatch.setattr(audit, "MAX_PENDING", 3)
    monkeypatch.setattr(audit, "RETRY_SECONDS", 0.05)
    writer = audit.AuditWriter(unavailable)
    event = events.Event(events.Who("127.0.0.1", client="c"), events.interaction("read"), "R", what=["Patient/p"])
    for _ in range(3):
        writer.submit(event)
    with pytest.raises(audit.AuditBacklog):
        writer.submit(event)
    assert writer.flush(timeout=0.3) is False  # nothing could be written, nothing was dropped
    writer.close(timeout=0.1)


def test_the_login_page_is_not_framed_and_sets_no_session(anonymous: FlaskClient) -> None:
    page = anonymous.get("/login")
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-store"
    assert not any(c.startswith("interop_session=") for c in page.headers.getlist("Set-Cookie"))

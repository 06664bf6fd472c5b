"""People log in with the hospital's OpenID Connect account, in headless Chromium: the hub (served
over real HTTP) sends them to a real provider (panva's oidc-provider, `tests/peers/oidc_provider.mjs`),
they sign in and consent there, and come back logged in with the role and site the ID token gives,
or to a 403 when it gives no hub role. Confidential (client_secret_basic) and public (PKCE only)
clients both.

Each test has its own browser context, so neither the provider's nor the hub's cookies cross tests.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from werkzeug.serving import make_server

from interop.app import create_app
from interop.config import Settings
from interop.store.db import connect
from tests.fixtures.browser import Browser, Page
from tests.fixtures.hub import TEST_URL_ALLOW
from tests.fixtures.oidc import OidcProvider
from tests.test_security import every_audit_event

LOGIN_CODE = "110122"


@dataclass
class LiveHub:
    base: str
    provider: OidcProvider


@pytest.fixture
def oidc_hub(db_url: str, oidc_provider: Callable[..., OidcProvider],
             request: pytest.FixtureRequest) -> Iterator[Callable[..., LiveHub]]:
    """A function: the hub app over HTTP with a provider of its own (confidential client unless told)."""
    servers: list[tuple[Any, Any]] = []

    def start(confidential: bool = True) -> LiveHub:
        # Bind first (the provider must know the callback address), then make the app for the provider.
        holder: dict[str, Any] = {}
        server = make_server("127.0.0.1", 0, lambda environ, start_response: holder["app"](environ, start_response),
                             threaded=True)
        base = f"http://127.0.0.1:{server.server_port}"
        provider = oidc_provider(f"{base}/login/callback", confidential)
        holder["app"] = create_app(Settings.from_env({"DATABASE_URL": db_url, "INTEROP_URL_ALLOW": TEST_URL_ALLOW,
                                                      **provider.hub_env()}))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((server, holder["app"]))
        return LiveHub(base, provider)

    try:
        yield start
    finally:
        for server, app in servers:
            server.shutdown()
            app.extensions["interop"].close()


@pytest.fixture
def private_page(browser: Browser) -> Iterator[Page]:
    """A tab in a browser context of its own (its own cookies), dropped after the test."""
    context = browser.send("Target.createBrowserContext", {"disposeOnDetach": True})["browserContextId"]
    target = browser.send("Target.createTarget", {"url": "about:blank", "browserContextId": context})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    tab = Page(browser, target, session)
    for domain in ("Page", "Runtime", "Log", "Network"):
        tab.send(f"{domain}.enable")
    try:
        yield tab
    finally:
        tab.close()
        try:
            browser.send("Target.disposeBrowserContext", {"browserContextId": context})
        except AssertionError:
            pass  # already gone with its last tab


def log_in_at_provider(page: Page, hub: LiveHub, path: str, login: str) -> None:
    """From a hub page, through the hub's OIDC link and the provider's sign-in (and consent) pages."""
    page.goto(f"{hub.base}{path}")  # not logged in: the login page, with the hospital account's link
    assert page.evaluate("document.getElementById('login-form')") is None  # no local form with OIDC on
    page.click("#oidc-login", navigates=True)
    assert page.url().startswith(f"{hub.provider.issuer}/interaction/"), \
        f"not sent to the provider: {page.url()} answered {page.evaluate('document.body.innerText')[:300]}"
    assert page.evaluate("document.querySelector('input[name=prompt]').value") == "login"
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", "any password")
    page.click("button[type=submit]", navigates=True)
    if page.url().startswith(f"{hub.provider.issuer}/interaction/"):  # this version asks for consent
        assert page.evaluate("document.querySelector('input[name=prompt]').value") == "consent"
        page.click("button[type=submit]", navigates=True)
    assert page.url().startswith(hub.base), f"still at {page.url()}:\n{hub.provider.log_tail()}"


def sessions(db_url: str) -> list[dict[str, Any]]:
    with connect(db_url) as conn:
        return list(conn.execute("SELECT person, role, site, via, ended_at FROM login_session ORDER BY created_at")
                    .fetchall())


def logins(db_url: str) -> list[dict[str, Any]]:
    """The login AuditEvents (subtype DICOM 110122), oldest first."""
    return [b for b in every_audit_event(db_url) if b["subtype"][0]["code"] == LOGIN_CODE]


@pytest.mark.parametrize("confidential", [True, False], ids=["confidential-client", "public-client"])
def test_a_radiologist_logs_in_with_the_hospital_account(oidc_hub: Callable[..., LiveHub], private_page: Page,
                                                        db_url: str, confidential: bool) -> None:
    hub = oidc_hub(confidential)
    log_in_at_provider(private_page, hub, "/worklist/?lang=en", "bs.hoa")
    assert private_page.url().startswith(f"{hub.base}/worklist/")
    assert "lang=en" in private_page.url()  # back where the person was going
    assert private_page.evaluate("document.getElementById('person').textContent") == "bs.hoa"

    cookies = {c["name"]: c for c in private_page.send("Network.getCookies", {"urls": [hub.base + "/"]})["cookies"]}
    assert cookies["interop_session"]["httpOnly"] is True
    assert cookies["interop_session"]["sameSite"] == "Lax"
    assert [(s["person"], s["role"], s["site"], s["via"], s["ended_at"]) for s in sessions(db_url)] == [
        ("bs.hoa", "radiologist", None, "oidc", None)]
    events = logins(db_url)
    assert [(e["outcome"], e["agent"][0]["name"]) for e in events] == [("0", "bs.hoa")]
    assert events[0]["outcomeDesc"] == "login (oidc) as radiologist"
    assert events[0]["agent"][0]["role"] == [{"text": "radiologist"}]

    # the login holds: another page of the hub, no new sign-in
    private_page.goto(f"{hub.base}/worklist/?lang=en")
    assert private_page.evaluate("document.getElementById('person').textContent") == "bs.hoa"


def test_a_person_without_a_hub_role_is_refused(oidc_hub: Callable[..., LiveHub], private_page: Page,
                                                db_url: str) -> None:
    hub = oidc_hub()
    log_in_at_provider(private_page, hub, "/worklist/?lang=en", "nobody")
    assert private_page.url().startswith(f"{hub.base}/login/callback")
    assert "no role" in private_page.evaluate("document.getElementById('login-error').textContent")
    assert private_page.evaluate("document.getElementById('person')") is None
    assert sessions(db_url) == []
    cookies = private_page.send("Network.getCookies", {"urls": [hub.base + "/"]})["cookies"]
    assert "interop_session" not in {c["name"] for c in cookies}
    assert [(e["outcome"], e["agent"][0]["name"]) for e in logins(db_url)] == [("4", "nobody")]


def test_a_clinician_logs_in_with_the_site_of_the_id_token(oidc_hub: Callable[..., LiveHub], private_page: Page,
                                                          db_url: str) -> None:
    hub = oidc_hub()
    log_in_at_provider(private_page, hub, "/worklist/?lang=en", "cn.mai")
    assert private_page.url().startswith(f"{hub.base}/worklist/")
    assert private_page.evaluate("document.getElementById('person').textContent") == "cn.mai"
    assert [(s["person"], s["role"], s["site"], s["via"]) for s in sessions(db_url)] == [
        ("cn.mai", "clinician", "BVDKDN", "oidc")]


def test_an_analyst_lands_on_the_dashboard(oidc_hub: Callable[..., LiveHub], private_page: Page,
                                           db_url: str) -> None:
    hub = oidc_hub()
    log_in_at_provider(private_page, hub, "/worklist/?lang=en", "ks.ha")
    assert private_page.url().startswith(f"{hub.base}/analytics/")
    assert [(s["person"], s["role"], s["via"]) for s in sessions(db_url)] == [("ks.ha", "analyst", "oidc")]

"""TLS wherever the hub's data travels (issue 12).

In: the MLLP listener over TLS on a real PostgreSQL, driven by independent clients (python-hl7's
asyncio MLLP client with an `ssl` context, `openssl s_client`, the standard library's `ssl`, a
plain-text socket); mutual TLS and the sites file's per-site certificate pins; `interop serve`
over HTTPS. Out: results to a RIS serving MLLP over TLS (python-hl7's server wrapped in TLS), the
EMR's FHIR endpoint, its token endpoint and the PACS over HTTPS, each verified, each refused when
its certificate comes from an authority the hub does not trust. Certificates are made per test
(tests/fixtures/tls.py).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hl7.mllp
import psycopg
import pytest
import requests
from hl7.mllp import open_hl7_connection

from interop import tls
from interop.config import Settings
from interop.dicom.dicomweb import DicomWebClient
from interop.dicom.errors import PacsUnavailable
from interop.hl7 import mllp
from interop.hl7.listener import SenderNotAllowed
from interop.runtime.supervisor import gunicorn_args
from interop.services import delivery
from interop.services.delivery.auth import AuthError, TokenCache
from interop.sites import FhirAuth, SitesError
from interop.sites import load as load_sites
from interop.store import resources
from interop.workers.delivery import Deliverer
from tests.fixtures.hub import HubProcess, stop_hub
from tests.fixtures.mllp import ListenerThread, listener_settings, orm, unframe
from tests.fixtures.tls import Authority, Pki
from tests.helpers import context, delivery_row, free_port, time_passes, wait_for
from tests.test_mllp import ack_fields, err_code, jobs, messages, msa_code
from tests.test_oru import Peer

EB = b"\x1c\x0d"
LISTENER_LOG = "interop.hl7.listener"


# -- helpers ---------------------------------------------------------------------------------------
def write_sites(tmp_path: Path, body: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sites.yaml"
    path.write_text("sites:\n" + body, encoding="utf-8")
    return path


BVDKDN = "  BVDKDN:\n    name: Benh vien Da khoa Dong Nai\n"
NHONTRACH = "  TTYT_NHONTRACH:\n    name: Trung tam Y te Nhon Trach\n"


@contextmanager
def tls_listener(db_url: str, pki: Pki, tmp_path: Path, sites: str = BVDKDN, **env: str) -> Iterator[Settings]:
    """The hub's MLLP listener (in-process) serving TLS with the hub's certificate."""
    settings = listener_settings(db_url, INTEROP_TLS_CERT=str(pki.server.cert), INTEROP_TLS_KEY=str(pki.server.key),
                                 INTEROP_SITES=str(write_sites(tmp_path, sites)), **env)
    running = ListenerThread(settings)
    running.start()
    try:
        yield settings
    finally:
        running.stop()


async def _hl7_over_tls(port: int, ctx: ssl.SSLContext, payloads: list[bytes]) -> list[bytes]:
    reader, writer = await open_hl7_connection("127.0.0.1", port, encoding="utf-8", ssl=ctx)
    answers = []
    try:
        for payload in payloads:
            writer.writeblock(payload)
            await writer.drain()
            answers.append(await asyncio.wait_for(reader.readblock(), 10))
    finally:
        writer.close()
        await writer.wait_closed()
    return answers


def hl7_over_tls(port: int, ctx: ssl.SSLContext, *payloads: bytes) -> list[bytes]:
    """python-hl7's asyncio MLLP client over TLS: the ACK of each payload, one connection."""
    return asyncio.run(_hl7_over_tls(port, ctx, list(payloads)))


def attempt(port: int, payload: bytes, ctx: ssl.SSLContext | None) -> tuple[bytes, bool, BaseException | None]:
    """One framed message with the standard library (over TLS with `ctx`, else plain text): what
    came back, whether the hub closed the connection, and the error that ended it, if any."""
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx is not None else raw
            sock.sendall(mllp.frame(payload))
            while not received.endswith(EB):
                chunk = sock.recv(65536)
                if not chunk:
                    return received, True, None
                received += chunk
    except TimeoutError as exc:
        return received, False, exc
    except OSError as exc:  # ssl.SSLError, a reset: the hub ended it
        return received, True, exc
    return received, False, None


def handshake_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LISTENER_LOG and "TLS handshake failed" in r.getMessage()]


# -- MLLP in, over TLS ---------------------------------------------------------------------------
def test_python_hl7_sends_an_order_over_tls_and_it_is_stored(db_url: str, pki: Pki, tmp_path: Path) -> None:
    with tls_listener(db_url, pki, tmp_path) as settings:
        [answer] = hl7_over_tls(settings.mllp_port, pki.client_context(), orm("TLS1"))
    assert msa_code(answer) == "AA" and ack_fields(answer)["MSA"][2] == "TLS1"
    [(control_id, message_type, status, ack_code, raw)] = messages(db_url)
    assert (control_id, message_type, status, ack_code) == ("TLS1", "ORM^O01", "accepted", "AA")
    assert bytes(raw) == orm("TLS1")
    assert len(jobs(db_url)) == 1


def test_openssl_s_client_completes_a_handshake_and_sees_the_hubs_certificate(db_url: str, pki: Pki,
                                                                            tmp_path: Path) -> None:
    with tls_listener(db_url, pki, tmp_path) as settings:
        done = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{settings.mllp_port}",
                               "-CAfile", str(pki.ca), "-verify_ip", "127.0.0.1", "-verify_return_error"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Verify return code: 0 (ok)" in done.stdout
    assert pki.server.cert.read_text().strip() in done.stdout  # the certificate it showed is the hub's
    assert re.search(r"^New, TLSv1\.[23], Cipher is ", done.stdout, re.M)


def test_tls_older_than_1_2_is_refused(db_url: str, pki: Pki, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LISTENER_LOG)
    old = pki.client_context()
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1, so that the hub is the one refusing
    with tls_listener(db_url, pki, tmp_path) as settings:
        received, closed, error = attempt(settings.mllp_port, orm("OLD1"), old)
    assert received == b"" and closed and isinstance(error, ssl.SSLError)
    assert messages(db_url) == []
    [failed] = handshake_failures(caplog)  # the hub is the one that refused, and says why
    assert "UNSUPPORTED_PROTOCOL" in failed.getMessage()


def test_a_plain_text_sender_on_the_tls_port_is_refused_cleanly_and_others_are_served(
        db_url: str, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LISTENER_LOG)
    with tls_listener(db_url, pki, tmp_path) as settings:
        received, closed, _ = attempt(settings.mllp_port, orm("PLAIN1"), None)
        [answer] = hl7_over_tls(settings.mllp_port, pki.client_context(), orm("AFTER1"))
    assert closed and unframe(received) == [] and b"MSA" not in received  # no HL7 answer, connection closed
    assert msa_code(answer) == "AA"  # the listener still serves TLS senders
    assert [r[0] for r in messages(db_url)] == ["AFTER1"]  # the plain-text message was never read
    [failed] = handshake_failures(caplog)
    assert failed.levelno in (logging.INFO, logging.WARNING) and failed.exc_info is None
    assert "NGUY" not in failed.getMessage() and "BN0001" not in failed.getMessage()


def test_a_peer_that_never_starts_the_handshake_is_closed_and_others_are_served(db_url: str, pki: Pki,
                                                                              tmp_path: Path) -> None:
    with tls_listener(db_url, pki, tmp_path, INTEROP_MLLP_IDLE_SECONDS="1") as settings:
        with socket.create_connection(("127.0.0.1", settings.mllp_port), timeout=20) as silent:
            assert silent.recv(1024) == b""  # closed by the hub (a timeout here would raise)
        [answer] = hl7_over_tls(settings.mllp_port, pki.client_context(), orm("AFTER2"))
    assert msa_code(answer) == "AA"


def test_mutual_tls_refuses_a_sender_without_a_certificate_or_with_an_unknown_one(
        db_url: str, pki: Pki, stranger: Authority, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LISTENER_LOG)
    impostor = stranger.issue("impostor-engine", server=False)
    with tls_listener(db_url, pki, tmp_path, INTEROP_TLS_CLIENT_CA=str(pki.ca)) as settings:
        none = attempt(settings.mllp_port, orm("NOCERT1"), pki.client_context())
        unknown = attempt(settings.mllp_port, orm("UNKNOWN1"), pki.client_context(impostor))
        [answer] = hl7_over_tls(settings.mllp_port, pki.client_context(pki.sender), orm("KNOWN1"))
    for received, closed, _ in (none, unknown):
        assert received == b"" and closed  # the handshake is refused: no answer, connection closed
    assert msa_code(answer) == "AA"
    assert [r[0] for r in messages(db_url)] == ["KNOWN1"]
    failures = handshake_failures(caplog)
    assert len(failures) == 2 and all(r.exc_info is None for r in failures)


def test_a_site_that_pins_certificates_takes_messages_only_from_them(
        db_url: str, pki: Pki, tmp_path: Path) -> None:
    pins = f"    tls_client_certs:\n      - \"{pki.sender.sha256}\"\n"  # as openssl prints it: upper case, colons
    with tls_listener(db_url, pki, tmp_path, BVDKDN + pins + NHONTRACH, INTEROP_TLS_CLIENT_CA=str(pki.ca)) as settings:
        port = settings.mllp_port
        [refused] = hl7_over_tls(port, pki.client_context(pki.other_sender), orm("PIN1", facility="BVDKDN"))
        [lower] = hl7_over_tls(port, pki.client_context(pki.other_sender), orm("PIN2", facility="bvdkdn"))
        [unpinned_site] = hl7_over_tls(port, pki.client_context(pki.other_sender), orm("PIN3", facility="TTYT_NHONTRACH"))
        [pinned] = hl7_over_tls(port, pki.client_context(pki.sender), orm("PIN4", facility="BVDKDN"))
    for answer in (refused, lower):
        assert msa_code(answer) == "AR" and err_code(answer) == "207"
        assert "MSH^1^4" in "|".join(ack_fields(answer)["ERR"])
        assert "TLS client certificate" in ack_fields(answer)["MSA"][3]
    assert msa_code(unpinned_site) == "AA"  # a site without pins is not affected
    assert msa_code(pinned) == "AA"
    assert [(r[0], r[2], r[3]) for r in messages(db_url)] == [
        ("PIN1", "rejected", "AR"), ("PIN2", "rejected", "AR"), ("PIN3", "accepted", "AA"), ("PIN4", "accepted", "AA")]
    with psycopg.connect(db_url) as conn:
        reasons = [r[0] for r in conn.execute("SELECT ack_error FROM hl7_message WHERE status = 'rejected'")]
    assert reasons == [SenderNotAllowed().message] * 2
    assert len(jobs(db_url)) == 2  # nothing refused is processed


def test_a_pinned_site_is_refused_over_a_connection_without_a_client_certificate(
        db_url: str, pki: Pki, tmp_path: Path) -> None:
    """TLS without INTEROP_TLS_CLIENT_CA: no sender presents a certificate, so a site that pins
    certificates cannot be sent as at all, while the others are served."""
    pins = f"    tls_client_certs: [{pki.sender.sha256.replace(':', '').lower()}]\n"
    with tls_listener(db_url, pki, tmp_path, BVDKDN + pins + NHONTRACH) as settings:
        answers = hl7_over_tls(settings.mllp_port, pki.client_context(pki.sender),
                               orm("NOCA1", facility="BVDKDN"), orm("NOCA2", facility="TTYT_NHONTRACH"))
    assert [msa_code(a) for a in answers] == ["AR", "AA"]


# -- results out over MLLP with TLS -----------------------------------------------------------------
class TlsPeer(Peer):
    """python-hl7's MLLP server standing in for a RIS, wrapped in TLS."""

    def __init__(self, port: int, ctx: ssl.SSLContext):
        super().__init__(port)
        self.ctx = ctx

    def start(self) -> None:
        async def go() -> Any:
            return await hl7.mllp.start_hl7_server(self._handle, "127.0.0.1", self.port, encoding="utf-8", ssl=self.ctx)
        self.server = asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)


def tls_sender(db_url: str, tmp_path: Path, destination: str, **env: str) -> Deliverer:
    sites = write_sites(tmp_path, BVDKDN + destination)
    ctx = context(INTEROP_SITES=str(sites), DATABASE_URL=db_url, TRITON_URL="unused:1", INTEROP_RETRY_BASE_SECONDS="2",
                  **env)
    return Deliverer(ctx, worker_id="test-sender")


def queue_report(conn: psycopg.Connection[Any], sender: Deliverer) -> list[int]:
    with conn.transaction():
        report = resources.read(conn, "DiagnosticReport", "r1")
        return delivery.queue_report(conn, sender.ctx, report, sender.ctx.sites.get("BVDKDN"))


def test_an_oru_goes_over_tls_to_a_ris_the_hub_can_verify_and_never_to_one_it_cannot(
        stored: psycopg.Connection[Any], db_url: str, pki: Pki, stranger: Authority, tmp_path: Path) -> None:
    # The RIS asks for the hub's certificate too (mutual TLS): INTEROP_TLS_CLIENT_CERT is presented.
    ris = TlsPeer(free_port(), pki.server_context(client_ca=pki.ca))
    impostor = TlsPeer(free_port(), pki.server_context(stranger.issue("impostor-ris", server=True)))
    env = {"INTEROP_TLS_CA_FILE": str(pki.ca), "INTEROP_TLS_CLIENT_CERT": str(pki.sender.cert),
           "INTEROP_TLS_CLIENT_KEY": str(pki.sender.key)}
    ris.start()
    impostor.start()
    try:
        sender = tls_sender(db_url, tmp_path / "impostor", f"    hl7: {{host: 127.0.0.1, port: {impostor.port}, tls: true,"
                            " connect_timeout_seconds: 5, ack_timeout_seconds: 5}\n", **env)
        try:
            [item_id] = queue_report(stored, sender)
            assert sender.run_once() is True
        finally:
            sender.close()
        refused = delivery_row(stored, item_id)
        assert refused["status"] == "pending" and refused["attempts"] == 1  # retried later, not given up
        assert "PeerUnavailable" in refused["last_error"] and "does not verify" in refused["last_error"]
        assert impostor.received == []  # not one byte of the result reached it

        # The operator points the site at the real RIS; the same delivery goes there, verified.
        sender = tls_sender(db_url, tmp_path, f"    hl7: {{host: 127.0.0.1, port: {ris.port}, tls: true,"
                            " connect_timeout_seconds: 5, ack_timeout_seconds: 5}\n", **env)
        try:
            time_passes(stored)
            assert sender.run_once() is True
        finally:
            sender.close()
    finally:
        ris.shutdown()
        impostor.shutdown()
    sent = delivery_row(stored, item_id)
    assert sent["status"] == "sent" and sent["attempts"] == 2
    assert ris.control_ids() == [refused["control_id"]]


def test_without_the_ca_file_a_private_ris_is_not_trusted(stored: psycopg.Connection[Any], db_url: str, pki: Pki,
                                                        tmp_path: Path) -> None:
    """INTEROP_TLS_CA_FILE unset: the system's trust store, which does not hold the test CA."""
    ris = TlsPeer(free_port(), pki.server_context())
    ris.start()
    try:
        sender = tls_sender(db_url, tmp_path, f"    hl7: {{host: 127.0.0.1, port: {ris.port}, tls: true}}\n")
        try:
            [item_id] = queue_report(stored, sender)
            assert sender.run_once() is True
        finally:
            sender.close()
    finally:
        ris.shutdown()
    got = delivery_row(stored, item_id)
    assert got["status"] == "pending" and "does not verify" in got["last_error"] and ris.received == []


# -- HTTPS out: EMR, token endpoint, PACS ---------------------------------------------------------
class HttpsPeer:
    """A small HTTPS server (http.server in a thread, wrapped in TLS). Answers every request with
    `body` and records (method, path, client certificate SHA-256 or None)."""

    def __init__(self, ctx: ssl.SSLContext, body: bytes, content_type: str = "application/json"):
        seen: list[tuple[str, str, str | None]] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                der = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
                seen.append((self.command, self.path.split("?")[0], hashlib.sha256(der).hexdigest() if der else None))
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def https(pki: Pki, stranger: Authority) -> Iterator[dict[str, Any]]:
    """Two HTTPS peers answering `body`: `trusted` (the test CA, asks for a client certificate) and
    `impostor` (a certificate from an authority nobody trusts)."""
    made: list[HttpsPeer] = []

    def make(body: bytes, content_type: str = "application/json") -> tuple[HttpsPeer, HttpsPeer]:
        trusted = HttpsPeer(pki.server_context(client_ca=pki.ca), body, content_type)
        impostor = HttpsPeer(pki.server_context(stranger.issue(f"impostor{len(made)}", server=True)), body,
                             content_type)
        made.extend((trusted, impostor))
        return trusted, impostor

    yield {"make": make}
    for peer in made:
        peer.close()


def test_a_report_goes_to_an_emr_over_verified_https_and_never_to_an_impostor(
        stored: psycopg.Connection[Any], db_url: str, pki: Pki, https: dict[str, Any], tmp_path: Path) -> None:
    emr, impostor = https["make"](b'{"resourceType": "Bundle", "type": "transaction-response", "entry": []}',
                                  "application/fhir+json")
    env = {"INTEROP_TLS_CA_FILE": str(pki.ca), "INTEROP_TLS_CLIENT_CERT": str(pki.sender.cert),
           "INTEROP_TLS_CLIENT_KEY": str(pki.sender.key)}
    sender = tls_sender(db_url, tmp_path / "impostor", f"    fhir: {{base: {impostor.url}/fhir, timeout_seconds: 5}}\n",
                        **env)
    try:
        [item_id] = queue_report(stored, sender)
        assert sender.run_once() is True
    finally:
        sender.close()
    refused = delivery_row(stored, item_id)
    assert refused["status"] == "pending" and refused["last_error"].startswith("SSLError")
    assert impostor.seen == []
    sender = tls_sender(db_url, tmp_path, f"    fhir: {{base: {emr.url}/fhir, timeout_seconds: 5}}\n", **env)
    try:
        time_passes(stored)
        assert sender.run_once() is True
    finally:
        sender.close()
    assert delivery_row(stored, item_id)["status"] == "sent"
    assert emr.seen == [("POST", "/fhir", tls.fingerprint(pki.sender.der))]  # the hub presented its certificate


def test_the_token_endpoint_is_verified(pki: Pki, https: dict[str, Any]) -> None:
    endpoint, impostor = https["make"](b'{"access_token": "t-1", "expires_in": 300}')
    secrets = {"EMR_SECRET": "s3cret"}.get
    hub = tls.ClientTls(pki.ca, pki.sender.cert, pki.sender.key)

    def auth(url: str) -> FhirAuth:
        return FhirAuth("client_credentials", token_url=f"{url}/token", client_id="hub", client_secret_env="EMR_SECRET")

    assert TokenCache(secrets).headers(auth(endpoint.url), 5, tls=hub) == {"Authorization": "Bearer t-1"}
    assert endpoint.seen == [("POST", "/token", tls.fingerprint(pki.sender.der))]
    with pytest.raises(AuthError) as refused:
        TokenCache(secrets).headers(auth(impostor.url), 5, tls=hub)
    assert refused.value.transient and "SSLError" in str(refused.value) and impostor.seen == []
    with pytest.raises(AuthError):  # no TLS settings: the system's trust store, which lacks the test CA
        TokenCache(secrets).headers(auth(endpoint.url), 5)
    assert len(endpoint.seen) == 1


def test_the_pacs_is_verified(pki: Pki, https: dict[str, Any]) -> None:
    pacs, impostor = https["make"](b'[{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]', "application/dicom+json")
    hub = tls.ClientTls(pki.ca, pki.sender.cert, pki.sender.key)
    with DicomWebClient(f"{pacs.url}/dicom-web", 5, tls=hub) as client:
        assert client.find_study_uids(study_uid="1.2.3") == ["1.2.3"]
    assert pacs.seen == [("GET", "/dicom-web/studies", tls.fingerprint(pki.sender.der))]
    for base, settings in ((impostor.url, hub), (pacs.url, None)):  # an unknown CA; no CA file at all
        with DicomWebClient(f"{base}/dicom-web", 5, tls=settings) as client, pytest.raises(PacsUnavailable) as err:
            client.find_study_uids(study_uid="1.2.3")
        assert "TLS" in str(err.value)
    assert impostor.seen == [] and len(pacs.seen) == 1


# -- settings and the sites file ---------------------------------------------------------------------
def test_tls_settings_that_cannot_be_used_are_named(pki: Pki, tmp_path: Path) -> None:
    def problems(**env: str) -> str:
        with pytest.raises(tls.TlsError) as err:
            tls.check(Settings.from_env(env))
        return str(err.value)

    assert "must be set together" in problems(INTEROP_TLS_CERT=str(pki.server.cert))
    assert "needs INTEROP_TLS_CERT" in problems(INTEROP_TLS_CLIENT_CA=str(pki.ca))
    assert "not a readable file" in problems(INTEROP_TLS_CA_FILE=str(tmp_path / "missing.pem"))
    mismatched = problems(INTEROP_TLS_CERT=str(pki.server.cert), INTEROP_TLS_KEY=str(pki.sender.key))
    assert "do not load" in mismatched and "BEGIN" not in mismatched  # no key material in a message
    tls.check(Settings.from_env({"INTEROP_TLS_CERT": str(pki.server.cert), "INTEROP_TLS_KEY": str(pki.server.key),
                                 "INTEROP_TLS_CLIENT_CA": str(pki.ca), "INTEROP_TLS_CA_FILE": str(pki.ca),
                                 "INTEROP_TLS_CLIENT_CERT": str(pki.sender.cert),
                                 "INTEROP_TLS_CLIENT_KEY": str(pki.sender.key)}))
    assert tls.ClientTls().requests_kwargs() == {"verify": True, "cert": None}  # verification is never off


def test_the_sites_file_tls_keys(tmp_path: Path) -> None:
    pin = "AB:" * 31 + "CD"
    sites = load_sites(write_sites(tmp_path, BVDKDN + f"    tls_client_certs: ['{pin}', '{pin.lower()}']\n"
                                   "    hl7: {host: ris.example.vn, port: 2575, tls: true}\n" + NHONTRACH
                                   + "    hl7: {host: 10.0.0.5, port: 2575}\n    app_ack: {host: 10.0.0.6, port: 2576,"
                                   " tls: true}\n"))
    bvdkdn, nhontrach = sites["BVDKDN"], sites["TTYT_NHONTRACH"]
    assert bvdkdn.tls_client_certs == ("ab" * 31 + "cd",) and "tls_client_certs" not in bvdkdn.extra
    assert bvdkdn.hl7 is not None and bvdkdn.hl7.tls and bvdkdn.ack_address is not None and bvdkdn.ack_address.tls
    assert nhontrach.tls_client_certs == () and nhontrach.hl7 is not None and not nhontrach.hl7.tls
    assert nhontrach.ack_address is not None and nhontrach.ack_address.tls
    for bad, says in (("    tls_client_certs: abc\n", "must be a list"),
                      ("    tls_client_certs: ['12:34']\n", "is not a SHA-256 fingerprint"),
                      ("    hl7: {host: a, port: 1, tls: 'yes please'}\n", "hl7.tls must be true or false"),
                      ("    app_ack: {host: a, port: 1, tls: 1}\n", "app_ack.tls must be true or false")):
        with pytest.raises(SitesError, match=says):
            load_sites(write_sites(tmp_path, BVDKDN + bad))


# -- interop serve over HTTPS -------------------------------------------------------------------------
def test_gunicorn_is_given_the_certificate_only_when_tls_is_set(pki: Pki) -> None:
    plain = gunicorn_args(Settings.from_env({}))
    assert "--certfile" not in plain and "--keyfile" not in plain
    https_args = gunicorn_args(Settings.from_env({"INTEROP_TLS_CERT": str(pki.server.cert),
                                                  "INTEROP_TLS_KEY": str(pki.server.key)}))
    assert https_args[https_args.index("--certfile") + 1] == str(pki.server.cert)
    assert https_args[https_args.index("--keyfile") + 1] == str(pki.server.key)


def start_serve(env_extra: dict[str, str], workdir: Path) -> HubProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "INTEROP_HTTP_PORT": str(port), "INTEROP_MLLP_PORT": str(free_port()),
           "INTEROP_DICOM_PORT": str(free_port()), "INTEROP_DATA_DIR": str(workdir), "INTEROP_HTTP_WORKERS": "1",
           "PYTHONUNBUFFERED": "1", **env_extra}
    log = workdir / "hub-serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "interop.cli", "serve"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return HubProcess(proc, f"https://127.0.0.1:{port}", log, env)


def test_interop_serve_speaks_https_and_mllp_over_tls(db_url: str, triton_url: str, pki: Pki, tmp_path: Path) -> None:
    hub = start_serve({"DATABASE_URL": db_url, "TRITON_URL": triton_url, "INTEROP_TLS_CERT": str(pki.server.cert),
                       "INTEROP_TLS_KEY": str(pki.server.key)}, tmp_path / "hub")

    def alive() -> requests.Response | None:
        assert hub.proc.poll() is None, hub.log_tail()
        try:
            return requests.get(f"{hub.base}/healthz", verify=str(pki.ca), timeout=2)
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting its workers
            return None

    try:
        answer = wait_for(alive, timeout=120, what="interop serve to answer over HTTPS")
        assert answer.status_code == 200 and answer.json() == {"status": "alive"}
        with pytest.raises(requests.ConnectionError):  # plain HTTP on the HTTPS port gets nothing
            requests.get(hub.base.replace("https:", "http:") + "/healthz", timeout=5)
        with pytest.raises(requests.exceptions.SSLError):  # and the certificate is verified by clients
            requests.get(f"{hub.base}/healthz", timeout=5)
        mllp_port = int(hub.env["INTEROP_MLLP_PORT"])
        answers = wait_for(lambda: _mllp_answer(mllp_port, pki), timeout=60, what="the MLLP listener over TLS")
        assert msa_code(answers[0]) == "AA"
    finally:
        stop_hub(hub)
    assert "https://127.0.0.1" in hub.log.read_text()


def _mllp_answer(port: int, pki: Pki) -> list[bytes] | None:
    try:
        return hl7_over_tls(port, pki.client_context(), orm("SERVE1"))
    except OSError:
        return None


def test_interop_serve_refuses_to_start_with_a_certificate_but_no_key(db_url: str, triton_url: str, pki: Pki,
                                                                      tmp_path: Path) -> None:
    hub = start_serve({"DATABASE_URL": db_url, "TRITON_URL": triton_url, "INTEROP_TLS_CERT": str(pki.server.cert)},
                      tmp_path / "hub")
    try:
        assert hub.proc.wait(60) == 2
    finally:
        stop_hub(hub)
    assert "INTEROP_TLS_CERT and INTEROP_TLS_KEY must be set together" in hub.log.read_text()

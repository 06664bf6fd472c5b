"""The FHIR channel: a report version (or a critical notice) as one FHIR R4 transaction Bundle,
pushed to the site's HIS/EMR (`fhir` in the sites file). The Bundle and the meaning of the
EMR's answer are `interop.domain.bundle` (pure); this module reads the store and sends.

2xx: sent (the transaction-response is kept). 401/403: a new OAuth2 token once and the Bundle
again, then refused. 408/429/5xx, timeouts, refused connections: retry. Any other 4xx: refused
for good, the OperationOutcome kept for an operator to fix and replay. Every entry is
conditional, so a retry after a partial push repeats nothing. The EMR's certificate (and its token
endpoint's) is verified against INTEROP_TLS_CA_FILE, else the system's trust store; the hub
presents INTEROP_TLS_CLIENT_CERT when set (`interop.tls.ClientTls`).
"""
from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import requests

from ...domain.bundle import (
    BuildError,
    build_bundle,
    build_notice,
    classify,
    locations,
    references,
    resolve,
    split,
)
from ...domain.bundle import Outcome as Answer
from ...sites import FhirDestination, Site
from ...store import queue, resources
from ...tls import ClientTls
from ..context import Context
from . import Message, Outcome, Unbuildable, report_version, site_of_lane
from .auth import AuthError, TokenCache

FHIR_JSON = "application/fhir+json"
MAX_ANSWER = 20000


def bundle_for(conn: psycopg.Connection[Any], report_id: str, version: int, bundle_id: str | None = None) -> dict[str, Any]:
    """The Bundle for a stored report version: the report as it was at `version`, its current
    Observations and Device, and the Patient/ServiceRequest/ImagingStudy for their identifiers."""
    report, observations = report_version(conn, report_id, version)
    device_refs = [r["reference"] for r in references([report.get("extension"), [o.get("device") for o in observations]])
                   if r["reference"].startswith("Device/")]
    device = resources.find(conn, device_refs[0]) if device_refs else None
    if device_refs and device is None:
        raise Unbuildable(f"the Device of DiagnosticReport/{report_id} is missing")
    context_refs = {r["reference"] for r in references([report, observations])
                    if r["reference"].split("/")[0] in ("Patient", "ServiceRequest", "ImagingStudy")}
    context = [c for c in (resources.find(conn, ref) for ref in sorted(context_refs)) if c]
    return build_bundle(report, observations, device, context=context, bundle_id=bundle_id)


def notice_for(conn: psycopg.Connection[Any], rtype: str, rid: str, version: int,
               bundle_id: str | None = None) -> dict[str, Any]:
    """The Bundle for a stored notice (a Communication), with what it points at for identifiers."""
    try:
        resource = resources.vread(conn, rtype, rid, version)
    except resources.NotFound as exc:
        raise Unbuildable(f"{rtype}/{rid} has no version {version}") from exc
    context = [c for c in (resources.find(conn, r["reference"]) for r in references(resource)) if c]
    return build_notice(resource, context=context, bundle_id=bundle_id)


def _diagnostics(answer: str) -> str:
    """The first issue of an OperationOutcome answer, for `last_error` (the whole answer is kept)."""
    try:
        issue = (json.loads(answer).get("issue") or [{}])[0]
    except (ValueError, AttributeError):
        return "no OperationOutcome"
    return str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code") or "")


class FhirChannel:
    """`deliver-fhir` jobs: a report version or a notice, as transactions to `SITE:fhir`."""

    def __init__(self, ctx: Context, *, tokens: TokenCache | None = None, session: requests.Session | None = None):
        self.ctx = ctx
        self.tokens = tokens or TokenCache(ctx.settings.secret)
        self.session = session or requests.Session()
        self.tls = ClientTls.from_settings(ctx.settings)

    def _site(self, job: queue.Job) -> Site | None:
        site = site_of_lane(self.ctx, job.lane)
        return site if site is not None and site.fhir is not None else None

    def prepare(self, conn: psycopg.Connection[Any], job: queue.Job) -> Message | Outcome:
        if self._site(job) is None:
            return Outcome.dead(f"no fhir destination for {job.lane} in the sites file")
        if job.message and job.message_id:
            return Message(job.message_id, job.message)
        bundle_id = str(uuid.uuid4())
        p = job.payload
        try:
            if p["resource_type"] == "DiagnosticReport":
                bundle = bundle_for(conn, p["resource_id"], int(p["version"]), bundle_id)
            else:
                bundle = notice_for(conn, p["resource_type"], p["resource_id"], int(p["version"]), bundle_id)
        except (BuildError, Unbuildable) as exc:
            return Outcome.dead(f"cannot build the Bundle: {exc}"[:500])
        return Message(bundle_id, json.dumps(bundle, ensure_ascii=False))

    def send(self, job: queue.Job, message: Message) -> Outcome:
        site = self._site(job)
        if site is None or site.fhir is None:
            return Outcome.dead(f"no fhir destination for {job.lane} in the sites file")
        dest = site.fhir
        try:
            status, answer = self._push(dest, json.loads(message.text))
            if classify(status) is Answer.UNAUTHORIZED and dest.auth.type == "client_credentials":
                status, answer = self._push(dest, json.loads(message.text), refresh=True)
        except AuthError as exc:
            if exc.transient:
                return Outcome.retry(f"AuthError: {exc}")
            return Outcome.refused(f"AuthError: {exc}", None)
        except requests.RequestException as exc:
            return Outcome.retry(f"{type(exc).__name__}: the FHIR server did not answer")
        kind = classify(status)
        if kind is Answer.SENT:
            return Outcome.sent(answer)
        if kind is Answer.RETRY:
            return Outcome.retry(f"HTTP {status}", answer)
        return Outcome.refused(f"HTTP {status}: {_diagnostics(answer)}"[:500], answer)

    def _push(self, dest: FhirDestination, bundle: dict[str, Any], *, refresh: bool = False) -> tuple[int, str]:
        """POST the Bundle (in parts when the site caps transactions); the first answer that is not
        2xx stops it."""
        found: dict[str, str] = {}
        status, text = 0, ""
        for part in split(bundle, dest.max_bundle_entries):
            part = resolve(part, found)
            status, text = self._post(dest, part, refresh=refresh)
            refresh = False
            if classify(status) is not Answer.SENT:
                break
            try:
                found.update(locations(part, json.loads(text)))
            except ValueError:
                pass
        return status, text

    def _post(self, dest: FhirDestination, bundle: dict[str, Any], *, refresh: bool = False) -> tuple[int, str]:
        headers = {"Content-Type": f"{FHIR_JSON}; charset=utf-8", "Accept": FHIR_JSON,
                   "X-Request-Id": str(bundle.get("id", ""))}
        headers.update(self.tokens.headers(dest.auth, dest.timeout_seconds, refresh=refresh, tls=self.tls))
        answer = self.session.post(dest.base, data=json.dumps(bundle, ensure_ascii=False).encode("utf-8"),
                                   headers=headers, timeout=(min(10.0, dest.timeout_seconds), dest.timeout_seconds),
                                   allow_redirects=False, **self.tls.requests_kwargs())
        return answer.status_code, answer.text[:MAX_ANSWER]

    def ended(self, conn: psycopg.Connection[Any], job: queue.Job, outcome: Outcome, status: str) -> None:
        pass

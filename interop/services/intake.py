"""Accepting a study for analysis: the one way in, for a study a HIS posts over FHIR and for one
the hub found in the PACS for an HL7 order.

Runs in the caller's transaction, so the study, its Task and its queue entry are stored
together: a study that was acknowledged is always either queued or visibly not analysed. A
study is analysed once per DICOM Study Instance UID, however often it is sent or re-sent: the
queue key is the UID, and a second ImagingStudy with a UID the hub holds updates the first.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, NoReturn

import psycopg

from ..domain.vocabulary import ANALYSIS_TASK, DICOM_UID_SYSTEM, site_of, site_tag, study_uid
from ..sites import Site
from ..store import queue, resources
from ..store.resources import Criterion, Query
from . import tasks
from .context import Context
from .errors import IntakeError, Waiting
from .security import urls
from .tasks import utc_now

WADO_RS = "dicom-wado-rs"
ANALYSE = "analyse-study"


def analysis_key(uid: str) -> str:
    """The queue key of a study's analysis: one per Study Instance UID."""
    return f"{ANALYSE}:uid:{uid}"


def _is_wado_rs(endpoint: dict[str, Any]) -> bool:
    return isinstance(endpoint, dict) and (endpoint.get("connectionType") or {}).get("code") == WADO_RS


def resolve_endpoint(conn: psycopg.Connection[Any], study: dict[str, Any]) -> str | None:
    """The DICOMweb base URL named by the study (contained or stored Endpoint), if any."""
    contained = {c.get("id"): c for c in study.get("contained") or [] if c.get("resourceType") == "Endpoint"}
    for i, ref in enumerate(study.get("endpoint") or []):
        target = str(ref.get("reference") or "")
        where = f"ImagingStudy.endpoint[{i}]"
        if target.startswith("#"):
            endpoint = contained.get(target[1:])
            if endpoint is None:
                raise IntakeError(f"{target[:80]} names no contained Endpoint", where)
        elif target.startswith("Endpoint/"):
            try:
                endpoint = resources.read(conn, "Endpoint", target.split("/", 1)[1])
            except resources.StoreError as exc:
                raise IntakeError(f"unknown endpoint {target[:80]}", where) from exc
        else:
            raise IntakeError("endpoint must reference a contained or stored Endpoint", where)
        if _is_wado_rs(endpoint):
            if endpoint.get("status", "active") != "active":
                raise IntakeError(f"endpoint {target[:80]} is not active", where)
            return str(endpoint["address"]).rstrip("/")
    return None


def allowed_endpoint(conn: psycopg.Connection[Any], ctx: Context, study: dict[str, Any]) -> str | None:
    """`resolve_endpoint`, refusing an address the hub may not call (`security.urls`)."""
    address = resolve_endpoint(conn, study)
    if address is not None and not urls.allowed(ctx, address):
        raise IntakeError("the endpoint's address is not one this hub may call (ask its operator to allow it:"
                          " INTEROP_URL_ALLOW or the site's allow_urls)", "ImagingStudy.endpoint")
    return address


def tag_site(conn: psycopg.Connection[Any], ctx: Context, study: dict[str, Any]) -> dict[str, Any]:
    """The study as it is stored: tagged with its facility, so that its report goes back there. A
    HIS says so itself (meta.tag `urn:interop-hub:site`); otherwise the site whose PACS the study
    names (the sites file's `dicomweb`) is the one."""
    if site_of(study):
        return study
    site = ctx.sites.by_pacs(allowed_endpoint(conn, ctx, study))
    if site is None:
        return study
    meta = dict(study.get("meta") or {})
    meta["tag"] = [*(meta.get("tag") or []), site_tag(site.code)]
    return {**study, "meta": meta}


def same_study(conn: psycopg.Connection[Any], ctx: Context, study: dict[str, Any]) -> dict[str, Any] | None:
    """The stored ImagingStudy with this study's DICOM UID, if the hub holds one (a client's retry
    of a POST, or the same study sent again: it updates that one rather than making a second)."""
    uid = study_uid(study)
    if uid is None:
        return None
    values: list[tuple[Any, str]] = [(DICOM_UID_SYSTEM, f"urn:oid:{uid}"), (DICOM_UID_SYSTEM, uid)]
    query = Query(criteria=[Criterion(ctx.params["ImagingStudy"]["identifier"], values)], count=1)
    found = resources.search(conn, "ImagingStudy", query)[1]
    return found[0] if found else None



def _task(study: dict[str, Any], status: str, reason: str | None = None) -> dict[str, Any]:
    task: dict[str, Any] = {
        "resourceType": "Task", "status": status, "intent": "order", "priority": "routine",
        "code": {"coding": [ANALYSIS_TASK], "text": ANALYSIS_TASK["display"]},
        "focus": {"reference": f"ImagingStudy/{study['id']}"}, "authoredOn": utc_now().isoformat(),
    }
    if "subject" in study:
        task["for"] = study["subject"]
    if study.get("basedOn"):
        task["basedOn"] = study["basedOn"]
    if reason:
        task["statusReason"] = {"text": reason}
    return task


def accept_study(conn: psycopg.Connection[Any], ctx: Context, study: dict[str, Any],
                 source: str | None = None) -> dict[str, Any] | None:
    """Queue a stored, available study for analysis once; returns its Task (None: nothing to do).
    `source` is where its images are when the study names no endpoint (a pushed study: the
    archive PACS, or the hub's own storage).

    The images may not be in the PACS yet (the HIS posts the study as the modality sends): the
    analysis keeps looking for them until the site's `pacs_wait_minutes` (INTEROP_PACS_WAIT_MINUTES
    for a study of no known site), as the HL7 path does."""
    if study.get("status") != "available":
        return None
    uid = study_uid(study)
    if uid is None:
        raise IntakeError("an available ImagingStudy needs an identifier with system urn:dicom:uid",
                          "ImagingStudy.identifier")
    endpoint = allowed_endpoint(conn, ctx, study) or source or ctx.settings.dicomweb_url
    key = analysis_key(uid)
    if queue.exists(conn, key):
        return None  # already analysed or on its way: a resend does not analyse twice
    if endpoint is None:
        return resources.create(conn, _task(study, "rejected", "not analysed: no DICOMweb endpoint"),
                                ctx.params["Task"])
    task = resources.create(conn, _task(study, "requested"), ctx.params["Task"])
    policy = ctx.policies.kind(ANALYSE)
    queue.enqueue(conn, ANALYSE, {"study": study["id"], "task": task["id"], "study_uid": uid, "dicomweb": endpoint,
                                  "deadline": pacs_deadline(ctx, ctx.sites.get(site_of(study)))},
                  dedupe_key=key, max_attempts=policy.max_attempts, priority=policy.priority)
    return task


# -- waiting for the images (both paths: a posted study, an HL7 order's exam done) -------------------
def pacs_deadline(ctx: Context, site: Site | None) -> str:
    """Until when images not yet in the PACS are looked for, from now: the site's
    `pacs_wait_minutes`, or INTEROP_PACS_WAIT_MINUTES for a study of no known site."""
    wait = site.pacs_wait_minutes if site is not None else ctx.settings.pacs_wait_minutes
    return (utc_now() + timedelta(minutes=wait)).isoformat()


def still_waiting(deadline: str | None) -> bool:
    """Whether images not in the PACS yet are still worth waiting for."""
    try:
        return bool(deadline) and utc_now() < datetime.fromisoformat(str(deadline))
    except ValueError:
        return False


def wait_for_images(conn: psycopg.Connection[Any], ctx: Context, task: dict[str, Any] | str) -> NoReturn:
    """Say so on the Task, and have the job tried again later (not counted as a failure)."""
    tasks.update(conn, ctx, task, "in-progress", business="waiting for the images in the PACS")
    raise Waiting("the images are not in the PACS yet")

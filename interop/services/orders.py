"""The life of an HL7 order, off the ACK path: map a stored message to FHIR and act on it.

`process-hl7` jobs: full parse and mapping of an acknowledged message (PID/PV1/ORC/OBR/IPC to
Patient, Encounter, ServiceRequest; ADT updates and merges: `patients`), then the order control:
NW creates, XO updates, CA/DC cancel (a queued search or analysis is withdrawn), and an exam that is done (ORC-5 or OBR-25
per the site's rule) queues a `find-study` job. The outcome is never silent: the message is
`processed` or `failed` (with the reason, on `/hl7/messages?status=failed` and /metrics), and a
sender that asked for application acknowledgements (MSH-16) gets AA or AE.

`find-study` jobs look for the images in the PACS by Study Instance UID or accession number,
keep looking with back-off until the site's deadline, then create the ImagingStudy (basedOn the
ServiceRequest) and accept it for analysis the way the FHIR path does (`intake`). Every step is
visible as FHIR: the resources, and a Task per order (`Task?focus=ServiceRequest/{id}`).
"""
from __future__ import annotations

from typing import Any

import psycopg

from ..dicom.dicomweb import DicomWebClient
from ..dicom.errors import DicomError
from ..dicom.study import imaging_study
from ..domain.vocabulary import FIND_STUDY_TASK, V2_0203, site_tag, study_uid, without_meta
from ..hl7 import charset
from ..hl7.errors import Hl7Error
from ..hl7.message import MessageError
from ..hl7.order import MERGE_TYPES, PATIENT_TYPES, Order, map_order, map_patient_merge, map_patient_update
from ..sites import Site
from ..store import hl7_messages, queue, resources
from ..store.resources import ANY_SYSTEM, Criterion, Query
from ..tls import ClientTls
from . import inbound, intake, patients, tasks
from .context import Context
from .delivery.app_ack import queue_app_ack
from .errors import Permanent, Transient
from .tasks import utc_now

PROCESS_HL7 = hl7_messages.PROCESS_KIND
FIND_STUDY = "find-study"
CANCEL = ("CA", "DC", "OC", "OD")



def _id_type(identifier: dict[str, Any]) -> str | None:
    for coding in (identifier.get("type") or {}).get("coding") or []:
        if coding.get("system", V2_0203) == V2_0203:
            return str(coding.get("code"))
    return None


# -- process-hl7 -------------------------------------------------------------------------------------
def process_message(conn: psycopg.Connection[Any], ctx: Context, job: queue.Job, _timings: object = None) -> None:
    row = hl7_messages.read(conn, int(job.payload["message"]))
    if row is None:
        raise Permanent("the HL7 message is no longer stored")
    try:
        text, _codec = charset.decode(bytes(row["raw"]))
        with conn.transaction():
            if row["message_type"] in PATIENT_TYPES:
                patients.update(conn, ctx, map_patient_update(text, ctx.hl7_tables))
            elif row["message_type"] in MERGE_TYPES:
                patients.merge(conn, ctx, map_patient_merge(text, ctx.hl7_tables))
            else:
                _order_message(conn, ctx, text, ctx.sites.find(row["sending_facility"]))
            code = "AA" if queue_app_ack(conn, ctx, row, "AA") is not None else None
            hl7_messages.mark_processed(conn, row["id"], code)
            queue.complete(conn, job)
    except (MessageError, charset.CharsetError) as exc:
        raise MessageFailed(f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}",
                            exc if isinstance(exc, Hl7Error) else None) from None
    except resources.NotIndexable as exc:
        raise MessageFailed(f"NotIndexable: {exc}") from None
    except psycopg.DataError as exc:  # a value PostgreSQL cannot hold: the same every time
        raise MessageFailed(f"the message holds a value that cannot be stored ({type(exc).__name__})") from None


class MessageFailed(Permanent):
    """The message cannot be processed; `problem` says where, for the application acknowledgement."""

    def __init__(self, reason: str, problem: Hl7Error | None = None):
        super().__init__(reason)
        self.problem = problem


def message_failed(conn: psycopg.Connection[Any], ctx: Context, job: queue.Job, reason: str,
                   exc: BaseException | None = None) -> None:
    """In the transaction that fails the job: the message is `failed`, and its sender is told (AE)
    when it asked for application acknowledgements."""
    row = hl7_messages.read(conn, int(job.payload["message"]))
    if row is None:
        return
    problem = exc.problem if isinstance(exc, MessageFailed) else None
    code = "AE" if queue_app_ack(conn, ctx, row, "AE", reason, problem) is not None else None
    hl7_messages.mark_failed(conn, row["id"], reason, code)


def _order_message(conn: psycopg.Connection[Any], ctx: Context, text: str, site: Site | None) -> None:
    message = map_order(text, ctx.hl7_tables)
    patient = patients.upsert_patient(conn, ctx, message.patient)
    encounter = None
    if message.encounter and message.encounter.get("identifier"):
        encounter = patients.upsert(conn, ctx, {**message.encounter, "subject": {"reference": f"Patient/{patient['id']}"}})
    for order in message.orders:
        _order(conn, ctx, order, patient, encounter, site, message.sending_facility)


def _order(conn: psycopg.Connection[Any], ctx: Context, order: Order, patient: dict[str, Any],
           encounter: dict[str, Any] | None, site: Site | None, facility: str | None) -> None:
    request = dict(order.service_request)
    request["subject"] = {"reference": f"Patient/{patient['id']}"}
    if site is not None:
        request["meta"] = {"tag": [site_tag(site.code)]}
    if encounter:
        request["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
    else:
        request.pop("encounter", None)
    request = {k: v for k, v in request.items() if v is not None}
    existing = patients.find_by_identifier(conn, ctx, "ServiceRequest",
                       [i for i in request.get("identifier", []) if _id_type(i) in ("PLAC", "FILL")])
    if order.order_control in CANCEL:
        if existing:
            cancelled = {**without_meta(existing[0]), "status": "revoked"}
            resources.update(conn, cancelled, ctx.params["ServiceRequest"])
            _withdraw(conn, ctx, existing[0]["id"])
        return
    if not existing and order.order_control not in ("NW", "XO", "SC", "SN", "NA"):
        return
    stored = patients.upsert(conn, ctx, request)
    inbound.order_arrived(conn, order.study_instance_uid, order.accession,  # a pushed study may wait for it
                          site.code if site else facility)
    done = (order.order_status in (site.exam_done_order_status if site else {"CM"})
            or (site is not None and order.result_status in site.exam_done_result_status))
    if done:
        _queue_find_study(conn, ctx, stored, order, site, facility)


def _withdraw(conn: psycopg.Connection[Any], ctx: Context, request_id: str) -> None:
    queue.cancel(conn, f"{FIND_STUDY}:ServiceRequest/{request_id}")
    based_on = Query(criteria=[Criterion(ctx.params["ImagingStudy"]["based-on"],
                                         [(ANY_SYSTEM, f"ServiceRequest/{request_id}")])], count=50)
    for study in resources.search(conn, "ImagingStudy", based_on)[1]:
        uid = study_uid(study)
        if uid:
            queue.cancel(conn, intake.analysis_key(uid))
    for task in _tasks(conn, ctx, request_id):
        if task["status"] not in ("completed", "failed", "cancelled"):
            tasks.update(conn, ctx, task, "cancelled", reason="the order was cancelled")


def _tasks(conn: psycopg.Connection[Any], ctx: Context, request_id: str) -> list[dict[str, Any]]:
    return resources.search(conn, "Task", Query(criteria=[Criterion(
        ctx.params["Task"]["focus"], [(ANY_SYSTEM, f"ServiceRequest/{request_id}")])], count=20))[1]


def _queue_find_study(conn: psycopg.Connection[Any], ctx: Context, request: dict[str, Any], order: Order,
                      site: Site | None, facility: str | None) -> None:
    key = f"{FIND_STUDY}:ServiceRequest/{request['id']}"
    if queue.exists(conn, key):
        return
    deadline = intake.pacs_deadline(ctx, site)
    task = resources.create(conn, {
        "resourceType": "Task", "status": "requested", "intent": "order", "priority": "routine",
        "code": {"coding": [FIND_STUDY_TASK], "text": FIND_STUDY_TASK["display"]},
        "focus": {"reference": f"ServiceRequest/{request['id']}"}, "for": request["subject"],
        "basedOn": [{"reference": f"ServiceRequest/{request['id']}"}],
        "authoredOn": utc_now().isoformat(),
        "restriction": {"period": {"end": deadline}},
    }, ctx.params["Task"])
    policy = ctx.policies.kind(FIND_STUDY)
    queue.enqueue(conn, FIND_STUDY, {
        "service_request": request["id"], "task": task["id"], "study_uid": order.study_instance_uid,
        "accession": order.accession, "site": site.code if site else facility,
        "deadline": deadline,
    }, dedupe_key=key, max_attempts=policy.max_attempts, priority=policy.priority)


# -- find-study ----------------------------------------------------------------------------------------
def find_study(conn: psycopg.Connection[Any], ctx: Context, job: queue.Job, _timings: object = None) -> None:
    p = job.payload
    site = ctx.sites.get(str(p.get("site") or ""))
    pacs = (site.dicomweb if site else None) or ctx.settings.dicomweb_url
    if not pacs:
        raise Permanent("no PACS is configured for this site (sites file `dicomweb` or DICOMWEB_URL)")
    if not p.get("study_uid") and not p.get("accession"):
        raise Permanent("the order carries neither a Study Instance UID nor an accession number")
    task = resources.read(conn, "Task", p["task"])
    client = DicomWebClient(str(pacs), timeout_s=ctx.settings.dicomweb_timeout, tls=ClientTls.from_settings(ctx.settings))
    try:
        uids = client.find_study_uids(study_uid=p["study_uid"]) if p.get("study_uid") else []
        if not uids and p.get("accession"):
            uids = client.find_study_uids(accession=p["accession"])
        if not uids:
            if not intake.still_waiting(p["deadline"]):
                raise Permanent("the images did not arrive in the PACS before the deadline")
            intake.wait_for_images(conn, ctx, task)
        if len(uids) > 1:
            raise Permanent(f"the accession number matches {len(uids)} studies in the PACS")
        refs = client.search_instances(uids[0])
    except DicomError as exc:
        if exc.is_transient:
            raise Transient(f"{type(exc).__name__}: {exc.reason}") from None
        raise Permanent(f"{type(exc).__name__}: {exc.reason}") from None
    finally:
        client.close()
    request = resources.read(conn, "ServiceRequest", p["service_request"])
    with conn.transaction():
        study = imaging_study(refs, subject=request["subject"]["reference"], endpoint_address=str(pacs),
                              based_on=f"ServiceRequest/{request['id']}", accession=p.get("accession"))
        if request.get("encounter"):
            study["encounter"] = request["encounter"]
        if request.get("code"):
            study["procedureCode"] = [request["code"]]
        if (request.get("meta") or {}).get("tag"):
            study["meta"] = {"tag": request["meta"]["tag"]}
        stored = intake.same_study(conn, ctx, study)
        if stored is None:
            stored = resources.create(conn, study, ctx.params["ImagingStudy"])
            intake.accept_study(conn, ctx, stored)
        tasks.update(conn, ctx, task, "completed", business="images found; analysis queued",
                     outputs=[f"ImagingStudy/{stored['id']}"], output_type="ImagingStudy")
        queue.complete(conn, job)

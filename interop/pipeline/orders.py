"""The life of an HL7 order, off the ACK path: map a stored message to FHIR and act on it.

`process-hl7` jobs: full parse and mapping of an acknowledged message (PID/PV1/ORC/OBR/IPC to
Patient, Encounter, ServiceRequest), then the order control: NW creates, XO updates, CA/DC
cancel (a queued search or analysis is withdrawn), and an exam that is done (ORC-5 or OBR-25
per the site's rule) queues a `find-study` job. `find-study` jobs look for the images in the
PACS by Study Instance UID or accession number, keep looking with back-off until the site's
deadline, then create the ImagingStudy (basedOn the ServiceRequest) and queue its analysis
through the same pipeline as the FHIR path. Every step is visible as FHIR: the resources, and
a Task per order (`Task?focus=ServiceRequest/{id}`).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from ..config import Settings
from ..dicom.dicomweb import DicomWebClient
from ..dicom.errors import DicomError
from ..dicom.study import imaging_study
from ..hl7 import charset
from ..hl7.message import MessageError
from ..hl7.order import Order, map_order, map_patient_update
from ..sites import Site, find, load
from ..store import jobs, resources
from ..store.resources import ANY_SYSTEM, Criterion, Query
from ..store.search_params import SearchParam
from . import intake
from .errors import Permanent, Transient

PROCESS_HL7 = "process-hl7"
FIND_STUDY = "find-study"
ADT_TYPES = ("ADT^A08", "ADT^A31", "ADT^A01", "ADT^A04")
CANCEL = ("CA", "DC", "OC", "OD")
SITE_TAG = "urn:interop-hub:site"
FIND_TASK = {"system": "urn:interop-hub:task-type", "code": "find-study",
             "display": "Find the order's images in the PACS"}


def _now() -> datetime:
    return datetime.now(timezone.utc)


class OrderHandlers:
    """Job handlers for the HL7 path; the worker owns the connection and the retry policy."""

    def __init__(self, settings: Settings, conn: psycopg.Connection[Any], params: dict[str, dict[str, SearchParam]]):
        self.settings = settings
        self.conn = conn
        self.params = params
        self.sites: dict[str, Site] = load(settings.sites_file)

    # -- process-hl7 ---------------------------------------------------------------------------
    def process_message(self, job: jobs.Job, _timings: object = None) -> None:
        row = self.conn.execute(
            "SELECT id, message_type, sending_facility, raw FROM hl7_message WHERE id = %s",
            (job.payload["message"],)).fetchone()
        if row is None:
            raise Permanent("the HL7 message is no longer stored")
        try:
            text, _codec = charset.decode(bytes(row["raw"]))
            with self.conn.transaction():
                if row["message_type"] in ADT_TYPES:
                    self._patient(map_patient_update(text).patient)
                else:
                    self._order_message(text, find(self.sites, row["sending_facility"]))
                self.conn.execute("UPDATE hl7_message SET status = 'processed', processed_at = now(), error = NULL"
                                  " WHERE id = %s", (row["id"],))
                jobs.complete(self.conn, job, {})
        except (MessageError, charset.CharsetError) as exc:
            raise Permanent(f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}") from None

    def message_failed(self, job: jobs.Job, reason: str) -> None:
        self.conn.execute("UPDATE hl7_message SET status = 'failed', processed_at = now(), error = %s WHERE id = %s",
                          (reason, job.payload["message"]))

    def _search(self, rtype: str, param: str, identifiers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        values: list[tuple[Any, str]] = [(i.get("system") or ANY_SYSTEM, str(i["value"]))
                                         for i in identifiers if i.get("value")]
        if not values:
            return []
        query = Query(criteria=[Criterion(self.params[rtype][param], values)], count=2)
        return resources.search(self.conn, rtype, query)[1]

    def _upsert(self, new: dict[str, Any], merge_lists: tuple[str, ...] = ("identifier",)) -> dict[str, Any]:
        """Create, or update the resource that shares an identifier (identifiers are merged)."""
        rtype = new["resourceType"]
        found = self._search(rtype, "identifier", new.get("identifier", []))
        if not found:
            return resources.create(self.conn, new, self.params[rtype])
        current = {k: v for k, v in found[0].items() if k != "meta"}
        # "unknown" is what a message says when it says nothing (XO with no ORC-5): keep what we know
        merged = {**current, **{k: v for k, v in new.items()
                                if v not in (None, [], {}) and not (k == "status" and v == "unknown")}}
        for key in merge_lists:
            seen = {(i.get("system"), i.get("value")) for i in new.get(key, [])}
            merged[key] = new.get(key, []) + [i for i in found[0].get(key, []) if (i.get("system"), i.get("value")) not in seen]
        merged["id"] = found[0]["id"]
        return resources.update(self.conn, merged, self.params[rtype])[0]

    def _patient(self, patient: dict[str, Any]) -> dict[str, Any]:
        if not patient.get("identifier"):
            raise Permanent("the message names no patient identifier (PID-3)")
        return self._upsert(patient)

    def _order_message(self, text: str, site: Site | None) -> None:
        message = map_order(text)
        patient = self._patient(message.patient)
        encounter = None
        if message.encounter and message.encounter.get("identifier"):
            encounter = self._upsert({**message.encounter, "subject": {"reference": f"Patient/{patient['id']}"}})
        for order in message.orders:
            self._order(order, patient, encounter, site, message.sending_facility)

    def _order(self, order: Order, patient: dict[str, Any], encounter: dict[str, Any] | None,
               site: Site | None, facility: str | None) -> None:
        request = dict(order.service_request)
        request["subject"] = {"reference": f"Patient/{patient['id']}"}
        if site is not None:
            request["meta"] = {"tag": [site_tag(site.code)]}
        if encounter:
            request["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
        else:
            request.pop("encounter", None)
        request = {k: v for k, v in request.items() if v is not None}
        existing = self._search("ServiceRequest", "identifier", [i for i in request.get("identifier", [])
                                                                  if _id_type(i) in ("PLAC", "FILL")])
        if order.order_control in CANCEL:
            if existing:
                cancelled = {**existing[0], "status": "revoked"}
                cancelled.pop("meta", None)
                resources.update(self.conn, cancelled, self.params["ServiceRequest"])
                self._withdraw(existing[0]["id"])
            return
        stored = self._upsert(request) if existing or order.order_control in ("NW", "XO", "SC", "SN", "NA") else None
        if stored is None:
            return
        done = (order.order_status in (site.exam_done_order_status if site else {"CM"})
                or (site is not None and order.result_status in site.exam_done_result_status))
        if done:
            self._queue_find_study(stored, order, site, facility)

    def _withdraw(self, request_id: str) -> None:
        jobs.cancel(self.conn, f"{FIND_STUDY}:ServiceRequest/{request_id}")
        for study in resources.search(self.conn, "ImagingStudy", Query(criteria=[Criterion(
                self.params["ImagingStudy"]["based-on"], [(ANY_SYSTEM, f"ServiceRequest/{request_id}")])], count=50))[1]:
            jobs.cancel(self.conn, f"{intake.ANALYSE}:ImagingStudy/{study['id']}")
        for task in self._tasks(request_id):
            if task["status"] not in ("completed", "failed", "cancelled"):
                self._set_task(task, "cancelled", reason="the order was cancelled")

    def _tasks(self, request_id: str) -> list[dict[str, Any]]:
        return resources.search(self.conn, "Task", Query(criteria=[Criterion(
            self.params["Task"]["focus"], [(ANY_SYSTEM, f"ServiceRequest/{request_id}")])], count=20))[1]

    def _set_task(self, task: dict[str, Any], status: str, *, reason: str | None = None,
                  business: str | None = None, output: str | None = None) -> dict[str, Any]:
        task = {k: v for k, v in task.items() if k != "meta"}
        task["status"] = status
        task["lastModified"] = _now().isoformat()
        if reason:
            task["statusReason"] = {"text": reason}
        if business:
            task["businessStatus"] = {"text": business}
        if output:
            task["output"] = [{"type": {"text": "ImagingStudy"}, "valueReference": {"reference": output}}]
        return resources.update(self.conn, task, self.params["Task"])[0]

    def _queue_find_study(self, request: dict[str, Any], order: Order, site: Site | None, facility: str | None) -> None:
        key = f"{FIND_STUDY}:ServiceRequest/{request['id']}"
        if self.conn.execute("SELECT 1 FROM job WHERE dedupe_key = %s", (key,)).fetchone():
            return
        wait = timedelta(minutes=site.pacs_wait_minutes if site else 60)
        task = resources.create(self.conn, {
            "resourceType": "Task", "status": "requested", "intent": "order", "priority": "routine",
            "code": {"coding": [FIND_TASK], "text": FIND_TASK["display"]},
            "focus": {"reference": f"ServiceRequest/{request['id']}"}, "for": request["subject"],
            "basedOn": [{"reference": f"ServiceRequest/{request['id']}"}],
            "authoredOn": _now().isoformat(),
            "restriction": {"period": {"end": (_now() + wait).isoformat()}},
        }, self.params["Task"])
        jobs.enqueue(self.conn, FIND_STUDY, {
            "service_request": request["id"], "task": task["id"], "study_uid": order.study_instance_uid,
            "accession": order.accession, "site": site.code if site else facility,
            "deadline": (_now() + wait).isoformat(),
        }, dedupe_key=key, max_attempts=10_000)

    # -- find-study ------------------------------------------------------------------------------
    def find_study(self, job: jobs.Job, _timings: object = None) -> None:
        p = job.payload
        site = self.sites.get(str(p.get("site") or "").upper())
        pacs = (site.extra.get("dicomweb") if site else None) or self.settings.dicomweb_url
        if not pacs:
            raise Permanent("no PACS is configured for this site (sites file `dicomweb` or DICOMWEB_URL)")
        task = resources.read(self.conn, "Task", p["task"])
        client = DicomWebClient(pacs, timeout_s=self.settings.dicomweb_timeout)
        try:
            uids = client.find_study_uids(study_uid=p["study_uid"]) if p.get("study_uid") else []
            if not uids and p.get("accession"):
                uids = client.find_study_uids(accession=p["accession"])
            if not p.get("study_uid") and not p.get("accession"):
                raise Permanent("the order carries neither a Study Instance UID nor an accession number")
            if not uids:
                if _now() >= datetime.fromisoformat(p["deadline"]):
                    raise Permanent("the images did not arrive in the PACS before the deadline")
                self._set_task(task, "in-progress", business="waiting for the images in the PACS")
                raise Transient("the images are not in the PACS yet")
            if len(uids) > 1:
                raise Permanent(f"the accession number matches {len(uids)} studies in the PACS")
            refs = client.search_instances(uids[0])
        except DicomError as exc:
            if exc.is_transient:
                raise Transient(f"{type(exc).__name__}: {exc.reason}") from None
            raise Permanent(f"{type(exc).__name__}: {exc.reason}") from None
        finally:
            client.close()
        request = resources.read(self.conn, "ServiceRequest", p["service_request"])
        with self.conn.transaction():
            study = imaging_study(refs, subject=request["subject"]["reference"], endpoint_address=pacs,
                                  based_on=f"ServiceRequest/{request['id']}", accession=p.get("accession"))
            if request.get("encounter"):
                study["encounter"] = request["encounter"]
            if request.get("code"):
                study["procedureCode"] = [request["code"]]
            if request.get("meta", {}).get("tag"):
                study["meta"] = {"tag": request["meta"]["tag"]}
            existing = self._search("ImagingStudy", "identifier", study["identifier"][:1])
            if existing:
                stored = existing[0]
            else:
                stored = resources.create(self.conn, study, self.params["ImagingStudy"])
                intake.accept_study(self.conn, stored, self.params, self.settings.dicomweb_url,
                                    self.settings.job_max_attempts)
            self._set_task(task, "completed", business="images found; analysis queued",
                           output=f"ImagingStudy/{stored['id']}")
            jobs.complete(self.conn, job, {})


def site_tag(code: str) -> dict[str, str]:
    """The meta.tag that records which facility an order (and its study and report) belongs to."""
    return {"system": SITE_TAG, "code": code}


def site_of(resource: dict[str, Any]) -> str | None:
    for tag in resource.get("meta", {}).get("tag", []):
        if tag.get("system") == SITE_TAG:
            return str(tag.get("code"))
    return None


def _id_type(identifier: dict[str, Any]) -> str | None:
    for coding in identifier.get("type", {}).get("coding", []):
        return coding.get("code")
    return None

"""Studies pushed to the hub (issue 13, the "in" half): by a modality or a PACS over DICOM
C-STORE (`interop dicom-scp`) or over STOW-RS (POST /dicom-web/studies).

`keep` makes one received instance durable before it is acknowledged: it goes to the AI
center's archive PACS (DICOMWEB_URL, STOW-RS) or, when there is none, to a file under
INTEROP_DATA_DIR/dicom; then its row, its study's "last received" time, the audit record and
the study's `study-stable` job commit together. Anything that fails on the way is a `Refused`
with the DICOM status to answer, never a success.

`study_stable` (the `study-stable` job, run by the analysis worker) waits until no instance
arrived for INTEROP_DICOM_STABLE_SECONDS, matches the study to its order (Study Instance UID or
accession number) and hands an ImagingStudy to `intake`, exactly as a posted one. A study no
order matches follows its site's `unmatched_studies` policy (analyse, wait N minutes, hold for a
person); instances arriving after the analysis started open a new round, whose report
supersedes the previous one as its next version.
"""
from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import requests
from pydicom.errors import InvalidDicomError

from ..dicom.dicomweb import InstanceRef
from ..dicom.local import LOCAL, LocalArchive
from ..dicom.study import imaging_study
from ..domain import audit
from ..domain.vocabulary import ANALYSIS_TASK, site_of, site_tag
from ..sites import Site, Unmatched
from ..store import instances as store
from ..store import queue, resources
from ..store.resources import ANY_SYSTEM, Criterion, Query
from ..tls import ClientTls
from . import intake, tasks
from .context import Context
from .security import audit as audit_trail

STUDY_STABLE = "study-stable"
RECHECK_SECONDS = 60  # how often a study waiting for its order looks for it again
FLAG_SYSTEM = "urn:interop-hub:dicom-in"  # meta.tag of a pushed study: `identity-conflict`, `unmatched`
DICOM_PATIENT_SYSTEM = "urn:interop-hub:dicom-patient-id:"  # + site: a Patient made from a pushed study's header

# DICOM C-STORE failure statuses (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


class Refused(Exception):
    """An instance the hub did not keep: the DICOM status to answer and a reason safe to show."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def stable_key(study_uid: str, round_: int) -> str:
    return f"{STUDY_STABLE}:{study_uid}:{round_}"


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value is not None else None


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _native_length(ds: Any) -> int:
    """The bytes uncompressed pixel data must have (0 when it is compressed: encapsulated)."""
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return 0
    frames = _int(ds, "NumberOfFrames") or 1
    bits = int(ds.get("BitsAllocated") or 0)
    return int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * int(ds.get("SamplesPerPixel") or 1) * frames * bits // 8


def read_header(path: Path, *, sender: str, max_bytes: int, expected_sop_class: str | None = None,
                transfer_syntax: str | None = None) -> store.Received:
    """What the hub records of a received instance; `Refused` for one too large or one it cannot understand."""
    if path.stat().st_size > max_bytes:
        raise Refused(OUT_OF_RESOURCES, f"the dataset is larger than INTEROP_DICOM_MAX_BYTES ({max_bytes})")
    try:
        ds = pydicom.dcmread(path, force=transfer_syntax is not None)
        if transfer_syntax is not None and not hasattr(ds, "file_meta"):
            raise InvalidDicomError("no file meta")
        if "PixelData" in ds and len(ds.PixelData) < _native_length(ds):
            raise EOFError("the pixel data is shorter than its rows, columns and bits say")
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise Refused(CANNOT_UNDERSTAND, f"the dataset cannot be read ({type(exc).__name__}): truncated or malformed") from None
    study_uid, series_uid, sop_uid = _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID"), _text(ds, "SOPInstanceUID")
    sop_class = _text(ds, "SOPClassUID")
    if not (study_uid and series_uid and sop_uid and sop_class):
        raise Refused(DOES_NOT_MATCH, "the dataset lacks its Study, Series or SOP Instance UID or its SOP Class UID")
    if expected_sop_class is not None and sop_class != expected_sop_class:
        raise Refused(DOES_NOT_MATCH, "the dataset's SOP Class UID is not the one of its presentation context")
    meta = getattr(ds, "file_meta", None)
    syntax = transfer_syntax or (str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None)
    return store.Received(
        sop_instance_uid=sop_uid, study_uid=study_uid, series_uid=series_uid, sop_class_uid=sop_class,
        transfer_syntax=syntax, modality=_text(ds, "Modality"), series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"), series_description=_text(ds, "SeriesDescription"),
        body_part=_text(ds, "BodyPartExamined"), bytes=path.stat().st_size, sender=sender, stored_in="",
        patient_id=_text(ds, "PatientID"), patient_name=_text(ds, "PatientName"), accession=_text(ds, "AccessionNumber"))


# -- keeping it ------------------------------------------------------------------------------------
class _Multipart:
    """One file as a multipart/related body, read in blocks (never whole in memory), with a length."""

    BOUNDARY = "interop-hub-stow-boundary"

    def __init__(self, path: Path):
        self.head = (f"--{self.BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n").encode()
        self.tail = f"\r\n--{self.BOUNDARY}--\r\n".encode()
        self.size = path.stat().st_size
        self.file = path.open("rb")
        self.parts: Iterator[bytes] = self._parts()

    def _parts(self) -> Iterator[bytes]:
        yield self.head
        while block := self.file.read(1 << 20):
            yield block
        yield self.tail

    def __len__(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    def read(self, _size: int = -1) -> bytes:
        return next(self.parts, b"")

    def close(self) -> None:
        self.file.close()


def _to_archive(ctx: Context, base: str, path: Path) -> None:
    body = _Multipart(path)
    try:
        response = requests.post(
            f"{base.rstrip('/')}/studies", data=body, timeout=ctx.settings.dicomweb_timeout,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={_Multipart.BOUNDARY}',
                     "Content-Length": str(len(body)), "Accept": "application/dicom+json"},
            **ClientTls.from_settings(ctx.settings).requests_kwargs())
    except requests.RequestException as exc:
        raise Refused(OUT_OF_RESOURCES, f"the archive PACS cannot be reached ({type(exc).__name__})") from None
    finally:
        body.close()
    if response.status_code not in (200, 202):
        raise Refused(OUT_OF_RESOURCES, f"the archive PACS refused the instance (HTTP {response.status_code})")


def local_path(ctx: Context, item: store.Received) -> Path:
    safe = [uid if uid.replace(".", "").isdigit() else "x" + uid.encode().hex()
            for uid in (item.study_uid, item.sop_instance_uid)]
    return ctx.settings.data_dir / "dicom" / safe[0] / f"{safe[1]}.dcm"


def _to_disk(ctx: Context, item: store.Received, path: Path) -> str:
    target = local_path(ctx, item)
    part = target.with_suffix(".part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        part.unlink(missing_ok=True)
        try:  # the received file itself, when it is on the same file system: no second write of it
            os.link(path, part)
            with part.open("rb") as linked:
                os.fsync(linked.fileno())
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            with path.open("rb") as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(part, target)
    except OSError as exc:
        part.unlink(missing_ok=True)
        why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"it cannot be written ({exc.strerror})"
        raise Refused(OUT_OF_RESOURCES, f"the instance cannot be kept: {why}") from None
    return str(target)


def keep(conn: psycopg.Connection[Any], ctx: Context, path: Path, item: store.Received, *, site: Site | None,
         who: audit.Who) -> dict[str, Any]:
    """Keep one received instance (archive or disk), then record it, audit it and (re)start its
    study's stable wait in one transaction. Returns the study row. `Refused` when it is not kept."""
    archive = ctx.settings.dicomweb_url
    if archive:
        _to_archive(ctx, archive, path)
        where = archive
    else:
        where = _to_disk(ctx, item, path)
    kept = store.Received(**{**item.__dict__, "stored_in": where})
    try:
        with conn.transaction():
            row = store.record(conn, kept, site.code if site else None)
            if row["state"] != "receiving":  # analysis (or the wait for an order) already started
                row["round"] = store.next_round(conn, item.study_uid)
            policy = ctx.policies.kind(STUDY_STABLE)
            queue.enqueue(conn, STUDY_STABLE, {"study_uid": item.study_uid, "round": row["round"]},
                          dedupe_key=stable_key(item.study_uid, row["round"]), max_attempts=policy.max_attempts,
                          priority=policy.priority, delay_seconds=ctx.settings.dicom_stable_seconds)
            audit_trail.record(conn, audit.Event(who, audit.interaction("create"), "C",
                                                 what=[f"urn:dicom:uid:{item.sop_instance_uid}"], patients=[],
                                                 description=f"DICOM instance received, study {item.study_uid}"[:200]))
    except psycopg.Error as exc:
        raise Refused(OUT_OF_RESOURCES, f"the instance cannot be recorded ({type(exc).__name__})") from None
    return row


# -- the stable study: to analysis ---------------------------------------------------------------
def study_stable(conn: psycopg.Connection[Any], ctx: Context, job: queue.Job, _timings: object = None) -> None:
    """The `study-stable` job: analyse the study once it is quiet and its order known (or not needed)."""
    uid, round_ = str(job.payload["study_uid"]), int(job.payload["round"])
    with conn.transaction():
        row = store.study(conn, uid, lock=True)
        if row is None or row["round"] != round_:  # a newer round took over
            queue.complete(conn, job)
            return
        window = ctx.settings.dicom_stable_seconds
        if float(row["quiet_seconds"]) < window:
            queue.retry_later(conn, job, "instances are still arriving", max(1, math.ceil(window - float(row["quiet_seconds"]))),
                              refund=True)
            return
        order = _order(conn, ctx, row)
        wait = _wait_seconds(ctx, row, order)
        if wait is not None:
            _hold(conn, ctx, row, order)
            queue.retry_later(conn, job, "no order matches the study yet" if order is None and not row["identity_conflict"]
                              else "held for a person", wait, refund=True)
            return
        _analyse(conn, ctx, row, order)
        queue.complete(conn, job)


def _wait_seconds(ctx: Context, row: dict[str, Any], order: dict[str, Any] | None) -> int | None:
    """None: analyse now; else how long until the unmatched study is looked at again."""
    if row["decision"] == "release" or (row["decision"] == "match" and order is not None):
        return None
    if row["identity_conflict"]:
        return RECHECK_SECONDS  # flagged: a person decides (release, or match)
    if order is not None:
        return None
    site = ctx.sites.get(row["site"] or "") if row["site"] else None
    policy = site.unmatched_studies if site is not None else Unmatched()
    if policy.policy == "analyse":
        return None
    if policy.policy == "wait":
        left = policy.wait_minutes * 60 - float(row["age_seconds"])
        return None if left <= 0 else max(1, min(RECHECK_SECONDS, math.ceil(left)))
    return RECHECK_SECONDS


def _order(conn: psycopg.Connection[Any], ctx: Context, row: dict[str, Any]) -> dict[str, Any] | None:
    """The ServiceRequest of the study: an admin's match, an order waiting for these images (its
    Study Instance UID or accession number), or the one order with this accession number."""
    rid = (row["service_request"] or "").removeprefix("ServiceRequest/") \
        or store.pending_order(conn, row["study_uid"], row["accession"], row["site"])
    if rid:
        return resources.find(conn, f"ServiceRequest/{rid}")
    if not row["accession"] or not row["site"]:
        return None  # an accession number means something only at the hospital that gave it
    query = Query(criteria=[Criterion(ctx.params["ServiceRequest"]["identifier"], [(ANY_SYSTEM, row["accession"])])], count=20)
    found = [r for r in resources.search(conn, "ServiceRequest", query)[1]
             if r.get("status") not in ("revoked", "entered-in-error") and (site_of(r) or "").upper() == row["site"].upper()]
    return found[0] if len(found) == 1 else None


def _patient(conn: psycopg.Connection[Any], ctx: Context, row: dict[str, Any]) -> str:
    """The Patient of a study no order names: the one with its DICOM Patient ID at its site, or a new one."""
    system = f"{DICOM_PATIENT_SYSTEM}{row['site'] or 'unknown'}"
    value = row["patient_id"] or f"unknown:{row['study_uid']}"
    query = Query(criteria=[Criterion(ctx.params["Patient"]["identifier"], [(system, value)])], count=1)
    found = resources.search(conn, "Patient", query)[1]
    if found:
        return f"Patient/{found[0]['id']}"
    patient: dict[str, Any] = {"resourceType": "Patient", "identifier": [{"system": system, "value": value}]}
    if row["patient_name"]:
        family, _, given = str(row["patient_name"]).partition("^")
        patient["name"] = [{"family": family, **({"given": [g for g in given.split("^") if g]} if given else {})}]
    if row["site"]:
        patient["meta"] = {"tag": [site_tag(row["site"])]}
    return f"Patient/{resources.create(conn, patient, ctx.params['Patient'])['id']}"


def _refs(conn: psycopg.Connection[Any], uid: str) -> list[InstanceRef]:
    return [InstanceRef(study_uid=uid, series_uid=i["series_uid"], instance_uid=i["sop_instance_uid"],
                        sop_class_uid=i["sop_class_uid"], modality=i["modality"], body_part=i["body_part"],
                        series_description=i["series_description"], instance_number=i["instance_number"],
                        series_number=i["series_number"]) for i in store.instances(conn, uid)]


def local_archive(conn: psycopg.Connection[Any], study_uid: str) -> LocalArchive:
    """The study's instances in the hub's own storage, as the analysis reads them: each described
    from its own header (rows, view, position: what a QIDO-RS search would have said)."""
    files = {r["sop_instance_uid"]: Path(r["stored_in"]) for r in store.instances(conn, study_uid)
             if not str(r["stored_in"]).startswith(("http://", "https://"))}
    refs = []
    for path in files.values():
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # unreadable now: the analysis sees the study without it
        refs.append(InstanceRef.from_dicom_json(header.to_json_dict(bulk_data_threshold=1 << 30,
                                                                    bulk_data_element_handler=lambda _: "")))
    return LocalArchive(refs, files)


def _source(ctx: Context) -> str:
    """Where the analysis reads a pushed study: the archive PACS, or the hub's own storage."""
    return ctx.settings.dicomweb_url or LOCAL


def _keep_study(conn: psycopg.Connection[Any], ctx: Context, row: dict[str, Any], order: dict[str, Any] | None,
                *, held: bool) -> dict[str, Any]:
    """The pushed study as a FHIR ImagingStudy, created or updated (one per Study Instance UID).
    A held one is `registered` and tagged, so admins find the queue with a FHIR search too
    (`ImagingStudy?_tag=urn:interop-hub:dicom-in|unmatched`); analysis makes it `available`."""
    uid = row["study_uid"]
    subject = order["subject"]["reference"] if order else _patient(conn, ctx, row)
    study = imaging_study(_refs(conn, uid), subject=subject, endpoint_address=ctx.settings.dicomweb_url,
                          based_on=f"ServiceRequest/{order['id']}" if order else None, accession=row["accession"])
    if held:
        study["status"] = "registered"
    tags = [site_tag(row["site"])] if row["site"] else []
    if order is None:
        tags.append({"system": FLAG_SYSTEM, "code": "unmatched", "display": "no order matched this pushed study"})
    if row["identity_conflict"]:
        tags.append({"system": FLAG_SYSTEM, "code": "identity-conflict", "display": row["identity_conflict"]})
    if order is not None and order.get("encounter"):
        study["encounter"] = order["encounter"]
    if tags:
        study["meta"] = {"tag": tags}
    resources.lock(conn, f"ImagingStudy?uid={uid}")
    same = intake.same_study(conn, ctx, study)
    if same is None:
        return resources.create(conn, study, ctx.params["ImagingStudy"])
    if held and same.get("status") == "registered" and same.get("numberOfInstances") == study["numberOfInstances"] \
            and same.get("subject") == study["subject"]:
        return same  # already held as it is: no new version at every recheck
    kept = resources.update(conn, {**study, "id": same["id"]}, ctx.params["ImagingStudy"])[0]
    _drop_stand_in(conn, ctx, str((same.get("subject") or {}).get("reference") or ""), subject)
    return kept


def _drop_stand_in(conn: psycopg.Connection[Any], ctx: Context, was: str, now: str) -> None:
    """Once a held study follows its order's Patient, the Patient made from its DICOM header alone
    is deleted (a version stays in its history), unless something else still names it: one person
    is then one Patient at the hub, as the hospital knows them."""
    if not was.startswith("Patient/") or was == now:
        return
    made = resources.find(conn, was)
    identifiers = (made or {}).get("identifier") or []
    if not identifiers or not all(str(i.get("system", "")).startswith(DICOM_PATIENT_SYSTEM) for i in identifiers):
        return
    if not resources.referrers(conn, was, ctx.params, most=1):
        resources.delete(conn, "Patient", was.removeprefix("Patient/"))


def _hold(conn: psycopg.Connection[Any], ctx: Context, row: dict[str, Any], order: dict[str, Any] | None) -> None:
    """The study waits (for its order, or for a person): visible as a `registered` ImagingStudy."""
    stored = _keep_study(conn, ctx, row, order, held=True)
    store.set_state(conn, row["study_uid"], "unmatched", imaging_study=f"ImagingStudy/{stored['id']}")


def _analyse(conn: psycopg.Connection[Any], ctx: Context, row: dict[str, Any], order: dict[str, Any] | None) -> None:
    uid = row["study_uid"]
    stored = _keep_study(conn, ctx, row, order, held=False)
    if queue.exists(conn, intake.analysis_key(uid)):
        _reanalyse(conn, ctx, stored, uid, int(row["round"]))
    else:
        intake.accept_study(conn, ctx, stored, source=_source(ctx))
    store.set_state(conn, uid, "analysing", imaging_study=f"ImagingStudy/{stored['id']}",
                    service_request=f"ServiceRequest/{order['id']}" if order else None)


def _reanalyse(conn: psycopg.Connection[Any], ctx: Context, study: dict[str, Any], uid: str, round_: int) -> None:
    """Analyse the whole study again (instances came after the last analysis started); its report
    is the next version of the previous one (`Analyser` waits for the previous analysis to end)."""
    previous = store.last_analysis(conn, intake.analysis_key(uid))
    key = f"{intake.analysis_key(uid)}:round:{round_}"
    if previous is None or queue.exists(conn, key):
        return
    task = resources.create(conn, {
        "resourceType": "Task", "status": "requested", "intent": "order", "priority": "routine",
        "code": {"coding": [ANALYSIS_TASK], "text": ANALYSIS_TASK["display"]}, "for": study["subject"],
        "focus": {"reference": f"ImagingStudy/{study['id']}"}, "authoredOn": tasks.utc_now().isoformat(),
        "partOf": [{"reference": f"Task/{previous['task']}"}], **({"basedOn": study["basedOn"]} if study.get("basedOn") else {}),
    }, ctx.params["Task"])
    policy = ctx.policies.kind(intake.ANALYSE)
    queue.enqueue(conn, intake.ANALYSE, {"study": study["id"], "task": task["id"], "study_uid": uid,
                                         "dicomweb": _source(ctx), "supersedes": previous["task"],
                                         "deadline": intake.pacs_deadline(ctx, ctx.sites.get(site_of(study) or ""))},
                  dedupe_key=key, max_attempts=policy.max_attempts, priority=policy.priority)


def previous_over(conn: psycopg.Connection[Any], task_id: str) -> bool:
    """Whether the analysis a re-analysis supersedes has ended (its report is the one to supersede)."""
    return str(resources.read(conn, "Task", task_id)["status"]) in ("completed", "failed", "rejected", "cancelled")


def report_to_supersede(conn: psycopg.Connection[Any], ctx: Context, report: dict[str, Any]) -> dict[str, Any] | None:
    """The stored report of the same study and model (its identifier), which a re-analysis's report updates."""
    values: list[tuple[Any, str]] = [(i["system"], i["value"]) for i in report.get("identifier") or [] if i.get("value")]
    if not values:
        return None
    found = resources.search(conn, "DiagnosticReport", Query(criteria=[Criterion(
        ctx.params["DiagnosticReport"]["identifier"], values)], count=1))[1]
    return found[0] if found else None


# -- the unmatched-studies queue (admins) ------------------------------------------------------------
def decide(conn: psycopg.Connection[Any], ctx: Context, study_uid: str, decision: str,
           service_request: str | None = None) -> bool:
    """An admin releases an unmatched study for analysis, or matches it to an order; False when
    the study is not waiting. The waiting job runs now."""
    if decision == "match":
        service_request = (service_request or "").removeprefix("ServiceRequest/")
        if not service_request or resources.find(conn, f"ServiceRequest/{service_request}") is None:
            raise ValueError("match needs an existing ServiceRequest")
    if not store.decide(conn, study_uid, decision, service_request):
        return False
    row = store.study(conn, study_uid)
    if row is not None:
        store.wake(conn, stable_key(study_uid, int(row["round"])))
    return True


def order_arrived(conn: psycopg.Connection[Any], study_uid: str | None, accession: str | None, site: str | None) -> int:
    """An order came (HL7): the pushed studies waiting for it with this Study UID, or this
    accession number from this site, look again now, not at their next recheck. How many were woken."""
    waiting = store.unmatched_for(conn, study_uid, accession, site) if (study_uid or accession) else []
    for uid, round_ in waiting:
        store.wake(conn, stable_key(uid, round_))
    return len(waiting)


def unmatched(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()} for r in store.unmatched(conn)]


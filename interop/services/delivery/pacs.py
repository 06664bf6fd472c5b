"""The PACS channel: a report version as a DICOM Comprehensive 3D SR (`interop.dicom.sr`), stored
in the site's PACS in the same study as the images, for a site with `results_to_pacs: true`:
by C-STORE to `dicom_store` when the sites file names one, else by STOW-RS to its `dicomweb`.

Built once per delivery (`prepare`, committed on the job before the first send): the report as it
was at that version, its Observations and Device from the store; the images the model read from
the ImagingStudy's series when it lists them, else from the PACS (QIDO-RS, images only); the
patient and study attributes from one image's metadata (WADO-RS), else from the FHIR Patient and
ImagingStudy. The SR's UIDs come from the report id and version, so a retry stores the same object.

STOW-RS 200: sent; 202 (some instance failed), 408/429/5xx, no answer: retry; 409 and other 4xx:
refused for good (kept for an operator to replay). C-STORE success or warning: sent; out of
resources, no association or no answer: retry; any other status or a rejected association: refused.
"""
from __future__ import annotations

import base64
import json
from io import BytesIO
from typing import Any

import psycopg
from pydicom import dcmread

from ...dicom import cstore
from ...dicom import sr as srmod
from ...dicom.dicomweb import NON_IMAGE_SOP_CLASS_PREFIXES, DicomWebClient, InstanceRef
from ...dicom.errors import DicomError, PacsUnavailable, StudyNotFound
from ...domain.vocabulary import source_images
from ...sites import Site
from ...store import queue, resources
from ...tls import ClientTls
from ..context import Context
from . import Message, Outcome, Unbuildable, report_version, site_of_lane

DICOM_UID = "urn:dicom:uid"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def takes_results(site: Site | None) -> bool:
    """A site whose PACS takes the SR results."""
    return site is not None and site.results_to_pacs and (site.dicom_store is not None or site.dicomweb is not None)


def _uid(resource: dict[str, Any]) -> str | None:
    for ident in resource.get("identifier") or []:
        if ident.get("system") == DICOM_UID and str(ident.get("value", "")).startswith("urn:oid:"):
            return str(ident["value"])[len("urn:oid:"):]
    return None


def _accession(*resources_: dict[str, Any] | None) -> str | None:
    for resource in resources_:
        for ident in (resource or {}).get("identifier") or []:
            if any(c.get("code") == "ACSN" for c in (ident.get("type") or {}).get("coding") or []):
                return str(ident.get("value"))
    return None


def _is_image(sop_class: str | None) -> bool:
    return bool(sop_class) and not str(sop_class).startswith(NON_IMAGE_SOP_CLASS_PREFIXES)


def _study_sources(study: dict[str, Any], study_uid: str) -> list[srmod.Source]:
    """The images an ImagingStudy lists (series/instance), when it lists them."""
    out = []
    for series in study.get("series") or []:
        for inst in series.get("instance") or []:
            sop_class = str((inst.get("sopClass") or {}).get("code", "")).removeprefix("urn:oid:")
            if series.get("uid") and inst.get("uid") and _is_image(sop_class):
                out.append(srmod.Source(study_uid, str(series["uid"]), sop_class, str(inst["uid"])))
    return out


def _read_by_the_model(report: dict[str, Any], sources: list[srmod.Source]) -> list[srmod.Source]:
    """The images the model was given, when the report records them (older reports: every image)."""
    read = source_images(report)
    return [s for s in sources if s.sop_instance_uid in read] or sources if read else sources


class PacsChannel:
    """`deliver-sr` jobs: a report version as an SR to `SITE:pacs`."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.tls = ClientTls.from_settings(ctx.settings)

    def _site(self, job: queue.Job) -> Site | None:
        site = site_of_lane(self.ctx, job.lane)
        return site if takes_results(site) else None

    def _client(self, site: Site) -> DicomWebClient:
        return DicomWebClient(site.dicomweb or "", self.ctx.settings.dicomweb_timeout, tls=self.tls)

    def prepare(self, conn: psycopg.Connection[Any], job: queue.Job) -> Message | Outcome:
        site = self._site(job)
        if site is None:
            return Outcome.dead(f"no PACS taking results for {job.lane} in the sites file")
        if job.message and job.message_id:
            return Message(job.message_id, job.message)
        try:
            data, sop_uid = self.build(conn, site, job.payload["resource_id"], int(job.payload["version"]))
        except StudyNotFound:
            return Outcome.retry("the study's images are not in the PACS (yet)")
        except PacsUnavailable as exc:
            return Outcome.retry(f"cannot read the source images: {exc.reason}")
        except (Unbuildable, srmod.SrError, DicomError) as exc:
            return Outcome.dead(f"cannot build the SR: {exc}"[:500])
        return Message(sop_uid, base64.b64encode(data).decode("ascii"))

    def build(self, conn: psycopg.Connection[Any], site: Site, report_id: str, version: int) -> tuple[bytes, str]:
        """The SR of a stored report version, as a Part 10 file, and its SOP Instance UID."""
        report, observations = report_version(conn, report_id, version)
        device_ref = next((e["valueReference"]["reference"] for e in report.get("extension") or []
                           if str((e.get("valueReference") or {}).get("reference", "")).startswith("Device/")), None)
        device = resources.find(conn, device_ref) if device_ref else None
        if device is None:
            raise Unbuildable(f"DiagnosticReport/{report_id} names no Device that is stored")
        study = next((s for s in (resources.find(conn, r.get("reference")) for r in report.get("imagingStudy") or [])
                      if s), None)
        study_uid = _uid(study) if study else None
        if study is None or not study_uid:
            raise Unbuildable(f"DiagnosticReport/{report_id} has no ImagingStudy with a Study Instance UID")
        sources = _read_by_the_model(report, _study_sources(study, study_uid))
        header = None
        if site.dicomweb:
            with self._client(site) as client:
                refs = [r for r in client.search_instances(study_uid) if _is_image(r.sop_class_uid)] if not sources \
                    else []
                if refs:
                    sources = [srmod.Source(r.study_uid, r.series_uid, r.sop_class_uid or "", r.instance_uid)
                               for r in refs]
                sources = _read_by_the_model(report, sources)
                if sources:
                    first = sources[0]
                    header = srmod.header_from(client.instance_metadata(
                        InstanceRef(first.study_uid, first.series_uid, first.sop_instance_uid)))
        if header is None:
            patient = resources.find(conn, (report.get("subject") or {}).get("reference"))
            order = next((resources.find(conn, r.get("reference")) for r in study.get("basedOn") or []), None)
            header = srmod.header_from_fhir(patient, study, study_uid, _accession(study, order))
        sr = srmod.build_sr(report=report, observations=observations, device=device, header=header, sources=sources,
                            version=version, institution=site.name)
        return srmod.to_bytes(sr), str(sr.SOPInstanceUID)

    def send(self, job: queue.Job, message: Message) -> Outcome:
        site = self._site(job)
        if site is None:
            return Outcome.dead(f"no PACS taking results for {job.lane} in the sites file")
        data = base64.b64decode(message.text)
        if site.dicom_store is not None:
            dest = site.dicom_store
            try:
                status = cstore.store(data, aet=dest.aet, host=dest.host, port=dest.port,
                                      calling_aet=self.ctx.settings.dicom_aet,
                                      timeout_s=float(self.ctx.settings.dicomweb_timeout))
            except PacsUnavailable as exc:
                return Outcome.retry(exc.reason)
            except DicomError as exc:
                return Outcome.refused(exc.reason, None)
            return Outcome.sent(json.dumps({"c-store-status": status, "sop_instance_uid": message.id}))
        study_uid = str(dcmread(BytesIO(data), stop_before_pixels=True).StudyInstanceUID)
        try:
            with self._client(site) as client:
                status, answer = client.store(study_uid, [data])
        except PacsUnavailable as exc:
            return Outcome.retry(exc.reason)
        except DicomError as exc:
            return Outcome.refused(exc.reason, None)
        if status == 200:
            return Outcome.sent(answer)
        if status == 202 or status in (408, 429) or status >= 500:
            return Outcome.retry(f"STOW-RS HTTP {status}", answer)
        return Outcome.refused(f"STOW-RS HTTP {status}", answer)

    def ended(self, conn: psycopg.Connection[Any], job: queue.Job, outcome: Outcome, status: str) -> None:
        pass

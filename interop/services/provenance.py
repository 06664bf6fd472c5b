"""FHIR Provenance for AI results and their sign-offs, written in the transaction that stored the
report version (`reports.stored`):

* an AI result (`ai_result`): agent the model's Device (`author`), entities
  the ImagingStudy and each image instance it lists (by its DICOM SOP Instance UID), `source`;
* a review (`reviewed`: sign, edit, reject, amend, correct): agent the radiologist (`verifier`),
  entity the version reviewed (`revision`).

The targets are the report version (`DiagnosticReport/<id>/_history/<v>`) and its Observations,
so `Provenance?target=DiagnosticReport/<id>` finds every record of a report.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from ..domain.vocabulary import source_images, version_of
from ..store import resources
from .context import Context

PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
ACTIVITY = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
DICOM_UID = "urn:dicom:uid"


def _agent(code: str, display: str, who: dict[str, Any]) -> dict[str, Any]:
    return {"type": {"coding": [{"system": PARTICIPANT, "code": code, "display": display}]}, "who": who}


def _study_entities(conn: psycopg.Connection[Any], report: dict[str, Any]) -> list[dict[str, Any]]:
    """The ImagingStudy, and the images the model read (all the study lists when not recorded)."""
    read = source_images(report)
    out = []
    for ref in report.get("imagingStudy") or []:
        out.append({"role": "source", "what": {"reference": ref.get("reference")}})
        study = resources.find(conn, ref.get("reference"))
        for series in (study or {}).get("series") or []:
            for inst in series.get("instance") or []:
                if inst.get("uid") and (not read or inst["uid"] in read):
                    out.append({"role": "source", "what": {
                        "identifier": {"system": DICOM_UID, "value": f"urn:oid:{inst['uid']}"},
                        "display": f"SOP Instance of series {series.get('uid', '')}"}})
    return out


def record(conn: psycopg.Connection[Any], ctx: Context, report: dict[str, Any], *, event: str) -> dict[str, Any] | None:
    """Store the Provenance of a stored report version; None for events that are neither."""
    rid, version = report["id"], version_of(report)
    targets = [{"reference": f"DiagnosticReport/{rid}/_history/{version}"}, *[
        {"reference": r["reference"]} for r in report.get("result") or [] if r.get("reference")]]
    body: dict[str, Any] = {"resourceType": "Provenance", "target": targets,
                            "recorded": datetime.now(UTC).isoformat()}
    if event == "ai_result":
        device = next((e["valueReference"] for e in report.get("extension") or []
                       if str((e.get("valueReference") or {}).get("reference", "")).startswith("Device/")), None)
        if device is None:
            return None
        body.update(activity={"coding": [{"system": ACTIVITY, "code": "CREATE", "display": "create"}]},
                    agent=[_agent("author", "Author", device)], entity=_study_entities(conn, report))
    elif event == "reviewed":
        reviewers = report.get("resultsInterpreter") or []
        if not reviewers:
            return None
        body.update(activity={"coding": [{"system": ACTIVITY, "code": "UPDATE", "display": "revise"}]},
                    agent=[_agent("verifier", "Verifier", reviewers[0])],
                    entity=[{"role": "revision",
                             "what": {"reference": f"DiagnosticReport/{rid}/_history/{max(version - 1, 1)}"}}])
    else:
        return None
    stored: dict[str, Any] = resources.create(conn, body, ctx.params["Provenance"])
    return stored

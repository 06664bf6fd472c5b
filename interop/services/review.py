"""What a radiologist does with an AI report: sign, edit and sign, reject, amend, correct.

One transaction per review: the report's new version, its observations' new versions, the
radiologist's verdict on every AI finding (agree / disagree / added / rejected, kept for the
analytics of AI-versus-radiologist agreement), and everything a new version sets off
(`reports.stored`: a critical alert if the radiologist made it critical, the re-delivery to the
site and, for a critical report, to its higher-level hospital). History is the store's: every
version stays readable at `_history`.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from ..domain.vocabulary import (
    DISCLAIMER,
    IMAGING_CATEGORY,
    INTERPRETATION,
    OBSERVATION_SYSTEM,
    REJECTED,
    REVIEWED,
    SNOMED,
    codes,
    is_critical_finding,
    reference_id,
    without_meta,
)
from ..store import resources, reviews
from . import reports
from .context import Context
from .errors import ReviewError

ALLOWED = {
    "sign": ("preliminary",),
    "edit": ("preliminary",),
    "reject": ("preliminary",),
    "amend": ("final", "amended", "corrected"),
    "correct": ("final", "amended", "corrected"),
}
NEW_STATUS = {"sign": "final", "edit": "final", "reject": "cancelled", "amend": "amended", "correct": "corrected"}
CRITICAL_CONCLUSION = [{"coding": [{"system": INTERPRETATION, "code": "AA", "display": "Critical abnormal"}],
                        "text": "Critical finding"}]


def _positive(obs: dict[str, Any]) -> bool:
    return "POS" in codes(obs.get("interpretation") or [])


def _interpretation(positive: bool, critical: bool) -> list[dict[str, Any]]:
    code = ("POS", "Positive") if positive else ("NEG", "Negative")
    out = [{"coding": [{"system": INTERPRETATION, "code": code[0], "display": code[1]}]}]
    if positive and critical:
        out.append({"coding": [{"system": INTERPRETATION, "code": "AA", "display": "Critical abnormal"}]})
    return out


def _critical_label(obs: dict[str, Any], critical: frozenset[tuple[str | None, str]]) -> bool:
    concept = obs.get("code") or {}
    found = {(c.get("system"), c.get("code")) for c in concept.get("coding") or []}
    return bool(found & critical) or (None, concept.get("text", "")) in critical


def _reviewer_ref(reviewer: str) -> dict[str, str]:
    if reviewer.startswith(("Practitioner/", "PractitionerRole/")):
        return {"reference": reviewer}
    return {"display": reviewer}


def _conclusion(report: dict[str, Any], action: str, conclusion: str | None, reviewer: str) -> str:
    if action == "reject":
        return f"{REJECTED['en']} {REJECTED['vi']}" + (f"\n{conclusion}" if conclusion else "")
    text = conclusion if conclusion is not None else report.get("conclusion", "")
    text = text.replace(f"{DISCLAIMER['en']} {DISCLAIMER['vi']}", f"{REVIEWED['en']} {REVIEWED['vi']}")
    if REVIEWED["en"] not in text:
        text = f"{REVIEWED['en']} {REVIEWED['vi']}\n{text}"
    return f"{text}\nReviewed by {reviewer} ({action})."


def _ai_call(conn: psycopg.Connection[Any], obs: dict[str, Any]) -> bool | None:
    """What the AI said of this finding: its first version (None for a radiologist's own)."""
    first = resources.vread(conn, "Observation", obs["id"], 1)
    return _positive(first) if "valueQuantity" in first else None


def apply_review(
    conn: psycopg.Connection[Any],
    ctx: Context,
    report_id: str,
    *,
    action: str,
    reviewer: str,
    conclusion: str | None = None,
    findings: dict[str, bool] | None = None,
    added: list[dict[str, Any]] | None = None,
    if_version: int | None = None,
) -> dict[str, Any]:
    """Apply one review and what it sets off; returns the new DiagnosticReport. A finding the
    radiologist calls present and `mappings/` marks critical is flagged as the AI's would be."""
    if action not in ALLOWED:
        raise ReviewError(f"unknown review action {str(action)[:20]!r}; one of {', '.join(ALLOWED)}", 400)
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise ReviewError("a review needs the reviewing radiologist", 422)
    findings = findings or {}
    params = ctx.params
    with conn.transaction():
        try:
            report = resources.read(conn, "DiagnosticReport", report_id)
        except resources.StoreError:
            raise ReviewError(f"DiagnosticReport/{report_id} is not known", 404) from None
        version = int(report["meta"]["versionId"])
        if if_version is not None and if_version != version:
            raise ReviewError(f"DiagnosticReport/{report_id} is at version {version}, not {if_version}", 412)
        if report["status"] not in ALLOWED[action]:
            raise ReviewError(f"cannot {action} a report that is {report['status']}", 409)
        if action == "sign" and findings:
            raise ReviewError("`sign` takes the AI findings as they are: use `edit` to change them", 422)
        status = NEW_STATUS[action]
        now = datetime.now(UTC).isoformat()
        refs = [oid for oid in (reference_id(r, "Observation") for r in report.get("result") or []) if oid]
        if set(findings) - set(refs):
            raise ReviewError(f"{len(set(findings) - set(refs))} finding(s) are not results of this report", 422)
        verdicts: list[reviews.Verdict] = []
        still_critical = False
        for oid in refs:
            obs = without_meta(resources.read(conn, "Observation", oid))
            ai = _ai_call(conn, obs)
            current = _positive(obs)
            said = findings.get(oid, current)
            if action == "reject":
                verdict, said_value = "rejected", None
            elif ai is None:
                verdict, said_value = "added", said
            else:
                verdict, said_value = ("agree" if said == ai else "disagree"), said
            obs["status"] = status
            if action != "reject" and said != current:
                critical = is_critical_finding(obs) or _critical_label(obs, ctx.critical_codes)
                obs["interpretation"] = _interpretation(said, critical)
            still_critical = still_critical or is_critical_finding(obs)
            note = f"Radiologist ({reviewer}): {'present' if said else 'absent'}" if action != "reject" else \
                f"AI result rejected by {reviewer}"
            obs["note"] = [*obs.get("note", []), {"text": note, "time": now}]
            resources.update(conn, obs, params["Observation"])
            code = ((obs.get("code") or {}).get("coding") or [{}])[0]
            verdicts.append(reviews.Verdict(report_id, version + 1, oid, code.get("system"), code.get("code"),
                                            (obs.get("code") or {}).get("text", ""), ai, said_value, verdict, action,
                                            reviewer))
        new_results = list(report.get("result") or [])
        for extra in added or []:
            if not extra.get("text") and not extra.get("code"):
                raise ReviewError("an added finding needs a code or a text", 422)
            concept: dict[str, Any] = {"text": str(extra.get("text") or extra["code"])}
            if extra.get("code"):
                concept["coding"] = [{"system": extra.get("system") or SNOMED, "code": str(extra["code"]),
                                      "display": str(extra.get("text") or extra["code"])}]
            critical = action != "reject" and _critical_label({"code": concept}, ctx.critical_codes)
            body: dict[str, Any] = {
                "resourceType": "Observation", "status": status,
                "identifier": [{"system": OBSERVATION_SYSTEM, "value": f"{report_id}/added/{len(new_results)}"}],
                "category": [IMAGING_CATEGORY], "code": concept, "issued": now, "valueBoolean": True,
                "interpretation": _interpretation(True, critical), "performer": [_reviewer_ref(reviewer)],
                "method": {"text": "Radiologist review"}, "derivedFrom": report.get("imagingStudy", []),
            }
            if report.get("subject"):
                body["subject"] = report["subject"]
            obs = resources.create(conn, body, params["Observation"])
            still_critical = still_critical or critical
            new_results.append({"reference": f"Observation/{obs['id']}", "display": concept["text"]})
            verdicts.append(reviews.Verdict(report_id, version + 1, obs["id"], (concept.get("coding") or [{}])[0].get("system"),
                                            extra.get("code"), concept["text"], None, True, "added", action, reviewer))
        updated = without_meta(report)
        updated.update(status=status, result=new_results, resultsInterpreter=[_reviewer_ref(reviewer)],
                       conclusion=_conclusion(report, action, conclusion, reviewer), issued=now)
        if still_critical and action != "reject":  # replaces whatever the AI concluded ("not analysable" too)
            updated["conclusionCode"] = CRITICAL_CONCLUSION
        else:
            updated.pop("conclusionCode", None)
        stored, _ = resources.update(conn, updated, params["DiagnosticReport"], if_match=version)
        reviews.add_verdicts(conn, verdicts)
        reports.stored(conn, ctx, stored, event="reviewed")
    return stored

"""What a radiologist does with an AI report: sign, edit and sign, reject, amend, correct.

One transaction per review: the report's new version, its observations' new versions, the
radiologist's verdict on every AI finding (agree / disagree / added / rejected, kept for the
analytics of AI-versus-radiologist agreement) and the re-delivery of the report to its site.
History is the store's: every version stays readable at `_history`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import psycopg

from ..pipeline.report import DISCLAIMER, INTERPRETATION, OBSERVATION_SYSTEM
from ..store import resources
from ..store.search_params import SearchParam
from .errors import ReviewError

ALLOWED = {
    "sign": ("preliminary",),
    "edit": ("preliminary",),
    "reject": ("preliminary",),
    "amend": ("final", "amended", "corrected"),
    "correct": ("final", "amended", "corrected"),
}
NEW_STATUS = {"sign": "final", "edit": "final", "reject": "cancelled", "amend": "amended", "correct": "corrected"}
REVIEWED = {
    "en": "AI-assisted result, reviewed by a radiologist.",
    "vi": "Kết quả có hỗ trợ AI, đã được bác sĩ chẩn đoán hình ảnh xem xét.",
}
REJECTED = {
    "en": "The AI result was rejected by the reviewing radiologist.",
    "vi": "Kết quả AI đã bị bác sĩ chẩn đoán hình ảnh bác bỏ.",
}


def _positive(obs: dict[str, Any]) -> bool:
    return any(c.get("code") == "POS" for i in obs.get("interpretation", []) for c in i.get("coding", []))


def _interpretation(positive: bool, critical: bool) -> list[dict[str, Any]]:
    code = ("POS", "Positive") if positive else ("NEG", "Negative")
    out = [{"coding": [{"system": INTERPRETATION, "code": code[0], "display": code[1]}]}]
    if positive and critical:
        out.append({"coding": [{"system": INTERPRETATION, "code": "AA", "display": "Critical abnormal"}]})
    return out


def _critical(obs: dict[str, Any]) -> bool:
    return any(c.get("code") == "AA" for i in obs.get("interpretation", []) for c in i.get("coding", []))


def critical_codes(models: Any) -> frozenset[tuple[str | None, str]]:
    """(system, code) — or (None, display) for labels without a code — of every critical label."""
    out: set[tuple[str | None, str]] = set()
    for model in models.values():
        for label in model.labels:
            if label.critical:
                out.add((label.system, label.code) if label.code else (None, label.display.en))
    return frozenset(out)


def _critical_label(obs: dict[str, Any], critical: frozenset[tuple[str | None, str]]) -> bool:
    codes = {(c.get("system"), c.get("code")) for c in obs.get("code", {}).get("coding", [])}
    return bool(codes & critical) or (None, obs.get("code", {}).get("text", "")) in critical


def _reviewer_ref(reviewer: str) -> dict[str, str]:
    if reviewer.startswith("Practitioner/") or reviewer.startswith("PractitionerRole/"):
        return {"reference": reviewer}
    return {"display": reviewer}


def _conclusion(report: dict[str, Any], action: str, conclusion: str | None, reviewer: str) -> str:
    if action == "reject":
        return f"{REJECTED['en']} {REJECTED['vi']}" + (f"\n{conclusion}" if conclusion else "")
    text = conclusion if conclusion is not None else report.get("conclusion", "")
    pending = f"{DISCLAIMER['en']} {DISCLAIMER['vi']}"
    text = text.replace(pending, f"{REVIEWED['en']} {REVIEWED['vi']}")
    if REVIEWED["en"] not in text:
        text = f"{REVIEWED['en']} {REVIEWED['vi']}\n{text}"
    return f"{text}\nReviewed by {reviewer} ({action})."


def _ai_call(conn: psycopg.Connection[Any], obs: dict[str, Any]) -> bool | None:
    """What the AI said of this finding: its first version (None for a radiologist's own)."""
    first = resources.vread(conn, "Observation", obs["id"], 1)
    if "valueQuantity" not in first:
        return None
    return _positive(first)


def apply_review(
    conn: psycopg.Connection[Any],
    params: dict[str, dict[str, SearchParam]],
    report_id: str,
    *,
    action: str,
    reviewer: str,
    conclusion: str | None = None,
    findings: dict[str, bool] | None = None,
    added: list[dict[str, Any]] | None = None,
    if_version: int | None = None,
    critical: frozenset[tuple[str | None, str]] = frozenset(),
    on_change: Any = None,
) -> dict[str, Any]:
    """Apply one review; returns the new DiagnosticReport.

    `critical`: (code system, code) of the findings `mappings/` marks critical (see
    `critical_codes`), so a finding the radiologist calls present is flagged as the AI's would be.
    `on_change(conn, report)` queues the re-delivery of the new version, in the same transaction.
    """
    if action not in ALLOWED:
        raise ReviewError(f"unknown review action {action!r}; one of {', '.join(ALLOWED)}", 400)
    if not reviewer.strip():
        raise ReviewError("a review needs the reviewing radiologist", 422)
    findings = findings or {}
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
        now = datetime.now(timezone.utc).isoformat()
        refs = [r["reference"].split("/", 1)[1] for r in report.get("result", [])]
        unknown = set(findings) - set(refs)
        if unknown:
            raise ReviewError(f"{len(unknown)} finding(s) are not results of this report", 422)
        verdicts: list[tuple[Any, ...]] = []
        obs_status = {"final": "final", "amended": "amended", "corrected": "corrected", "cancelled": "cancelled"}[status]
        for oid in refs:
            obs = {k: v for k, v in resources.read(conn, "Observation", oid).items() if k != "meta"}
            ai = _ai_call(conn, obs)
            current = _positive(obs)
            said = findings.get(oid, current)
            if action == "reject":
                verdict, said_value = "rejected", None
            elif ai is None:
                verdict, said_value = "added", said
            else:
                verdict, said_value = ("agree" if said == ai else "disagree"), said
            obs["status"] = obs_status
            if action != "reject" and said != current:
                obs["interpretation"] = _interpretation(said, _critical(obs) or _critical_label(obs, critical))
            note = f"Radiologist ({reviewer}): {'present' if said else 'absent'}" if action != "reject" else \
                f"AI result rejected by {reviewer}"
            obs["note"] = [*obs.get("note", []), {"text": note, "time": now}]
            resources.update(conn, obs, params["Observation"])
            code = (obs.get("code", {}).get("coding") or [{}])[0]
            verdicts.append((report_id, version + 1, oid, code.get("system"), code.get("code"),
                             obs["code"].get("text", ""), ai, said_value, verdict, action, reviewer))
        new_results = list(report.get("result", []))
        for extra in added or []:
            if not extra.get("text") and not extra.get("code"):
                raise ReviewError("an added finding needs a code or a text", 422)
            concept: dict[str, Any] = {"text": extra.get("text") or extra["code"]}
            if extra.get("code"):
                concept["coding"] = [{"system": extra.get("system", "http://snomed.info/sct"), "code": extra["code"],
                                      "display": extra.get("text", extra["code"])}]
            body: dict[str, Any] = {
                "resourceType": "Observation", "status": obs_status,
                "identifier": [{"system": OBSERVATION_SYSTEM, "value": f"{report_id}/added/{len(new_results)}"}],
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "imaging"}]}],
                "code": concept, "issued": now, "valueBoolean": True,
                "interpretation": _interpretation(True, False), "performer": [_reviewer_ref(reviewer)],
                "method": {"text": "Radiologist review"}, "derivedFrom": report.get("imagingStudy", []),
            }
            if report.get("subject"):
                body["subject"] = report["subject"]
            obs = resources.create(conn, body, params["Observation"])
            new_results.append({"reference": f"Observation/{obs['id']}", "display": concept["text"]})
            verdicts.append((report_id, version + 1, obs["id"], concept.get("coding", [{}])[0].get("system"),
                             extra.get("code"), concept["text"], None, True, "added", action, reviewer))
        updated = {k: v for k, v in report.items() if k != "meta"}
        updated.update(status=status, result=new_results, resultsInterpreter=[_reviewer_ref(reviewer)],
                       conclusion=_conclusion(report, action, conclusion, reviewer), issued=now)
        still_critical = any(_critical(resources.read(conn, "Observation", r["reference"].split("/", 1)[1]))
                             for r in new_results) and action != "reject"
        if not still_critical:
            updated.pop("conclusionCode", None)
        stored, _ = resources.update(conn, updated, params["DiagnosticReport"], if_match=version)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO review_verdict (report_id, report_version, observation_id, code_system, code, finding,"
                " ai_positive, radiologist_positive, verdict, action, reviewer) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", verdicts)
        if on_change is not None:
            on_change(conn, stored)
    return stored

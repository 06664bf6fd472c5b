"""Provincial analytics on a real PostgreSQL: facts from stored reports, every view on known
data, de-identification, exports, the forecast, and the dashboard in headless Chromium."""
from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from werkzeug.serving import make_server

from inference_client.models import load_models
from interop.app import create_app
from interop.config import Settings
from interop.domain import report
from interop.services import critical
from interop.services import review as actions
from interop.services.analytics import export, facts, forecast, pseudonym
from interop.services.context import Context
from interop.store import analytics as queries
from interop.store import resources
from interop.store.db import connect
from interop.store.search_params import load
from scripts.synthetic import analytics as seed
from tests.fixtures.auth import PASSWORD, add_person
from tests.helpers import ROOT as REPO_ROOT
from tests.helpers import context

MODEL = load_models(REPO_ROOT / "mappings")["chest-xray"]
PARAMS = load(REPO_ROOT / "mappings")
INDEX = {label.key: i for i, label in enumerate(MODEL.labels)}
CODE = {label.key: label.code for label in MODEL.labels}
SNOMED = "http://snomed.info/sct"
SECRET = "test-pseudonym-secret-0123456789"
# What must never reach the analytics schema.
NAME, MRN, NATIONAL_ID, BIRTH, LINE = "Thạch-Zyxwv", "MRN-7788991", "079912345678", "1961-03-14", "123 Đường Qwerty"
FREE_TEXT = "Ghi chú riêng XYZZY của bác sĩ"


@pytest.fixture
def ctx() -> Context:
    """The services' context with a known pseudonym secret."""
    return context(INTEROP_PSEUDONYM_KEY=SECRET)


def _patient(conn: Any, n: int, *, address: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Patient", "gender": "male", "birthDate": BIRTH,
        "identifier": [
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
             "system": "urn:oid:1.2.840.99.1", "value": f"{MRN}{n}"},
            {"system": "urn:vn:cccd", "value": f"{NATIONAL_ID}{n}"}],
        "name": [{"family": NAME, "given": ["Văn", "An"]}],
    }
    if address:
        body["address"] = [{"use": "home", "line": [LINE], "city": "Phường Tân Phong", "district": "Bien Hoa",
                            "state": "Dong Nai"}]
    return resources.create(conn, body, PARAMS["Patient"])


def ai_report(db_url: str, ctx: Context, n: int, *, site: str, positives: dict[str, float], address: bool = True,
              ordered_minutes_ago: int = 60, refused: tuple[str, ...] = ()) -> str:
    """A stored AI report as the worker writes it, with its patient, order and study; with `refused`
    (the quality gate's reasons), the "not analysable" report of a study whose images it refused."""
    probs = [0.02] * len(MODEL.labels)
    for key, p in positives.items():
        probs[INDEX[key]] = p
    tag = {"system": "urn:interop-hub:site", "code": site}
    with connect(db_url, autocommit=True) as conn, conn.transaction():
        patient = _patient(conn, n, address=address)
        subject = {"reference": f"Patient/{patient['id']}"}
        authored = (datetime.now(UTC) - timedelta(minutes=ordered_minutes_ago)).isoformat()
        order = resources.create(conn, {
            "resourceType": "ServiceRequest", "status": "active", "intent": "order", "subject": subject,
            "authoredOn": authored, "meta": {"tag": [tag]}, "note": [{"text": FREE_TEXT}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "36554-4"}], "text": "XR chest"}},
            PARAMS["ServiceRequest"])
        study = resources.create(conn, {
            "resourceType": "ImagingStudy", "status": "available", "subject": subject, "meta": {"tag": [tag]},
            "basedOn": [{"reference": f"ServiceRequest/{order['id']}"}], "started": authored,
            "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CR"}],
            "series": [{"uid": f"1.2.3.{n}", "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CR"},
                        "bodySite": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CHEST"},
                        "instance": [{"uid": f"1.2.3.{n}.1", "sopClass": {"system": "urn:ietf:rfc:3986",
                                                                          "code": "urn:oid:1.2.840.10008.5.1.4.1.1.1"}}]}]},
            PARAMS["ImagingStudy"])
        if refused:
            built = report.not_analysable(study=study, study_uid=f"1.2.3.{n}", model=MODEL, version="0.1.0-reference",
                                          reasons=refused, report_id=resources.new_id(),
                                          issued=datetime.now(UTC).isoformat())
        else:
            built = report.build(study=study, study_uid=f"1.2.3.{n}", model=MODEL, version="0.1.0-reference",
                                 probabilities=probs, report_id=resources.new_id(),
                                 observation_ids=[resources.new_id() for _ in MODEL.labels],
                                 issued=datetime.now(UTC).isoformat())
        try:
            resources.read(conn, "Device", built["device"]["id"])
        except resources.NotFound:
            resources.create(conn, built["device"], PARAMS["Device"], rid=built["device"]["id"])
        for obs in built["observations"]:
            resources.create(conn, obs, PARAMS["Observation"], rid=obs["id"])
        built["report"]["meta"] = {"tag": [tag]}
        stored = resources.create(conn, built["report"], PARAMS["DiagnosticReport"], rid=built["report"]["id"])
        critical.raise_alert(conn, ctx, stored, ctx.sites.get(site))
        facts.record(conn, ctx, stored["id"], event="ai_result")  # what reports.stored does
    return str(stored["id"])


def review(db_url: str, ctx: Context, rid: str, action: str, **kwargs: Any) -> None:
    with connect(db_url, autocommit=True) as conn:
        actions.apply_review(conn, ctx, rid, action=action, reviewer="BS. Trần Văn Bình", **kwargs)


def observation(db_url: str, rid: str, key: str) -> str:
    with connect(db_url) as conn:
        rep = resources.read(conn, "DiagnosticReport", rid)
        for ref in rep["result"]:
            obs = resources.read(conn, "Observation", ref["reference"].split("/")[1])
            if any(c.get("code") == CODE[key] for c in obs["code"].get("coding", [])):
                return str(obs["id"])
    raise AssertionError(key)


@pytest.fixture
def known(db_url: str, ctx: Context) -> dict[str, str]:
    """Three studies: A (Bien Hoa, atelectasis, signed and delivered), B (Nhon Trach, critical
    pneumothorax, atelectasis overruled, pneumonia added, acknowledged, transferred), C (Bien Hoa,
    nothing found, waiting for review)."""
    a = ai_report(db_url, ctx, 1, site="BVDKDN", positives={"Atelectasis": 0.9})
    b = ai_report(db_url, ctx, 2, site="TTYT_NHONTRACH", positives={"Atelectasis": 0.9, "Pneumothorax": 0.97},
                  address=False)
    c = ai_report(db_url, ctx, 3, site="BVDKDN", positives={})
    review(db_url, ctx, a, "sign", conclusion=FREE_TEXT)
    review(db_url, ctx, b, "edit", findings={observation(db_url, b, "Atelectasis"): False},
           added=[{"system": SNOMED, "code": CODE["Pneumonia"], "text": f"Viêm phổi, {NAME} {FREE_TEXT}"}])
    with connect(db_url, autocommit=True) as conn:
        sent(conn, "BVDKDN:ris", a, 2, "now() + interval '3 minutes'")
        facts.record(conn, ctx, a, event="delivered")
        # B went to its referral hospital, not yet to the ordering facility: not "delivered"
        sent(conn, "BVND115:hl7", b, 2, "now()")
        facts.record(conn, ctx, b, event="delivered")
        critical.acknowledge(conn, ctx, b, by="BS. Lê Thị Hoa")  # each records its analytics facts
        critical.decide_transfer(conn, ctx, b, decision="transfer", by="BS. Lê Thị Hoa")
        facts.refresh(conn)
    return {"a": a, "b": b, "c": c}


def sent(conn: Any, lane: str, rid: str, version: int, when: str) -> None:
    """A delivery of the report version that the destination accepted at `when` (an SQL time)."""
    conn.execute("INSERT INTO job (kind, dedupe_key, status, lane, series, seq, finished_at) VALUES"
                 f" ('deliver-hl7', %s, 'done', %s, %s, %s, {when})",
                 (f"test:{lane}:{rid}:{version}", lane, f"DiagnosticReport/{rid}", version))


def today_filters(**kw: str) -> queries.Filters:
    day = datetime.now(timezone(timedelta(hours=7))).date()
    return queries.Filters.from_args({"start": (day - timedelta(days=7)).isoformat(), "end": day.isoformat(), **kw})


def test_facts_from_stored_reports(db_url: str, known: dict[str, str]) -> None:
    with connect(db_url) as conn:
        rows = {r["report_id"]: r for r in conn.execute("SELECT * FROM analytics.study_fact").fetchall()}
        a, b, c = rows[known["a"]], rows[known["b"]], rows[known["c"]]
        assert (a["district"], a["commune"], a["province"], a["facility"]) == (
            "Bien Hoa", "Phường Tân Phong", "Dong Nai", "BVDKDN")
        assert (b["district"], b["facility"], b["facility_district"]) == ("Nhon Trach", "TTYT_NHONTRACH", "Nhon Trach")
        assert a["age_band"] == "65-74" and a["sex"] == "male"  # born 1961-03-14
        assert (a["modality"], a["body_part"], a["procedure_code"]) == ("CR", "CHEST", "36554-4")
        assert (a["model_name"], a["model_version"]) == ("chest-xray", "0.1.0-reference")
        assert a["report_status"] == "final" and c["report_status"] == "preliminary"
        expected = pseudonym.Pseudonymizer(SECRET.encode()).patient_key("urn:oid:1.2.840.99.1", f"{MRN}1")
        assert a["patient_key"] == expected and a["key_id"] == pseudonym.Pseudonymizer(SECRET.encode()).key_id
        assert a["ordered_at"] < a["images_at"] <= a["ai_result_at"] < a["reviewed_at"] < a["delivered_at"]
        assert b["critical"] and b["acknowledged_at"] and b["transfer_recommended"] and b["transfer_done"]
        assert b["delivered_at"] is None and b["ai_delivered_at"] is None
        assert not a["critical"] and c["reviewed_at"] is None
        verdicts = {(r["code"], r["verdict"], r["ai_positive"], r["radiologist_positive"])
                    for r in conn.execute("SELECT * FROM analytics.finding_fact WHERE report_id = %s AND"
                                          " (verdict IN ('disagree', 'added') OR critical)", (known["b"],))}
        assert verdicts == {(CODE["Atelectasis"], "disagree", True, False), (CODE["Pneumonia"], "added", None, True),
                            (CODE["Pneumothorax"], "agree", True, True)}
        added_label = conn.execute("SELECT label FROM analytics.finding_fact WHERE verdict = 'added'").fetchone()
        assert added_label["label"] == "Pneumonia"  # from mappings, not the radiologist's words


def test_record_is_idempotent(db_url: str, known: dict[str, str], ctx: Context) -> None:
    def snapshot() -> tuple[Any, ...]:
        with connect(db_url) as conn:
            s = conn.execute("SELECT count(*) AS n FROM analytics.study_fact").fetchone()["n"]
            f = conn.execute("SELECT count(*) AS n FROM analytics.finding_fact").fetchone()["n"]
            rows = conn.execute("SELECT * FROM analytics.study_fact ORDER BY report_id").fetchall()
        return s, f, [{k: v for k, v in r.items() if k != "updated_at"} for r in rows]
    before = snapshot()
    with connect(db_url, autocommit=True) as conn:
        for event in ("ai_result", "reviewed", "delivered", "acknowledged", "transfer", "reviewed"):
            facts.record(conn, ctx, known["a"], event=event)
            facts.record(conn, ctx, known["b"], event=event)
        assert facts.backfill(conn, ctx) == 3
        assert facts.backfill(conn, ctx) == 3
    after = snapshot()
    assert before == after and before[0] == 3 and before[1] == 3 * len(MODEL.labels) + 1
    with pytest.raises(ValueError):
        with connect(db_url) as conn:
            facts.record(conn, ctx, known["a"], event="nonsense")


def test_rekey(db_url: str, known: dict[str, str]) -> None:
    rotated = context(INTEROP_PSEUDONYM_KEY="a-new-rotated-secret-abcdefghijkl")
    with connect(db_url, autocommit=True) as conn:
        old = conn.execute("SELECT patient_key FROM analytics.study_fact WHERE report_id = %s", (known["a"],)).fetchone()
        facts.backfill(conn, rotated)  # keeps the keys already given
        kept = conn.execute("SELECT patient_key FROM analytics.study_fact WHERE report_id = %s", (known["a"],)).fetchone()
        facts.backfill(conn, rotated, rekey=True)
        new = conn.execute("SELECT patient_key, key_id FROM analytics.study_fact WHERE report_id = %s", (known["a"],)).fetchone()
    assert old == kept and new["patient_key"] != old["patient_key"]
    assert new["key_id"] == rotated.pseudonymizer.key_id


def test_views_on_known_data(db_url: str, known: dict[str, str]) -> None:
    with connect(db_url) as conn:
        week = conn.execute("SELECT study_week FROM analytics.study_fact LIMIT 1").fetchone()["study_week"]
        trend = {(r["level"], r["district"], r["code"]): (r["studies"], r["positives"], float(r["rate_per_1000"] or 0))
                 for r in conn.execute("SELECT * FROM analytics.findings_weekly WHERE week = %s", (week,))}
        assert trend[("district", "Bien Hoa", CODE["Atelectasis"])] == (2, 1, 500.0)
        assert trend[("district", "Nhon Trach", CODE["Atelectasis"])] == (1, 0, 0.0)
        assert trend[("province", None, CODE["Atelectasis"])] == (3, 1, 333.3)
        assert trend[("district", "Nhon Trach", CODE["Pneumonia"])] == (1, 1, 1000.0)  # the radiologist added it
        assert trend[("district", "Nhon Trach", CODE["Pneumothorax"])] == (1, 1, 1000.0)
        agree = {r["code"]: r for r in conn.execute("SELECT * FROM analytics.ai_agreement")}
        atel = agree[CODE["Atelectasis"]]
        assert (atel["reviewed"], atel["agree"], atel["disagree"], atel["tp"], atel["fp"]) == (2, 1, 1, 1, 1)
        assert (float(atel["agreement"]), float(atel["sensitivity"]), float(atel["ppv"])) == (0.5, 1.0, 0.5)
        pneu = agree[CODE["Pneumonia"]]
        assert (pneu["added"], pneu["fn"], pneu["tn"], float(pneu["sensitivity"]), pneu["ppv"]) == (1, 1, 2, 0.0, None)
        crit = conn.execute("SELECT * FROM analytics.critical_weekly").fetchall()
        assert [(r["facility"], r["critical_studies"], r["acknowledged"], r["transfers_recommended"], r["transfers_done"])
                for r in crit] == [("TTYT_NHONTRACH", 1, 1, 1, 1)]
        assert 0 <= crit[0]["ack_minutes_p50"] < 5
        backlog = conn.execute("SELECT * FROM analytics.review_backlog").fetchall()
        assert [(r["reviewer_group"], r["waiting"], r["over_24h"]) for r in backlog] == [("hub", 1, 0)]
        work = {(r["facility"], r["modality"]): r["studies"] for r in conn.execute("SELECT * FROM analytics.workload_daily")}
        assert work == {("BVDKDN", "CR"): 2, ("TTYT_NHONTRACH", "CR"): 1}
        tat = {r["facility"]: r for r in conn.execute("SELECT * FROM analytics.turnaround_weekly")}
        assert tat["BVDKDN"]["studies"] == 3 - 1 and 58 <= tat["BVDKDN"]["order_to_ai_p50"] <= 62
        assert tat["BVDKDN"]["reviewed_to_delivered_p50"] is not None
        # The filtered queries the dashboard runs give the same numbers.
        rows = queries.findings_weekly(conn, today_filters(finding=CODE["Atelectasis"]))
        assert {(r["level"], r["district"], r["studies"], r["positives"]) for r in rows} == {
            ("district", "Bien Hoa", 2, 1), ("district", "Nhon Trach", 1, 0), ("province", None, 3, 1)}
        only = queries.findings_weekly(conn, today_filters(finding=CODE["Atelectasis"], district="Bien Hoa"))
        assert {(r["level"], r["studies"]) for r in only} == {("district", 2), ("province", 3)}
        assert [r["studies"] for r in queries.workload(conn, today_filters(facility="TTYT_NHONTRACH"))] == [1]
        assert queries.critical(conn, today_filters(facility="BVDKDN")) == []
        assert [r["waiting"] for r in queries.backlog(conn, today_filters())] == [1]
        assert {r["code"]: r["sensitivity"] for r in queries.agreement(conn, today_filters())}[CODE["Atelectasis"]] == 1.0
        assert {r["district"]: r["studies"] for r in queries.district_table(conn, today_filters())} == {
            "Bien Hoa": 2, "Nhon Trach": 1}


def _analytics_relations(conn: Any) -> list[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'analytics' AND c.relkind IN ('r', 'v', 'm') ORDER BY 1").fetchall()
    return [r["relname"] for r in rows]


def test_no_identifiers_in_any_table_or_view(db_url: str, known: dict[str, str]) -> None:
    needles = [NAME, "Zyxwv", MRN, NATIONAL_ID, BIRTH, BIRTH.replace("-", ""), LINE, "Qwerty", "XYZZY",
               "Trần Văn Bình", "Lê Thị Hoa"]
    with connect(db_url) as conn:
        # The identifiers are in the FHIR store (so the search is meaningful) ...
        store = conn.execute("SELECT string_agg(body::text, ' ') AS t FROM resource").fetchone()["t"]
        assert all(n in store for n in needles if n not in ("19610314",))
        relations = _analytics_relations(conn)
        assert {"study_fact", "finding_fact", "findings_weekly", "turnaround_weekly", "workload_daily",
                "review_backlog", "ai_agreement", "critical_weekly", "mv_study_daily", "mv_finding_weekly"} <= set(relations)
        for rel in relations:
            text = conn.execute("SELECT coalesce(string_agg(row_to_json(t)::text, ' '), '') AS t"
                                f' FROM analytics."{rel}" t').fetchone()["t"]
            for needle in needles:
                assert needle not in text, f"{needle!r} found in analytics.{rel}"
        for fn, _c, _s in queries.VIEWS.values():
            text = str(fn(conn, today_filters()))
            assert not any(n in text for n in needles)


def test_csv_suppresses_small_cells(db_url: str, known: dict[str, str], client: Any) -> None:
    with connect(db_url) as conn:
        fn, counts, stats = queries.VIEWS["districts"]
        text = export.to_csv(fn(conn, today_filters()), counts, stats)
    lines = text.strip().splitlines()
    assert lines[0].split(",")[:3] == ["province", "district", "studies"]
    assert all("<5" in line for line in lines[1:]) and "suppressed" in text
    assert not re.search(r",[1-4],", text)  # no count of 1 to 4 anywhere
    response = client.get("/analytics/export/findings_weekly.csv", query_string=today_filters().as_args())
    assert response.status_code == 200 and response.mimetype == "text/csv"
    body = response.get_data(as_text=True)
    assert "<5" in body and not re.search(r",[1-4](,|$)", body, re.M)
    assert client.get("/analytics/export/nope.csv").status_code == 404
    assert client.get("/analytics/api/workload?start=yesterday").status_code == 400
    big = export.suppress([{"studies": 12, "positives": 3, "rate_per_1000": 250.0}], ("studies", "positives"), ("rate_per_1000",))
    assert big == [{"studies": 12, "positives": "<5", "rate_per_1000": 250.0}]


@pytest.fixture
def seeded(db_url: str) -> str:
    settings = Settings.from_env({})
    with connect(db_url, autocommit=True) as conn:
        seed.seed(conn, 6000, sites_file=settings.sites_file, mappings_dir=settings.mappings_dir, weeks=60,
                  end=date(2026, 11, 22))
        facts.refresh(conn)
    return db_url


def test_measure_report_validates(seeded: str, client: Any, fhir_validate: Any) -> None:
    with connect(seeded) as conn:
        mr = export.measure_report(conn, date(2026, 11, 9), province="Dong Nai")
    assert mr["resourceType"] == "MeasureReport" and mr["type"] == "summary"
    assert mr["period"] == {"start": "2026-11-09", "end": "2026-11-15"}
    infiltrate = next(g for g in mr["group"] if g["code"]["coding"][0]["code"] == CODE["Infiltration"])
    districts = {s["value"]["text"] for s in infiltrate["stratifier"][0]["stratum"]}
    assert districts == {"Bien Hoa", "Nhon Trach"}  # the Dong Nai districts of the sites file
    assert infiltrate["population"][0]["count"] > 0
    assert fhir_validate(mr) == []
    response = client.get("/analytics/measure-report?week=2026-11-09&province=Dong%20Nai")
    assert response.status_code == 200 and response.mimetype == "application/fhir+json"


def test_forecast_with_intervals_and_backtest(seeded: str, client: Any) -> None:
    response = client.get("/analytics/api/forecast", query_string={
        "start": "2025-10-01", "end": "2026-11-22", "finding": CODE["Infiltration"], "district": "Bien Hoa"})
    assert response.status_code == 200
    series = response.get_json()["forecasts"]
    assert [(s["district"], s["code"]) for s in series] == [("Bien Hoa", CODE["Infiltration"])]
    fc = series[0]
    assert fc["method"].startswith("ETS") and len(fc["forecast"]) == 8
    assert all(p["lower"] <= p["mean"] <= p["upper"] and p["upper"] > p["lower"] for p in fc["forecast"])
    assert fc["backtest"]["weeks"] == 8 and fc["backtest"]["mae"] >= 0 and fc["backtest"]["mape"] is not None
    assert fc["forecast"][0]["week"] == "2026-11-23"  # the week after the last complete one
    short = forecast.forecast([{"week": date(2026, 11, 2), "positives": 3}], district="X", code="c", label="l",
                              start=date(2026, 10, 1), end=date(2026, 11, 16))
    assert short.method.startswith("fallback") and len(short.forecast) == 8


# -- turnaround from the summary and kept forecasts (issue 14) -------------------------------
STEPS = {"order_to_ai": ("ordered_at", "ai_result_at"), "ai_to_reviewed": ("ai_result_at", "reviewed_at"),
         "reviewed_to_delivered": ("reviewed_at", "delivered_at"), "order_to_delivered": ("ordered_at", "delivered_at")}
SEED_END = date(2026, 11, 22)


def exact_turnaround(conn: Any, f: queries.Filters) -> dict[tuple[date, str], dict[str, Any]]:
    """The turnaround of a selection computed here from the raw facts: numpy's linear percentile
    (what percentile_cont computes), unrounded."""
    first = f.start - timedelta(days=f.start.weekday())
    groups: dict[tuple[date, str], list[dict[str, Any]]] = {}
    for r in conn.execute("SELECT * FROM analytics.study_fact WHERE report_status <> 'cancelled'"):
        if first <= r["study_week"] <= f.end and all(
                getattr(f, k) is None or r[k] == getattr(f, k) for k in ("district", "facility", "modality")):
            groups.setdefault((r["study_week"], r["facility"]), []).append(r)
    out = {}
    for key, rows in groups.items():
        row: dict[str, Any] = {"studies": len(rows)}
        for name, (a, b) in STEPS.items():
            minutes = [(r[b] - r[a]).total_seconds() / 60 for r in rows if r[a] is not None and r[b] is not None]
            for q in (50, 90):
                row[f"{name}_p{q}"] = float(np.percentile(minutes, q)) if minutes else None
        out[key] = row
    return out


SELECTIONS = [{}, {"district": "Bien Hoa"}, {"facility": "BVDKDN"}, {"modality": "DX"},
              {"district": "Nhon Trach", "modality": "CR"}, {"district": "Bien Hoa", "facility": "BVDKDN", "modality": "CR"}]


def assert_turnaround_exact(conn: Any, args: dict[str, str]) -> int:
    """The dashboard's turnaround equals the exact computation (to its 0.1-minute rounding); how many rows."""
    f = queries.Filters.from_args({"start": "2026-05-01", "end": SEED_END.isoformat(), **args})
    got = {(r["week"], r["facility"]): r for r in queries.turnaround(conn, f)}
    want = exact_turnaround(conn, f)
    assert got.keys() == want.keys(), args
    for key, row in want.items():
        assert got[key]["studies"] == row["studies"], (args, key)
        for name in queries.VIEWS["turnaround"][2]:
            if row[name] is None:
                assert got[key][name] is None
            else:  # the summary holds percentile_cont itself: the only difference is the rounding to 0.1
                assert abs(got[key][name] - row[name]) <= 0.05 + 1e-9, (args, key, name, got[key][name], row[name])
    return len(want)


def assert_view_exact(conn: Any) -> None:
    """The unfiltered SQL view analytics.turnaround_weekly (unrounded) equals the exact computation."""
    view = {(r["week"], r["facility"]): r for r in conn.execute("SELECT * FROM analytics.turnaround_weekly")}
    want = exact_turnaround(conn, queries.Filters.from_args({"start": "2025-01-01", "end": SEED_END.isoformat()}))
    assert view.keys() == want.keys()
    for key, row in want.items():
        assert all(row[c] == view[key][c] if row[c] is None else abs(view[key][c] - row[c]) < 1e-6 for c in row), key


def test_turnaround_summary_is_exact_and_refreshed_incrementally(seeded: str) -> None:
    settings = Settings.from_env({})
    with connect(seeded, autocommit=True) as conn:
        # After the refresh every week is in the summary, nothing is computed live.
        assert conn.execute("SELECT count(*) AS n FROM analytics.stale_week").fetchone()["n"] == 0
        weeks = conn.execute("SELECT count(DISTINCT study_week) AS n FROM analytics.turnaround_summary").fetchone()["n"]
        assert weeks == conn.execute("SELECT count(DISTINCT study_week) AS n FROM analytics.study_fact").fetchone()["n"]
        for args in SELECTIONS:
            assert assert_turnaround_exact(conn, args) > 0
        assert_view_exact(conn)
        before = {(r["week"], r["facility"]): r["studies"] for r in queries.turnaround(conn, queries.Filters.from_args(
            {"start": "2026-05-01", "end": SEED_END.isoformat()}))}

        # New studies in the last two weeks: those weeks, and only those, become stale ...
        seed.seed(conn, 400, sites_file=settings.sites_file, mappings_dir=settings.mappings_dir, weeks=2,
                  end=SEED_END, start_index=6000, random_seed=11)
        new_weeks = {r["study_week"] for r in conn.execute(
            "SELECT DISTINCT study_week FROM analytics.study_fact WHERE report_id >= 'synthetic-6000'"
            " AND length(report_id) = length('synthetic-6000')")}
        assert {r["study_week"] for r in conn.execute("SELECT study_week FROM analytics.stale_week")} == new_weeks
        # ... and are counted at once (computed live from the facts until the refresh), exactly
        for args in SELECTIONS:
            assert_turnaround_exact(conn, args)
        assert_view_exact(conn)
        after = {(r["week"], r["facility"]): r["studies"] for r in queries.turnaround(conn, queries.Filters.from_args(
            {"start": "2026-05-01", "end": SEED_END.isoformat()}))}
        assert sum(after.values()) == sum(before.values()) + 400
        assert all(after[k] == v for k, v in before.items() if k[0] not in new_weeks)

        # The refresh recomputes those weeks only, and the summary then agrees with the facts.
        assert set(queries.refresh_turnaround(conn)) == new_weeks
        assert conn.execute("SELECT count(*) AS n FROM analytics.stale_week").fetchone()["n"] == 0
        for args in SELECTIONS:
            assert_turnaround_exact(conn, args)

        # A review recorded late (an update) and a deleted report mark their week too.
        old = conn.execute("SELECT report_id, study_week FROM analytics.study_fact WHERE reviewed_at IS NOT NULL"
                           " AND study_week = '2026-08-03' ORDER BY report_id LIMIT 2").fetchall()
        conn.execute("UPDATE analytics.study_fact SET reviewed_at = reviewed_at + interval '9 hours',"
                     " delivered_at = delivered_at + interval '9 hours' WHERE report_id = %s", (old[0]["report_id"],))
        conn.execute("UPDATE analytics.study_fact SET report_status = 'cancelled' WHERE report_id = %s",
                     (old[1]["report_id"],))
        conn.execute("DELETE FROM analytics.study_fact WHERE study_week = '2026-07-27' AND facility = 'BVDKDN'")
        assert set(queries.refresh_turnaround(conn)) == {date(2026, 8, 3), date(2026, 7, 27)}
        for args in SELECTIONS:
            assert_turnaround_exact(conn, args)
        assert queries.refresh_turnaround(conn) == []  # nothing changed since


def exact_weekly_positives(conn: Any, code: str, start: date, end: date) -> dict[str, dict[date, int]]:
    """Positive findings per district and week, counted here from the raw facts."""
    out: dict[str, dict[date, int]] = {}
    for r in conn.execute("SELECT s.district, s.study_week, f.final_positive FROM analytics.study_fact s"
                          " JOIN analytics.finding_fact f USING (report_id)"
                          " WHERE s.report_status <> 'cancelled' AND f.code = %s", (code,)):
        if start - timedelta(days=start.weekday()) <= r["study_week"] <= end:
            weeks = out.setdefault(r["district"], {})
            weeks[r["study_week"]] = weeks.get(r["study_week"], 0) + int(bool(r["final_positive"]))
    return out


def test_kept_forecasts_match_fitting_the_raw_counts(seeded: str, client: Any) -> None:
    from interop.services.analytics import forecasting

    default = {"end": SEED_END.isoformat()}  # what the dashboard opens with: 26 weeks to the last day
    with connect(seeded, autocommit=True) as conn:
        f = queries.Filters.from_args(default)
        series = forecasting.selection(conn, f, every_finding=True)
        assert len(series) >= 3 * len({s.district for s in series})
        # The weekly rollup the forecasts read gives the counts of the raw facts.
        for s in series:
            raw = exact_weekly_positives(conn, s.code, f.start, s.end + timedelta(days=6))[s.district]
            weeks, values = forecast.weekly_series(s.points(), s.start, s.end)
            assert values == [float(raw.get(w, 0)) for w in weeks], (s.district, s.code)
        # The refresh kept every one of them, and what it kept is what fitting gives now.
        digests = [s.digest(forecasting.DEFAULT_HORIZON) for s in series]
        kept = queries.kept_forecasts(conn, digests)
        assert set(kept) == set(digests)
        for s, d in zip(series, digests):
            assert kept[d] == s.fit(forecasting.DEFAULT_HORIZON)
            assert kept[d]["method"].startswith("ETS")
        shown = forecasting.forecasts(conn, f)
        assert [(x["district"], x["code"]) for x in shown] == [
            (s.district, s.code) for s in forecasting.selection(conn, f)][:forecasting.MAX_SERIES]
    response = client.get("/analytics/api/forecast", query_string=default)
    assert response.status_code == 200 and response.get_json()["forecasts"] == shown
    # Another horizon is not kept: fitted on request, same series.
    short = client.get("/analytics/api/forecast", query_string={**default, "horizon": "4"}).get_json()["forecasts"]
    assert [len(x["forecast"]) for x in short] == [4] * len(shown)
    assert [x["history"] for x in short] == [x["history"] for x in shown]

    # New positives in the last complete week change the series: its kept forecast is not reused.
    settings = Settings.from_env({})
    with connect(seeded, autocommit=True) as conn:
        seed.seed(conn, 300, sites_file=settings.sites_file, mappings_dir=settings.mappings_dir, weeks=1,
                  end=date(2026, 11, 21), start_index=7000, random_seed=12)
        facts.refresh(conn)  # the rollup, then the kept forecasts, of the new data
        f = queries.Filters.from_args(default)
        fresh = forecasting.selection(conn, f, every_finding=True)
        now = {s.digest(8) for s in fresh}
        changed = set(digests) - now  # series with new positives (a rare finding may have none)
        assert len(changed) >= len(digests) // 2
        assert set(queries.kept_forecasts(conn, list(now))) == now
        assert not queries.kept_forecasts(conn, list(changed))  # the forecasts of the old series are gone
        for s in fresh:
            raw = exact_weekly_positives(conn, s.code, f.start, s.end + timedelta(days=6))[s.district]
            weeks, values = forecast.weekly_series(s.points(), s.start, s.end)
            assert values == [float(raw.get(w, 0)) for w in weeks]


def test_turnaround_export_still_suppresses_small_cells(db_url: str, known: dict[str, str]) -> None:
    with connect(db_url) as conn:
        fn, counts, stats = queries.VIEWS["turnaround"]
        rows = fn(conn, today_filters())
        assert conn.execute("SELECT count(*) AS n FROM analytics.stale_week").fetchone()["n"] == 0  # from the summary
        text = export.to_csv(rows, counts, stats)
    assert [r["studies"] for r in rows] == [2, 1]  # BVDKDN: A and C; TTYT_NHONTRACH: B
    assert "<5" in text and "suppressed" in text and not re.search(r",[1-4](,|$)", text, re.M)
    assert not re.search(r",\d+\.\d", text)  # no percentile over fewer than 5 studies


# -- the dashboard in headless Chromium ------------------------------------------------------
@pytest.fixture
def live_hub(seeded: str) -> Iterator[str]:
    app = create_app(Settings.from_env({"DATABASE_URL": seeded}))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        app.extensions["interop"].close()


def render(page: Any, url: str) -> str:
    """The DOM once the page's scripts drew it."""
    page.goto(url)
    page.wait_for("Number(document.body.dataset.rendered || 0) > 0 || document.body.dataset.error !== undefined",
                  timeout=60)
    return str(page.evaluate("document.documentElement.outerHTML"))


def _attr(dom: str, element_id: str, attr: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*\b{attr}="([^"]*)"', dom) or \
        re.search(rf'\b{attr}="([^"]*)"[^>]*id="{element_id}"', dom)
    assert match, f"{element_id} has no {attr}"
    return match.group(1)


def test_dashboard_in_headless_chromium(live_hub: str, seeded: str, page: Any) -> None:
    add_person(seeded, "analyst-so-y-te", "analyst")
    page.goto(f"{live_hub}/analytics/")  # not logged in: the login form
    page.fill("#username", "analyst-so-y-te")
    page.fill("#password", PASSWORD)
    page.click("#login-button", navigates=True)
    assert page.url().startswith(f"{live_hub}/analytics/")
    period = "start=2026-05-01&end=2026-11-22"
    dom = render(page, f"{live_hub}/analytics/?lang=en&{period}")
    assert "Provincial imaging analytics" in dom and 'data-error' not in dom
    assert _attr(dom, "body", "data-rendered") if False else re.search(r'<body[^>]*data-rendered="[1-9]', dom)
    points = {c: int(_attr(dom, f"chart-{c}", "data-points")) for c in ("trend", "turnaround", "workload", "agreement")}
    assert all(v > 0 for v in points.values()), points
    assert int(_attr(dom, "forecast-method", "data-series")) > 0 and "ETS" in dom and "MAE" in dom
    assert int(_attr(dom, "table-districts", "data-rows")) == 3
    filtered = render(page, f"{live_hub}/analytics/?lang=en&{period}&facility=TTYT_NHONTRACH&finding={CODE['Pneumonia']}")
    after = {c: int(_attr(filtered, f"chart-{c}", "data-points")) for c in ("trend", "turnaround", "workload", "agreement")}
    assert after["workload"] < points["workload"] and after["turnaround"] < points["turnaround"]
    assert after["agreement"] < points["agreement"]
    vi = render(page, f"{live_hub}/analytics/?{period}")
    assert "Phân tích hình ảnh y tế toàn tỉnh" in vi


def test_district_rates_have_a_stated_denominator(db_url: str, known: dict[str, str]) -> None:
    """Positive findings per 1,000 AI-read studies (all findings of a study count), or with a finding
    chosen that finding per 1,000 studies the AI read for it; critical studies per 1,000 AI-read
    studies. A: Bien Hoa, atelectasis; C: Bien Hoa, nothing; B: Nhon Trach, critical pneumothorax
    and pneumonia added, atelectasis overruled."""
    with connect(db_url) as conn:
        rows = {r["district"]: r for r in queries.district_table(conn, today_filters())}
        assert {d: (r["studies"], r["positive_findings"], r["positives_per_1000_studies"], r["critical"],
                    r["critical_per_1000_studies"]) for d, r in rows.items()} == {
            "Bien Hoa": (2, 1, 500.0, 0, 0.0), "Nhon Trach": (1, 2, 2000.0, 1, 1000.0)}
        one = {r["district"]: r for r in queries.district_table(conn, today_filters(finding=CODE["Atelectasis"]))}
        assert {d: (r["positive_findings"], r["positives_per_1000_studies"]) for d, r in one.items()} == {
            "Bien Hoa": (1, 500.0), "Nhon Trach": (0, 0.0)}
        fn, counts, stats = queries.VIEWS["districts"]
        text = export.to_csv(fn(conn, today_filters()), counts, stats)
    assert text.splitlines()[0].endswith("positives_per_1000_studies,critical_per_1000_studies")
    assert "suppressed" in text  # under 5 studies: no rate leaves the hub

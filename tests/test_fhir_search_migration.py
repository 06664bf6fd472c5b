"""Migration 0016 gives resources stored before it the date and quantity index rows the store now
writes, computed in SQL exactly as interop.store.search_params computes them in Python."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from interop.store import db, resources, search_params

MAPPINGS = Path(__file__).resolve().parents[1] / "mappings"
MIGRATION = Path(db.__file__).parent / "migrations" / "0016_date_and_quantity_search.sql"
NEW_TYPES = ("date", "number", "quantity")

OLD = [  # resources as they were stored before 0016: body only, no date or quantity rows
    {"resourceType": "Patient", "birthDate": "1980"},
    {"resourceType": "Patient", "birthDate": "1975-12"},
    {"resourceType": "Patient", "birthDate": "2024-02"},  # a leap February
    {"resourceType": "Patient", "birthDate": "1999-13-01"},  # not a date: no row, as the store does
    {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}, "issued": "2026-12-01T23:30:00+07:00",
     "effectiveDateTime": "2026-11-30T10:00:00.25Z"},
    {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}, "issued": "2026-12-01T10:00:00.123456789Z",
     "effectivePeriod": {"start": "2026-11-30", "end": "2026-12-01T08:00Z"}},
    {"resourceType": "Encounter", "status": "in-progress", "class": {"code": "IMP"}, "period": {"start": "2026-12-01T10:00:00Z"},
     "length": {"value": 90, "unit": "min", "system": "http://unitsofmeasure.org", "code": "min"}},
    {"resourceType": "Encounter", "status": "finished", "class": {"code": "IMP"}, "period": {"end": "2026-12"}},
    {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "effectiveInstant": "2026-12-01T10:00:00Z",
     "valueQuantity": {"value": 0.87, "unit": "%"}},
    {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": 3}},
    {"resourceType": "Task", "status": "ready", "intent": "order", "authoredOn": "2026-12-01T10:00:00+05:30",
     "executionPeriod": {"start": "9999", "end": "0001-01-01"}, "lastModified": "2026-12-01T10:00Z"},
    {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "subject": {"reference": "Patient/x"},
     "occurrenceDateTime": "2026-12-24", "authoredOn": "2026-12-01"},
    {"resourceType": "Communication", "status": "completed", "sent": "2026-12-01T10:00:00-03:00"},
    {"resourceType": "Provenance", "target": [{"reference": "Patient/x"}], "recorded": "2026-12-01T10:00:00.5+00:00",
     "agent": [{"who": {"display": "x"}}]},
    {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": "Patient/x"}, "started": "2026",
     "basedOn": [{"reference": "ServiceRequest/o1"}]},
]


def _rows(conn: Any) -> set[tuple[str, str, str, str | None, str]]:
    table = search_params.load(MAPPINGS)
    new = [(t, p.name + end) for t, ps in table.items() for p in ps.values() if p.type in NEW_TYPES
           for end in ("", ":end")] + [("ImagingStudy", "basedon")]
    rows = conn.execute("SELECT s.type, s.id, s.param, s.system, s.value FROM search_index s"
                        " JOIN unnest(%s::text[], %s::text[]) AS p(type, param) ON s.type = p.type AND s.param = p.param",
                        ([t for t, _ in new], [n for _, n in new])).fetchall()
    return {(r["type"], r["id"], r["param"], r["system"], r["value"]) for r in rows}


def test_migration_0016_indexes_stored_resources_as_the_store_does(db_url: str) -> None:
    table = search_params.load(MAPPINGS)
    expected: set[tuple[str, str, str, str | None, str]] = set()
    with db.connect(db_url) as conn:
        for n, body in enumerate(OLD):
            stored = {**body, "id": f"old{n}", "meta": {"versionId": "1", "lastUpdated": "2026-12-01T00:00:00Z"}}
            conn.execute("INSERT INTO resource (type, id, version, last_updated, body) VALUES (%s, %s, 1, now(), %s)",
                         (body["resourceType"], f"old{n}", json.dumps(stored)))
            params = {k: p for k, p in table[body["resourceType"]].items() if p.type in NEW_TYPES}
            expected |= {(body["resourceType"], f"old{n}", p, s, v) for p, s, v in resources.index_entries(stored, params)}
            if body["resourceType"] == "ImagingStudy":  # its based-on row, as the store wrote it before
                conn.execute("INSERT INTO search_index (type, id, param, system, value, last_updated) SELECT type, id,"
                             " 'based-on', NULL, 'ServiceRequest/o1', last_updated FROM resource WHERE id = %s",
                             (f"old{n}",))
                expected.add(("ImagingStudy", f"old{n}", "basedon", None, "ServiceRequest/o1"))
        conn.commit()
        assert _rows(conn) == set()
        with conn.transaction():
            conn.execute(MIGRATION.read_text(encoding="utf-8"))
        got = _rows(conn)
    # numbers compare as numbers (JSON's 90 and Python's 90 both; the text is the store's)
    assert {r for r in got if r[2] not in ("length", "value-quantity")} == \
        {r for r in expected if r[2] not in ("length", "value-quantity")}
    assert {(*r[:4], float(r[4])) for r in got if r[2] in ("length", "value-quantity")} == \
        {(*r[:4], float(r[4])) for r in expected if r[2] in ("length", "value-quantity")}
    assert ("Patient", "old3", "birthdate") not in {r[:3] for r in got}
    assert len(got) == 18 * 2 + 3 + 1  # every date (two rows: low and end), quantity and basedon; not the non-date


MIGRATION_0022 = Path(db.__file__).parent / "migrations" / "0022_series_modality_uri_and_audit_entity.sql"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
OLD_0022 = [  # stored before 0022: modality rows of the study-level list only, url rows lower-cased
    {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": "Patient/x"},
     "modality": [{"system": DCM, "code": "CR"}],
     "series": [{"uid": "1.2.3", "modality": {"system": DCM, "code": "CR"}},  # the study's own: one row
                {"uid": "1.2.4", "modality": {"system": DCM, "code": "DX"}},
                {"uid": "1.2.5", "modality": {"code": "SR"}}]},  # no system
    {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": "Patient/x"},  # series only
     "series": [{"uid": "1.2.6", "modality": {"system": DCM, "code": "MR"}}]},
    {"resourceType": "ImagingStudy", "status": "registered", "subject": {"reference": "Patient/x"},
     "modality": [{"system": DCM, "code": "CT"}, {"system": DCM, "code": "PT"}]},  # no series
    {"resourceType": "ImagingStudy", "status": "registered", "subject": {"reference": "Patient/x"}},  # neither
    {"resourceType": "Subscription", "status": "active", "reason": "x", "criteria": "DiagnosticReport?status=final",
     "channel": {"type": "rest-hook", "endpoint": "https://HIS.example.org/Fhir/Hook?Token=ÀB"}},
]


def _rows_0022(conn: Any) -> set[tuple[str, str, str, str | None, str]]:
    rows = conn.execute("SELECT type, id, param, system, value FROM search_index WHERE (type, param) IN"
                        " (('ImagingStudy', 'modality'), ('Subscription', 'url')) AND id LIKE 'old%%'").fetchall()
    return {(r["type"], r["id"], r["param"], r["system"], r["value"]) for r in rows}


def test_migration_0022_indexes_series_modalities_and_urls_as_the_store_does(db_url: str) -> None:
    table = search_params.load(MAPPINGS)
    assert table["ImagingStudy"]["modality"].paths == (("modality",), ("series", "modality"))
    assert table["Subscription"]["url"].type == "uri"
    expected: set[tuple[str, str, str, str | None, str]] = set()
    with db.connect(db_url) as conn:
        for n, body in enumerate(OLD_0022):
            rtype, rid = body["resourceType"], f"old{n}"
            stored = {**body, "id": rid, "meta": {"versionId": "1", "lastUpdated": "2026-12-01T00:00:00Z"}}
            conn.execute("INSERT INTO resource (type, id, version, last_updated, body) VALUES (%s, %s, 1, now(), %s)",
                         (rtype, rid, json.dumps(stored)))
            name = "modality" if rtype == "ImagingStudy" else "url"
            expected |= {(rtype, rid, p, s, v) for p, s, v in resources.index_entries(stored, {name: table[rtype][name]})}
            old = ([(c.get("system"), c["code"]) for c in body.get("modality", [])] if rtype == "ImagingStudy"
                   else [(None, search_params.normalise(body["channel"]["endpoint"]))])
            for system, value in old:  # the rows the store wrote before
                conn.execute("INSERT INTO search_index (type, id, param, system, value, last_updated)"
                             " SELECT type, id, %s, %s, %s, last_updated FROM resource WHERE id = %s",
                             (name, system, value, rid))
        conn.commit()
        assert ("ImagingStudy", "old1", "modality", DCM, "MR") not in _rows_0022(conn)  # the defect 0022 mends
        with conn.transaction():
            conn.execute(MIGRATION_0022.read_text(encoding="utf-8"))
        got = _rows_0022(conn)
    assert got == expected
    assert {r for r in got if r[1] == "old0"} == {("ImagingStudy", "old0", "modality", DCM, "CR"),
                                                   ("ImagingStudy", "old0", "modality", DCM, "DX"),
                                                   ("ImagingStudy", "old0", "modality", None, "SR")}
    assert ("Subscription", "old4", "url", None, "https://HIS.example.org/Fhir/Hook?Token=ÀB") in got
    assert not [r for r in got if r[1] == "old3"]


MIGRATION_0023 = Path(db.__file__).parent / "migrations" / "0023_report_tags_searchable.sql"
OLD_0023 = [  # reports stored before 0023: no _tag rows
    {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"},
     "meta": {"tag": [{"system": "urn:interop-hub:site", "code": "BVDKDN"}, {"code": "N"}, {"system": "urn:a"},
                      {"system": "urn:interop-hub:site", "code": "BVDKDN"}, {"code": ""}]}},
    {"resourceType": "DiagnosticReport", "status": "preliminary", "code": {"text": "x"}},  # no tag
    {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}, "meta": {"tag": "not a list"}},
]


def _tag_rows(conn: Any) -> list[tuple[str, str, str, str | None, str]]:
    rows = conn.execute("SELECT type, id, param, system, value FROM search_index WHERE param = '_tag'"
                        " AND id LIKE 'old%%' ORDER BY id, system, value").fetchall()
    return [(r["type"], r["id"], r["param"], r["system"], r["value"]) for r in rows]


def test_migration_0023_indexes_report_tags_as_the_store_does(db_url: str) -> None:
    table = search_params.load(MAPPINGS)
    expected: set[tuple[str, str, str, str | None, str]] = set()
    with db.connect(db_url) as conn:
        for n, body in enumerate(OLD_0023):
            rid = f"old{n}"
            stored = {**body, "id": rid, "meta": {**body.get("meta", {}), "versionId": "1",
                                                   "lastUpdated": "2026-12-01T00:00:00Z"}}
            conn.execute("INSERT INTO resource (type, id, version, last_updated, body) VALUES (%s, %s, 1, now(), %s)",
                         ("DiagnosticReport", rid, json.dumps(stored)))
            if isinstance(stored["meta"].get("tag"), list):
                expected |= {("DiagnosticReport", rid, p, s, v)
                             for p, s, v in resources.index_entries(stored, {"_tag": table["DiagnosticReport"]["_tag"]})}
        conn.commit()
        conn.execute("DROP INDEX search_index_tag")  # as before 0023
        for _ in range(2):  # running it again adds nothing
            with conn.transaction():
                conn.execute(MIGRATION_0023.read_text(encoding="utf-8").replace(
                    "CREATE INDEX search_index_tag", "CREATE INDEX IF NOT EXISTS search_index_tag"))
            got = _tag_rows(conn)
            assert len(got) == len(set(got)) and set(got) == expected
    assert ("DiagnosticReport", "old0", "_tag", "urn:interop-hub:site", "BVDKDN") in expected and len(expected) == 3

"""Search parameters on R4's own paths and types (tests/test_fhir_conformance.py found the gaps):
ImagingStudy?modality is ImagingStudy.series.modality as well as the study-level list, and
Subscription?url is a uri, matched exactly as written. On the real store; the hub's own
`ImagingStudy?patient=&modality=` still walks the search index."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from interop.domain.search import SearchError, parse
from interop.store import db, resources, search_params
from tests.test_fhir_search_scale import _nodes, _plan, _seed

MAPPINGS = Path(__file__).resolve().parents[1] / "mappings"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
HOOK = "https://HIS.example.org/Fhir/Hook?Token=A"


def _found(conn: Any, rtype: str, *args: tuple[str, str]) -> list[str]:
    table = search_params.load(MAPPINGS)
    query = parse(rtype, list(args), table[rtype], table=table).query
    return sorted(b["id"] for b in resources.search(conn, rtype, query).found)


@pytest.fixture()
def stored(db_url: str) -> None:
    table = search_params.load(MAPPINGS)
    studies = {
        "listed": {"modality": [{"system": DCM, "code": "CR"}],
                   "series": [{"uid": "1.1", "modality": {"system": DCM, "code": "CR"}}]},
        "series-only": {"series": [{"uid": "2.1", "modality": {"system": DCM, "code": "MR"}},
                                   {"uid": "2.2", "modality": {"system": DCM, "code": "SR"}}]},
        "none": {},
    }
    with db.connect(db_url) as conn:
        for rid, parts in studies.items():
            resources.create(conn, {"resourceType": "ImagingStudy", "status": "available",
                                    "subject": {"reference": "Patient/p1"}, **parts}, table["ImagingStudy"], rid)
        resources.create(conn, {"resourceType": "Subscription", "status": "active", "reason": "x",
                                "criteria": "DiagnosticReport?status=final",
                                "channel": {"type": "rest-hook", "endpoint": HOOK}}, table["Subscription"], "sub")
        conn.commit()


def test_modality_is_found_on_the_series(db_url: str, stored: None) -> None:
    with db.connect(db_url) as conn:
        assert _found(conn, "ImagingStudy", ("modality", "MR")) == ["series-only"]
        assert _found(conn, "ImagingStudy", ("patient", "Patient/p1"), ("modality", f"{DCM}|SR")) == ["series-only"]
        assert _found(conn, "ImagingStudy", ("modality", "CR,MR")) == ["listed", "series-only"]
        assert _found(conn, "ImagingStudy", ("modality:not", "CR"), ("patient", "p1")) == ["none", "series-only"]
        assert _found(conn, "ImagingStudy", ("modality", "CT")) == []


def test_url_is_a_uri_matched_exactly(db_url: str, stored: None) -> None:
    with db.connect(db_url) as conn:
        assert _found(conn, "Subscription", ("url", HOOK)) == ["sub"]
        assert _found(conn, "Subscription", ("url", HOOK.lower())) == []  # not a string search: case counts
        assert _found(conn, "Subscription", ("url", "https://HIS.example.org/")) == []  # nor a prefix
    table = search_params.load(MAPPINGS)
    for modifier in ("exact", "contains", "below"):
        with pytest.raises(SearchError):
            parse("Subscription", [(f"url:{modifier}", HOOK)], table["Subscription"], table=table)


def test_patient_and_modality_walk_the_index(db_url: str) -> None:
    table = search_params.load(MAPPINGS)
    with db.connect(db_url, autocommit=True) as conn:
        _seed(conn)
        # the seeded study g is Patient/p(g % 20000)'s, of modality CR when g % 4 == 0
        query = parse("ImagingStudy", [("patient", "Patient/p76"), ("modality", "CR")], table["ImagingStudy"],
                      table=table).query
        nodes = _nodes(_plan(conn, "ImagingStudy", query))
        assert not any(kind == "Seq Scan" for kind, _ in nodes), nodes
        assert any(name == "search_index_lookup" for _, name in nodes), nodes
        found = resources.search(conn, "ImagingStudy", query).found
        assert sorted(b["id"] for b in found) == ["s20076", "s40076", "s76"]

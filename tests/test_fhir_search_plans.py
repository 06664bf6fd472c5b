"""Plans of issue 15's search criteria on a table of realistic size (60,000 patients and as many
studies, as tests/test_fhir_search_scale.py seeds them, with a birth date per patient and a start
per study): dates, chains and _has use the search index, never a sequential scan, and a page of a
common value still reads a bounded number of rows."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from interop.domain import search
from interop.store import db, resources, search_params
from tests.test_fhir_search_scale import FAMILIES, MAPPINGS, SEEDED, _nodes, _plan, _rows_read, _seed


def _seed_dates(conn: psycopg.Connection[Any]) -> None:
    """Patient g born on day g % 20000 after 1940-01-01 (a day range), study g started at its own
    minute of March and April 2026 (a second's range), as the store indexes them: low in value and
    high in system, and as param:end high in value and low in system."""
    fmt = """'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"""
    conn.execute(f"""
        INSERT INTO search_index (type, id, param, system, value, last_updated)
        SELECT type, id, param || e.suffix, CASE WHEN e.suffix = '' THEN high ELSE low END,
               CASE WHEN e.suffix = '' THEN low ELSE high END, last_updated FROM (
            SELECT 'Patient' AS type, 'p' || g AS id, 'birthdate' AS param,
                   to_char(date '1940-01-01' + (g %% 20000), {fmt}) AS low,
                   to_char(date '1940-01-01' + (g %% 20000) + 1, {fmt}) AS high,
                   timestamptz '2026-01-01' + g * interval '1 second' AS last_updated
              FROM generate_series(1, %(n)s) g
            UNION ALL
            SELECT 'ImagingStudy', 's' || g, 'started', to_char(timestamp '2026-03-01' + g * interval '1 minute', {fmt}),
                   to_char(timestamp '2026-03-01' + g * interval '1 minute' + interval '1 second', {fmt}),
                   timestamptz '2026-01-01' + g * interval '1 second'
              FROM generate_series(1, %(n)s) g) d
        CROSS JOIN (VALUES (''), (':end')) e(suffix)""", {"n": SEEDED})
    conn.execute("VACUUM ANALYZE search_index")


def _query(rtype: str, *args: tuple[str, str]) -> resources.Query:
    table = search_params.load(MAPPINGS)
    parsed = search.parse(rtype, [*args, ("_count", "10")], table[rtype], table=table,
                          now=datetime(2026, 12, 1, tzinfo=UTC))
    return parsed.query


def test_new_criteria_use_the_indexes_on_a_realistic_table(db_url: str) -> None:
    with db.connect(db_url, autocommit=True) as conn:
        _seed(conn)
        _seed_dates(conn)
        cases = {
            "a rare birth date": ("Patient", _query("Patient", ("birthdate", "1950-05-01"))),
            "born before 1941": ("Patient", _query("Patient", ("birthdate", "lt1940-02-01"))),
            "a common birth year": ("Patient", _query("Patient", ("birthdate", "ge1960"))),
            "a family and a birth year": ("Patient", _query("Patient", ("family", "ly"), ("birthdate", "1980"))),
            "a patient's studies after a day": ("ImagingStudy", _query("ImagingStudy", ("patient", "Patient/p77"),
                                                                       ("started", "gt2026-03-10"))),
            "studies of a started minute": ("ImagingStudy", _query("ImagingStudy", ("started", "2026-03-02T10:00Z"))),
        }
        for what, (rtype, query) in cases.items():
            conditions: list[str] = []
            plan = _plan(conn, rtype, resources.resolve_chains(conn, query))
            nodes = _nodes(plan, conditions)
            assert not any(kind == "Seq Scan" for kind, _ in nodes), (what, nodes)
            assert any(name.startswith("search_index") for _, name in nodes), (what, nodes)
        # a rare date is found through the index by its value, not by reading every patient
        conditions = []
        rare = _plan(conn, "Patient", _query("Patient", ("birthdate", "1950-05-01")))
        _nodes(rare, conditions)
        assert any("value ~>=~" in c for c in conditions), conditions
        assert _rows_read(rare) < 100, _rows_read(rare)
        # a common one (born 1960 or later: two thirds): resources are walked in last_updated order and
        # the walk stops at the page's end, the 11th match (p7315: birth dates grow with the id up to
        # p20000), each patient and its index row read once, not the 40,000 matches
        common = _rows_read(_plan(conn, "Patient", _query("Patient", ("birthdate", "ge1960"))))
        assert common <= 2 * 7316, common
        # a rare lower bound (the last 960 studies started on or after 11 April, at the end of the
        # last_updated order): found by the end rows' index range, not by walking 59,000 studies first
        conditions = []
        recent = _plan(conn, "ImagingStudy", _query("ImagingStudy", ("started", "ge2026-04-11")))
        _nodes(recent, conditions)
        assert any("value ~>~" in c for c in conditions), conditions
        assert _rows_read(recent) < 2000, _rows_read(recent)
        page = resources.search(conn, "ImagingStudy", _query("ImagingStudy", ("started", "ge2026-04-11"),
                                                             ("_total", "accurate")))
        first = (datetime(2026, 4, 11) - datetime(2026, 3, 1)).days * 24 * 60
        assert page.total == SEEDED - first + 1 and [b["id"] for b in page.found] == [f"s{g}" for g in range(first, first + 10)]
        # and the answers are right at this size
        page = resources.search(conn, "Patient", _query("Patient", ("birthdate", "1950-05-01"), ("_total", "accurate")))
        born = (datetime(1950, 5, 1) - datetime(1940, 1, 1)).days
        assert page.total == len([g for g in range(1, SEEDED + 1) if g % 20000 == born])
        assert sorted(b["id"] for b in page.found) == sorted(f"p{g}" for g in range(1, SEEDED + 1) if g % 20000 == born)


def test_chains_are_walked_from_the_referenced_resources(db_url: str) -> None:
    """ImagingStudy?patient.identifier=MRN77: the patient is found first (one index probe), then
    its studies are walked by their reference like any patient= search."""
    with db.connect(db_url, autocommit=True) as conn:
        _seed(conn)
        chained = _query("ImagingStudy", ("patient.identifier", "urn:mrn|MRN77"))
        resolved = resources.resolve_chains(conn, chained)
        assert resolved.criteria[0].values == [(resources.ANY_SYSTEM, "Patient/p77")]
        conditions: list[str] = []
        nodes = _nodes(_plan(conn, "ImagingStudy", resolved), conditions)
        assert ("Index Only Scan", "search_index_lookup") in nodes or ("Index Scan", "search_index_lookup") in nodes
        assert not any(kind == "Seq Scan" for kind, _ in nodes), nodes
        page = resources.search(conn, "ImagingStudy", chained)
        assert sorted(b["id"] for b in page.found) == sorted(f"s{g}" for g in range(1, SEEDED + 1) if g % 20000 == 77)
        # _has: patients with a CT study, answered through the index row by row
        has = _query("Patient", ("_has:ImagingStudy:patient:modality", "CT"), ("family", "ly"))
        nodes = _nodes(_plan(conn, "Patient", has))
        assert not any(kind == "Seq Scan" for kind, _ in nodes), nodes
        # a rare _has is resolved first: the one study started at 10:00 on 2 March (s2040) names p2040
        _seed_dates(conn)
        rare = _query("Patient", ("_has:ImagingStudy:patient:started", "2026-03-02T10:00Z"))
        resolved = resources.resolve_chains(conn, rare, "Patient")
        assert resolved.criteria == [] and resolved.ids == ["p2040"]
        assert _rows_read(_plan(conn, "Patient", resolved)) < 10
        assert [b["id"] for b in resources.search(conn, "Patient", rare).found] == ["p2040"]
        none = _query("Patient", ("_has:ImagingStudy:patient:started", "2027"), ("_id", "p2040"))
        assert resources.search(conn, "Patient", none).found == []
        # patient k has studies s_k, s_k+20000, s_k+40000 (k < 20000), of modality CT when k % 4 == 1
        expected = [f"p{k}" for k in range(1, 20000) if k % 4 == 1 and k % 5 >= 2 and FAMILIES[(k * 7919) % 16] == "ly"]
        assert [b["id"] for b in resources.search(conn, "Patient", has).found] == expected[:10]

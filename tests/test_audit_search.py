"""AuditEvent search by R4's parameter types, on the real audit table: `entity` is
AuditEvent.entity.what (the patients included, through migration 0022's index), `agent` a
reference (agent.who), `agent-name` and `address` strings (prefix, case and accent ignored)."""
from __future__ import annotations

from typing import Any

import pytest

from interop.domain.audit import CLIENT_ID, PERSON_ID, Event, QueryError, Who, interaction, parse_query, row_of
from interop.services.security import audit
from interop.store import audit as audit_store
from interop.store.db import connect

EVENTS = {  # name -> the event
    "vendor-reads-patient": Event(Who("10.0.0.7", client="vendor-ris"), interaction("read"), "R",
                                  what=["Patient/p1/_history/1"], patients=["Patient/p1"]),
    "doctor-reads-report": Event(Who("FE80::1", person="trần.văn", role="radiologist"), interaction("read"), "R",
                                 what=["DiagnosticReport/r1/_history/2"], patients=["Patient/p1"]),
    "both-update-other": Event(Who("10.0.1.9", client="vendor-ris", person="bs.hoa"), interaction("update"), "U",
                               what=["Observation/o9/_history/3"], patients=["Patient/p2"]),
    "anonymous-refused": Event(Who("192.168.5.5"), interaction("read"), "R", outcome="4", what=["Patient/pX"]),
}


@pytest.fixture()
def trail(db_url: str) -> dict[str, str]:
    """The events stored: name -> AuditEvent id."""
    with connect(db_url) as conn:
        for event in EVENTS.values():
            audit_store.insert(conn, row_of(event))
        conn.commit()
        rows = conn.execute("SELECT id FROM audit_event ORDER BY id").fetchall()
    return {name: str(r["id"]) for name, r in zip(EVENTS, rows, strict=True)}


def found(db_url: str, trail: dict[str, str], *args: tuple[str, str]) -> set[str]:
    """The names of the events `AuditEvent?args` answers (total and page agree)."""
    with connect(db_url) as conn:
        total, events = audit.search(conn, parse_query(list(args)))
    assert total == len(events)
    names = {v: k for k, v in trail.items()}
    return {names[e["id"]] for e in events}


def test_entity_is_every_version_of_what_was_touched_and_the_patients(db_url: str, trail: dict[str, str]) -> None:
    assert found(db_url, trail, ("entity", "Patient/p1")) == {"vendor-reads-patient", "doctor-reads-report"}
    assert found(db_url, trail, ("entity", "DiagnosticReport/r1")) == {"doctor-reads-report"}
    assert found(db_url, trail, ("entity", "https://hub.example/fhir/Observation/o9/_history/3")) == {"both-update-other"}
    assert found(db_url, trail, ("entity", "Patient/p2,Patient/pX")) == {"both-update-other", "anonymous-refused"}
    assert found(db_url, trail, ("entity", "Patient/p_")) == set()  # no wildcard
    assert found(db_url, trail, ("patient", "p1")) == {"vendor-reads-patient", "doctor-reads-report"}


def test_entity_search_reads_the_index(db_url: str) -> None:
    with connect(db_url) as conn:
        conn.execute("INSERT INTO audit_event (type, subtype_system, subtype, action, outcome, entities, patients)"
                     " SELECT 'rest', 'x', 'read', 'R', '0', ARRAY['Observation/o' || n || '/_history/1'],"
                     " ARRAY['Patient/p' || n % 5000] FROM generate_series(1, 20000) n")
        conn.execute("ANALYZE audit_event")
        plan = "\n".join(r["QUERY PLAN"] for r in conn.execute(
            "EXPLAIN SELECT count(*) FROM audit_event WHERE " + audit_store._WHAT + " && %s::text[]",
            (["Patient/p17"],)).fetchall())
        assert "audit_event_what" in plan, plan
        total, _ = audit_store.search(conn, parse_query([("entity", "Patient/p17")]))
        assert total == 4
        conn.rollback()


def test_agent_is_a_reference_to_the_client_or_the_person(db_url: str, trail: dict[str, str]) -> None:
    assert found(db_url, trail, ("agent", "Device/vendor-ris")) == {"vendor-reads-patient", "both-update-other"}
    assert found(db_url, trail, ("agent", "Practitioner/bs.hoa")) == {"both-update-other"}
    assert found(db_url, trail, ("agent", "Practitioner/vendor-ris")) == set()  # a client is no person
    assert found(db_url, trail, ("agent", "trần.văn")) == {"doctor-reads-report"}  # an id alone: either kind
    assert found(db_url, trail, ("agent:Device", "vendor-ris")) == {"vendor-reads-patient", "both-update-other"}
    assert found(db_url, trail, ("agent", "Patient/vendor-ris")) == set()
    assert found(db_url, trail, ("agent", "Patient/x,Practitioner/trần.văn")) == {"doctor-reads-report"}
    assert found(db_url, trail, ("agent:identifier", f"{PERSON_ID}|bs.hoa")) == {"both-update-other"}
    assert found(db_url, trail, ("agent:identifier", f"{CLIENT_ID}|bs.hoa")) == set()
    assert found(db_url, trail, ("agent:identifier", "urn:elsewhere|bs.hoa")) == set()
    assert found(db_url, trail, ("altid", "vendor-ris")) == {"vendor-reads-patient", "both-update-other"}


def test_agent_name_and_address_are_strings(db_url: str, trail: dict[str, str]) -> None:
    assert found(db_url, trail, ("agent-name", "TRAN")) == {"doctor-reads-report"}  # prefix, case and accent
    assert found(db_url, trail, ("agent-name", "Trần.V")) == {"doctor-reads-report"}
    assert found(db_url, trail, ("agent-name", "vendor")) == {"vendor-reads-patient", "both-update-other"}
    assert found(db_url, trail, ("agent-name", "anon")) == {"anonymous-refused"}  # R4's agent.name of nobody known
    assert found(db_url, trail, ("agent-name", "ris")) == set()
    assert found(db_url, trail, ("agent-name:contains", "ris")) == {"vendor-reads-patient", "both-update-other"}
    assert found(db_url, trail, ("agent-name:exact", "trần.văn")) == {"doctor-reads-report"}
    assert found(db_url, trail, ("agent-name:exact", "tran.van")) == set()
    assert found(db_url, trail, ("agent-name", "bs_")) == set()  # no wildcard
    assert found(db_url, trail, ("address", "10.0.")) == {"vendor-reads-patient", "both-update-other"}
    assert found(db_url, trail, ("address", "fe80::")) == {"doctor-reads-report"}
    assert found(db_url, trail, ("address:exact", "10.0.0")) == set()
    assert found(db_url, trail, ("address", "10.0.0,192")) == {"vendor-reads-patient", "anonymous-refused"}
    assert found(db_url, trail, ("address", "10.0."), ("agent-name", "bs")) == {"both-update-other"}


@pytest.mark.parametrize("args, message", [
    ([("agent-name:below", "x")], "agent-name: a string parameter takes :exact or :contains"),
    ([("agent:missing", "true")], "agent: modifier :missing is not supported"),
    ([("entity:exact", "Patient/x")], "entity: modifier :exact is not supported"),
])
def test_a_modifier_the_search_does_not_know_is_refused(args: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(QueryError, match=message):
        parse_query(args)


def test_the_fold_is_normalise_letter_by_letter() -> None:
    from interop.store.search_params import normalise

    text = "ĐẶNG Thị Ánh Nguyễn Øystein Łukasz"
    table: dict[int, Any] = {ord(a): b for a, b in zip(audit_store._FOLD_FROM, audit_store._FOLD_TO)}
    table |= {ord(a): None for a in audit_store._FOLD_FROM[len(audit_store._FOLD_TO):]}
    assert text.lower().translate(table) == normalise(text)

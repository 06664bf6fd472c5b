"""The fast create path (issue 14) keeps what a create promised before it: meta.lastUpdated read
from the database's clock and written as Python's isoformat() writes it, and an answer that comes
only after the resource, its history, its index rows and its audit record are committed together."""
from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient

from interop.store import resources
from interop.store.db import connect
from interop.store.search_params import load
from tests.helpers import ROOT as REPO_ROOT

PARAMS = load(REPO_ROOT / "mappings")
FHIR = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
PATIENT = {"resourceType": "Patient", "identifier": [{"system": "urn:test:mrn", "value": "MRN-14"}],
           "name": [{"family": "Trần", "given": ["Thị", "Hoa"]}], "gender": "female", "birthDate": "1980-02-11"}


@pytest.mark.parametrize("zone", ["UTC", "Asia/Ho_Chi_Minh", "America/St_Johns", "Asia/Kathmandu", "America/New_York"])
@pytest.mark.parametrize("moment", ["2026-12-02 18:20:45.043805+00", "2026-12-02 18:20:45+00",
                                    "2026-07-02 18:20:59.999999+00", "2026-03-01 00:00:00.1+00"])
def test_last_updated_text_is_what_isoformat_wrote(db_url: str, zone: str, moment: str) -> None:
    """The write statement formats the clock in SQL: the same text as datetime.isoformat() of the
    value psycopg reads (microseconds dropped when zero, the session's offset as +HH:MM)."""
    with connect(db_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("SET TimeZone = {}").format(psycopg.sql.Literal(zone)))
        row = conn.execute(f"SELECT ts, {resources.LAST_UPDATED_TEXT} AS text"
                           " FROM (SELECT %s::timestamptz AS ts) t", (moment,)).fetchone()
        assert row is not None and row["text"] == row["ts"].isoformat()


def test_create_answers_with_what_was_committed(client: FlaskClient, db_url: str) -> None:
    made = client.post("/fhir/Patient", json=PATIENT, headers=FHIR)
    assert made.status_code == 201
    body = made.get_json()
    rid, meta = body["id"], body["meta"]
    assert meta["versionId"] == "1"
    assert made.headers["ETag"] == 'W/"1"'
    assert made.headers["Last-Modified"] == format_datetime(  # the HTTP date of that instant (whole seconds)
        datetime.fromisoformat(meta["lastUpdated"]).astimezone(UTC), usegmt=True)
    assert made.headers["Location"].endswith(f"/Patient/{rid}/_history/1")
    with connect(db_url) as conn:  # another session: all of it is committed
        current = conn.execute("SELECT last_updated, body FROM resource WHERE type = 'Patient' AND id = %s",
                               (rid,)).fetchone()
        history = conn.execute("SELECT version, last_updated, body FROM resource_history WHERE type = 'Patient'"
                               " AND id = %s", (rid,)).fetchall()
        index = conn.execute("SELECT param, value, last_updated FROM search_index WHERE type = 'Patient' AND id = %s",
                             (rid,)).fetchall()
        audited = conn.execute("SELECT action, entities, patients, client FROM audit_event"
                               " WHERE %s = ANY(entities)", (f"Patient/{rid}/_history/1",)).fetchall()
    assert current is not None and current["body"] == body  # the answer is the stored resource
    when: datetime = current["last_updated"]
    assert meta["lastUpdated"] == when.isoformat()  # the format of a lastUpdated read back as before
    assert [(h["version"], h["last_updated"], h["body"]) for h in history] == [(1, when, body)]
    assert {(r["param"], r["value"]) for r in index} >= {("family", "tran"), ("given", "hoa"),
                                                        ("identifier", "MRN-14"), ("gender", "female")}
    assert {r["last_updated"] for r in index} == {when}
    assert len(audited) == 1 and audited[0]["action"] == "C" and audited[0]["patients"] == [f"Patient/{rid}"]
    found = client.get("/fhir/Patient", query_string={"_lastUpdated": f"ge{meta['lastUpdated']}", "family": "tran"})
    assert [e["resource"]["id"] for e in found.get_json()["entry"]] == [rid]


def test_creates_get_later_clock_readings(client: FlaskClient) -> None:
    stamps = [client.post("/fhir/Patient", json=PATIENT, headers=FHIR).get_json()["meta"]["lastUpdated"]
              for _ in range(3)]
    assert [datetime.fromisoformat(s) for s in stamps] == sorted(datetime.fromisoformat(s) for s in stamps)


def test_a_refused_create_leaves_nothing_and_the_connection_clean(app: Flask, client: FlaskClient,
                                                                  db_url: str) -> None:
    """A create refused inside the pipelined transaction (an identifier too long to index) rolls
    back; the pooled connection is handed out again in its normal mode."""
    too_long = {**PATIENT, "identifier": [{"system": "urn:test:mrn", "value": "x" * (resources.TOKEN_INDEX_CHARS + 1)}]}
    refused = client.post("/fhir/Patient", json=too_long, headers=FHIR)
    assert refused.status_code == 422
    made = client.post("/fhir/Patient", json=PATIENT, headers=FHIR)
    assert made.status_code == 201
    with app.extensions["interop"].pool.connection() as conn:
        assert conn.autocommit is False
    assert _count(db_url, "resource") == 1 and _count(db_url, "resource_history") == 1


def _count(db_url: str, table: str) -> Any:
    with connect(db_url) as conn:
        return conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]


def test_pipelined_transaction_is_all_or_nothing(db_url: str) -> None:
    with connect(db_url) as conn:
        with pytest.raises(RuntimeError), resources.pipelined_transaction(conn):  # the caller gives up
            resources.create(conn, dict(PATIENT), PARAMS["Patient"])
            raise RuntimeError("refused after the write")
        assert conn.autocommit is False and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert _count(db_url, "resource") == 0
        with pytest.raises(psycopg.errors.DivisionByZero), resources.pipelined_transaction(conn):  # a statement fails
            resources.create(conn, dict(PATIENT), PARAMS["Patient"])
            conn.execute("SELECT 1 / 0")
        assert conn.autocommit is False and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert _count(db_url, "resource") == 0 and _count(db_url, "search_index") == 0
        with resources.pipelined_transaction(conn):
            stored = resources.create(conn, dict(PATIENT), PARAMS["Patient"])
        assert _count(db_url, "resource") == 1 and _count(db_url, "resource_history") == 1
        assert resources.read(conn, "Patient", stored["id"]) == stored

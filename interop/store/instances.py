"""DICOM instances pushed to the hub and the studies they make (migration 0009): what was kept
where, when a study last grew, which analysis round it is in, and the unmatched-studies queue."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from .db import scalar


@dataclass(frozen=True)
class Received:
    """One kept instance, as its row records it."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str | None
    modality: str | None
    series_number: int | None
    instance_number: int | None
    series_description: str | None
    body_part: str | None
    bytes: int
    sender: str
    stored_in: str
    patient_id: str | None
    patient_name: str | None
    accession: str | None


def record(conn: psycopg.Connection[Any], item: Received, site: str | None) -> dict[str, Any]:
    """Record a kept instance (a resent one replaces its row) and its study, in the caller's
    transaction; the study row afterwards, locked. Patient ID or name that differ from the
    study's first instance set `identity_conflict` (kept, flagged, never merged)."""
    conn.execute("INSERT INTO dicom_study (study_uid, site, patient_id, patient_name, accession)"
                 " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (study_uid) DO NOTHING",
                 (item.study_uid, site, item.patient_id, item.patient_name, item.accession))
    study = conn.execute("SELECT * FROM dicom_study WHERE study_uid = %s FOR UPDATE", (item.study_uid,)).fetchone()
    assert study is not None
    conflict = study["identity_conflict"]
    if conflict is None and (study["patient_id"] or "") != (item.patient_id or ""):
        conflict = "instances of this study name different patient IDs"
    elif conflict is None and (study["patient_name"] or "") != (item.patient_name or ""):
        conflict = "instances of this study name different patient names"
    old = scalar(conn, "SELECT bytes FROM dicom_instance WHERE sop_instance_uid = %s", (item.sop_instance_uid,))
    conn.execute(
        "INSERT INTO dicom_instance (sop_instance_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, modality,"
        " series_number, instance_number, series_description, body_part, bytes, sender, stored_in)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (sop_instance_uid) DO UPDATE SET bytes = excluded.bytes, stored_in = excluded.stored_in,"
        " sender = excluded.sender, transfer_syntax = excluded.transfer_syntax, received = now()",
        (item.sop_instance_uid, item.study_uid, item.series_uid, item.sop_class_uid, item.transfer_syntax,
         item.modality, item.series_number, item.instance_number, item.series_description, item.body_part,
         item.bytes, item.sender, item.stored_in))
    row = conn.execute(
        "UPDATE dicom_study SET last_received = now(), instances = instances + %s, bytes = bytes + %s - %s,"
        " identity_conflict = %s, site = coalesce(site, %s) WHERE study_uid = %s RETURNING *",
        (0 if old is not None else 1, item.bytes, old or 0, conflict, site, item.study_uid)).fetchone()
    assert row is not None
    return dict(row)


def next_round(conn: psycopg.Connection[Any], study_uid: str) -> int:
    """An instance arrived after the study's analysis round started: open the next round."""
    return int(scalar(conn, "UPDATE dicom_study SET round = round + 1, state = 'receiving', decision = NULL"
                            " WHERE study_uid = %s RETURNING round", (study_uid,)))


def study(conn: psycopg.Connection[Any], study_uid: str, *, lock: bool = False) -> dict[str, Any] | None:
    row = conn.execute("SELECT *, extract(epoch FROM now() - last_received) AS quiet_seconds,"
                       " extract(epoch FROM now() - first_received) AS age_seconds"
                       " FROM dicom_study WHERE study_uid = %s" + (" FOR UPDATE" if lock else ""),
                       (study_uid,)).fetchone()
    return dict(row) if row is not None else None


def instances(conn: psycopg.Connection[Any], study_uid: str) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute("SELECT * FROM dicom_instance WHERE study_uid = %s"
                                          " ORDER BY series_number NULLS LAST, series_uid, instance_number NULLS LAST,"
                                          " sop_instance_uid", (study_uid,))]


def set_state(conn: psycopg.Connection[Any], study_uid: str, state: str, *, imaging_study: str | None = None,
              service_request: str | None = None) -> None:
    conn.execute("UPDATE dicom_study SET state = %s, imaging_study = coalesce(%s, imaging_study),"
                 " service_request = coalesce(%s, service_request) WHERE study_uid = %s",
                 (state, imaging_study, service_request, study_uid))


def decide(conn: psycopg.Connection[Any], study_uid: str, decision: str, service_request: str | None = None) -> bool:
    """An admin's decision on an unmatched study (release, or match to an order); False if it is not waiting."""
    cur = conn.execute("UPDATE dicom_study SET decision = %s, service_request = coalesce(%s, service_request)"
                       " WHERE study_uid = %s AND state = 'unmatched'", (decision, service_request, study_uid))
    return cur.rowcount == 1


def unmatched(conn: psycopg.Connection[Any], limit: int = 200) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(
        "SELECT study_uid, site, patient_id, patient_name, accession, identity_conflict, first_received, last_received,"
        " instances, bytes, round, decision, imaging_study, (SELECT string_agg(DISTINCT modality, ',')"
        " FROM dicom_instance i WHERE i.study_uid = s.study_uid) AS modalities"
        " FROM dicom_study s WHERE state = 'unmatched' ORDER BY last_received LIMIT %s", (limit,))]


def pending_order(conn: psycopg.Connection[Any], study_uid: str, accession: str | None, site: str | None) -> str | None:
    """The ServiceRequest id of an order waiting for its images (a `find-study` job) that names
    this Study Instance UID, or this accession number at this site (hospitals number their own
    accessions: the same number at another hospital is another patient)."""
    value = scalar(conn, "SELECT payload->>'service_request' FROM job WHERE kind = 'find-study'"
                         " AND status IN ('queued', 'running') AND (payload->>'study_uid' = %s"
                         " OR (%s::text IS NOT NULL AND payload->>'accession' = %s AND upper(payload->>'site') = upper(%s)))"
                         " ORDER BY id LIMIT 1", (study_uid, accession, accession, site))
    return None if value is None else str(value)


def unmatched_for(conn: psycopg.Connection[Any], study_uid: str | None, accession: str | None,
                  site: str | None) -> list[tuple[str, int]]:
    """(study UID, round) of the pushed studies waiting for an order with this UID, or with this
    accession number at this site."""
    rows = conn.execute("SELECT study_uid, round FROM dicom_study WHERE state = 'unmatched'"
                        " AND (study_uid = %s OR (%s::text IS NOT NULL AND accession = %s AND upper(site) = upper(%s)))",
                        (study_uid, accession, accession, site)).fetchall()
    return [(r["study_uid"], int(r["round"])) if isinstance(r, dict) else (r[0], int(r[1])) for r in rows]


def wake(conn: psycopg.Connection[Any], dedupe_key: str) -> None:
    """Make a queued job due now (an admin decided; an order arrived)."""
    conn.execute("UPDATE job SET run_after = now() WHERE dedupe_key = %s AND status = 'queued'", (dedupe_key,))


def last_analysis(conn: psycopg.Connection[Any], key: str) -> dict[str, Any] | None:
    """The payload of the newest analysis job of a study (`key`, or one of its later rounds)."""
    row = conn.execute("SELECT payload FROM job WHERE dedupe_key = %s OR dedupe_key LIKE %s ORDER BY id DESC LIMIT 1",
                       (key, key.replace("%", r"\%") + ":round:%")).fetchone()
    return dict(row["payload"]) if row is not None else None

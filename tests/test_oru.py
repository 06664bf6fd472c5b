"""Results out as HL7 v2.5.1 ORU^R01 over MLLP, through the one queue's delivery lanes.

Content: the message built from a real report (`interop.domain.report.build` with the shipped
chest model) is parsed by two independent parsers, hl7apy and python-hl7, and every field is
checked where it must land. Delivery: against python-hl7's own asyncio MLLP server on loopback,
which records what it receives and answers AA, AE, AR, garbage, nothing, or hangs up.
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import psycopg
import pytest
from hl7apy.parser import parse_message

from inference_client.models import load_models
from interop.domain import report as report_builder
from interop.hl7 import oru
from interop.hl7.client import BadAck, MllpClient, PeerUnavailable, parse_ack
from interop.ops.admin import deliveries
from interop.services import delivery
from interop.store import queue as jobs
from interop.store import resources
from interop.store.search_params import load as load_params
from interop.workers.delivery import Deliverer
from tests.helpers import context, delivery_row, free_port, time_passes

MAPPINGS = Path("mappings")
MODEL = load_models(MAPPINGS)["chest-xray"]
PARAMS = load_params(MAPPINGS.resolve())
CRITICAL = next(i for i, label in enumerate(MODEL.labels) if label.critical)
UNCODED = next(i for i, label in enumerate(MODEL.labels) if label.code is None)
NOW = datetime(2026, 11, 20, 1, 6, 7, tzinfo=UTC)
STUDY_UID = "1.2.840.99999.1.20261120.1"

PATIENT = {
    "resourceType": "Patient", "id": "p1",
    "identifier": [{"system": "urn:oid:1.2.840.99999.7", "value": "BN-0042",
                    "type": {"coding": [{"system": oru.V2_0203, "code": "MR"}]},
                    "assigner": {"display": "BVDKDN"}}],
    "name": [{"use": "official", "family": "Nguyễn", "given": ["Văn", "An"]}],
    "birthDate": "1980-05-17", "gender": "male",
}
SERVICE_REQUEST = {
    "resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order",
    "subject": {"reference": "Patient/p1"},
    "identifier": [
        {"type": {"coding": [{"system": oru.V2_0203, "code": "PLAC"}]}, "value": "ORD|001", "assigner": {"display": "HIS"}},
        {"type": {"coding": [{"system": oru.V2_0203, "code": "FILL"}]}, "value": "F-77", "assigner": {"display": "RIS"}},
        {"type": {"coding": [{"system": oru.V2_0203, "code": "ACSN"}]}, "value": "ACC&2026~1"},
    ],
    "code": {"coding": [{"system": "http://loinc.org", "code": "36554-4", "display": "XR Chest Single view"}]},
}
STUDY = {
    "resourceType": "ImagingStudy", "id": "s1", "status": "available",
    "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
    "subject": {"reference": "Patient/p1"}, "basedOn": [{"reference": "ServiceRequest/sr1"}],
    "started": "2026-11-20T08:00:00+07:00",
}


def built_report(critical: bool = True, report_id: str = "r1") -> dict[str, Any]:
    probabilities = [0.02] * len(MODEL.labels)
    probabilities[1] = 0.81  # a positive, non-critical finding
    if critical:
        probabilities[CRITICAL] = 0.97
    return report_builder.build(
        study=STUDY, study_uid=STUDY_UID, model=MODEL, version=MODEL.version, probabilities=probabilities,
        report_id=report_id, observation_ids=[f"{report_id}-o{i}" for i in range(len(MODEL.labels))],
        issued="2026-11-20T08:05:00.250+07:00",
    )


def build(built: dict[str, Any], **overrides: Any) -> str:
    args: dict[str, Any] = dict(
        order=oru.order_context(SERVICE_REQUEST, study=STUDY), sending_facility="INTEROP_HUB",
        receiving_application="HIS", receiving_facility="BVDKDN", control_id="CTL-1", now=NOW, patient=PATIENT)
    args.update(overrides)
    order = args.pop("order")
    return oru.build_oru(built["report"], built["observations"], built["device"], order, **args)


_ESCAPE = re.compile(r"\\(F|S|T|R|E|\.br)\\")
_MEANING = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\", ".br": "\n"}


def unescape(text: str) -> str:
    """The receiver's view of an escaped value (written here, independent of oru.escape)."""
    return _ESCAPE.sub(lambda m: _MEANING[m.group(1)], text)


# -- content --------------------------------------------------------------------------------
def test_oru_fields_land_where_they_should_in_python_hl7() -> None:
    built = built_report()
    text = build(built)
    assert "\n" not in text and text.count("\r") == len(text.split("\r")) - 1
    msg = hl7.parse(text)
    msh = msg.segment("MSH")
    assert str(msh[9]) == "ORU^R01^ORU_R01" and str(msh[10]) == "CTL-1" and str(msh[11]) == "P"
    assert str(msh[12]) == "2.5.1" and str(msh[18]) == "UNICODE UTF-8"
    assert str(msh[4]) == "INTEROP_HUB" and str(msh[5]) == "HIS" and str(msh[6]) == "BVDKDN"
    assert str(msh[7]) == "20261120010607+0000"
    # PID from the Patient: CX with assigning authority (namespace & OID & ISO) and type MR.
    assert msg["PID.F3.R1.C1"] == "BN-0042" and msg["PID.F3.R1.C5"] == "MR"
    assert msg["PID.F3.R1.C4.S1"] == "BVDKDN" and msg["PID.F3.R1.C4.S2"] == "1.2.840.99999.7"
    assert msg["PID.F3.R1.C4.S3"] == "ISO"
    assert (msg["PID.F5.R1.C1"], msg["PID.F5.R1.C2"], msg["PID.F5.R1.C3"]) == ("Nguyễn", "Văn", "An")
    assert msg["PID.F5.R1.C7"] == "L"
    assert msg["PID.F7"] == "19800517" and msg["PID.F8"] == "M"
    # ORC echoes the order numbers; the placer number's | comes back unescaped.
    assert msg["ORC.F1"] == "RE"
    assert unescape(msg["ORC.F2.R1.C1"]) == "ORD|001" and msg["ORC.F2.R1.C2"] == "HIS"
    assert msg["ORC.F3.R1.C1"] == "F-77" and msg["ORC.F3.R1.C2"] == "RIS"
    # OBR
    obr = msg.segment("OBR")
    assert str(obr[2]) == str(msg.segment("ORC")[2]) and str(obr[3]) == str(msg.segment("ORC")[3])
    code = built["report"]["code"]["coding"][0]
    assert (msg["OBR.F4.R1.C1"], msg["OBR.F4.R1.C2"], msg["OBR.F4.R1.C3"]) == (code["code"], code["display"], "LN")
    assert msg["OBR.F7"] == "20261120080000+0700" and msg["OBR.F22"] == "20261120080500.250+0700"
    assert msg.unescape(str(obr[18])) == "ACC&2026~1"
    assert msg["OBR.F24"] == "RAD" and msg["OBR.F25"] == "P"
    assert (msg["OBR.F44.R1.C1"], msg["OBR.F44.R1.C3"]) == ("36554-4", "LN")
    # the AI disclaimer, in both languages, with "not clinically validated"
    notes = " ".join(msg.unescape(str(s[3])) for s in msg.segments("NTE"))
    assert report_builder.DISCLAIMER["en"] in notes and report_builder.DISCLAIMER["vi"] in notes
    assert report_builder.NOT_VALIDATED["en"] in notes and f"{MODEL.name} {MODEL.version}" in notes
    # OBX: study UID, one NM per finding, the conclusion as FT
    obx = msg.segments("OBX")
    assert [str(s[1]) for s in obx] == [str(n) for n in range(1, len(obx) + 1)]
    assert str(obx[0][2]) == "ST" and str(obx[0][3]) == "113014^DICOM Study^DCM" and str(obx[0][5]) == STUDY_UID
    findings = obx[1:-1]
    assert len(findings) == len(MODEL.labels)
    for seg, obs, label in zip(findings, built["observations"], MODEL.labels):
        assert str(seg[2]) == "NM"
        assert float(str(seg[5])) == obs["valueQuantity"]["value"]
        if label.code:
            assert (str(seg[3][0][0]), str(seg[3][0][2])) == (label.code, "SCT")
        else:
            assert str(seg[3][0][0]) == label.key and str(seg[3][0][2]) == oru.LOCAL_SYSTEM
        assert str(seg[3][0][1]) == label.display.en
        assert str(seg[6]) == "1^probability^UCUM"
        expected_flag = "AA" if label.critical and obs["valueQuantity"]["value"] >= label.threshold else (
            "A" if obs["valueQuantity"]["value"] >= label.threshold else "N")
        assert str(seg[8]) == expected_flag
        assert str(seg[11]) == "P" and str(seg[14]) == "20261120080000+0700"
        assert str(seg[17][0][0]) == "AI"
        assert str(seg[18]) == f"{MODEL.name}@{MODEL.version}^^{report_builder.MODEL_SYSTEM}^URI"
    assert [str(s[8]) for s in findings].count("AA") == 1 and str(findings[CRITICAL][8]) == "AA"
    assert str(findings[1][8]) == "A" and str(findings[UNCODED][3][0][0]) == MODEL.labels[UNCODED].key
    last = obx[-1]
    assert str(last[2]) == "FT" and str(last[3][0][0]) == "19005-8" and str(last[11]) == "P"
    assert unescape(str(last[5])) == built["report"]["conclusion"]


def test_oru_parses_in_hl7apy_with_the_same_fields() -> None:
    built = built_report()
    text = build(built)
    msg = parse_message(text, find_groups=False)
    assert msg.name == "ORU_R01"
    assert [c.name for c in msg.children][:5] == ["MSH", "PID", "ORC", "OBR", "NTE"]
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msg.msh.msh_12.to_er7() == "2.5.1"
    assert msg.msh.msh_18.to_er7() == "UNICODE UTF-8" and msg.msh.msh_10.to_er7() == "CTL-1"
    assert msg.pid.pid_3[0].cx_1.to_er7() == "BN-0042" and msg.pid.pid_3[0].cx_5.to_er7() == "MR"
    assert msg.pid.pid_5[0].xpn_1.to_er7() == "Nguyễn" and msg.pid.pid_7.to_er7() == "19800517"
    assert msg.pid.pid_8.to_er7() == "M"
    assert msg.orc.orc_1.to_er7() == "RE" and unescape(msg.orc.orc_2.ei_1.to_er7()) == "ORD|001"
    assert msg.orc.orc_3.ei_1.to_er7() == "F-77"
    obr = msg.obr
    assert obr.obr_2.ei_1.to_er7() == msg.orc.orc_2.ei_1.to_er7() and obr.obr_3.ei_2.to_er7() == "RIS"
    assert obr.obr_4.ce_1.to_er7() == built["report"]["code"]["coding"][0]["code"] and obr.obr_4.ce_3.to_er7() == "LN"
    assert obr.obr_7.to_er7() == "20261120080000+0700" and obr.obr_22.to_er7() == "20261120080500.250+0700"
    assert unescape(obr.obr_18.to_er7()) == "ACC&2026~1"
    assert obr.obr_24.to_er7() == "RAD" and obr.obr_25.to_er7() == "P" and obr.obr_44.ce_1.to_er7() == "36554-4"
    obx = list(msg.obx)
    assert len(obx) == len(MODEL.labels) + 2
    crit = obx[1 + CRITICAL]
    label = MODEL.labels[CRITICAL]
    assert crit.obx_2.to_er7() == "NM" and crit.obx_3.ce_1.to_er7() == label.code
    assert crit.obx_3.ce_2.to_er7() == label.display.en and crit.obx_3.ce_3.to_er7() == "SCT"
    assert crit.obx_5.to_er7() == "0.97" and crit.obx_6.ce_2.to_er7() == "probability"
    assert crit.obx_8.to_er7() == "AA" and crit.obx_11.to_er7() == "P"
    assert crit.obx_14.to_er7() == "20261120080000+0700" and crit.obx_17.ce_1.to_er7() == "AI"
    assert crit.obx_18.ei_1.to_er7() == f"{MODEL.name}@{MODEL.version}"
    assert obx[-1].obx_2.to_er7() == "FT" and obx[-1].obx_3.ce_1.to_er7() == "19005-8"
    # hl7apy does not know the \.br\ formatting command and re-escapes its backslashes.
    conclusion = obx[-1].obx_5.to_er7().replace("\\E\\.br\\E\\", "\\.br\\")
    assert unescape(conclusion) == built["report"]["conclusion"]


def test_delimiters_and_line_breaks_are_escaped() -> None:
    built = built_report()
    nasty = "a|b^c&d~e\\f\r\nsecond line\nthird \\.br\\ literal"
    built["report"]["conclusion"] = nasty
    text = build(built)
    assert len(text.split("\r")) == len(hl7.parse(text).segments("OBX")) + 7  # MSH PID ORC OBR 3 NTE
    ft = str(hl7.parse(text).segments("OBX")[-1][5])
    assert ft == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\.br\\second line\\.br\\third \\E\\.br\\E\\ literal"
    assert unescape(ft) == "a|b^c&d~e\\f\nsecond line\nthird \\.br\\ literal"
    assert oru.escape("x\ry") == "x y"  # never a segment break inside a field


def test_status_maps_and_signed_report_makes_findings_final() -> None:
    built = built_report(critical=False)
    for status, code in (("preliminary", "P"), ("final", "F"), ("corrected", "C"), ("amended", "C")):
        built["report"]["status"] = status
        msg = hl7.parse(build(built))
        assert msg["OBR.F25"] == code
        assert {str(s[11]) for s in msg.segments("OBX")} == {code}
    built["report"]["status"] = "entered-in-error"
    with pytest.raises(oru.OruError):
        build(built)


def test_without_patient_or_order() -> None:
    built = built_report(critical=False)
    msg = hl7.parse(build(built, patient=None, order=None))
    assert msg["PID.F3.R1.C1"] == "p1" and msg["PID.F3.R1.C4"] == "INTEROP_HUB" and msg["PID.F3.R1.C5"] == "PI"
    assert msg["OBR.F2"] == "" and msg["OBR.F18"] == ""
    assert str(msg.segments("OBX")[0][5]) == STUDY_UID  # from the report identifier


def test_order_context_falls_back_to_the_study_accession() -> None:
    study = dict(STUDY, identifier=[*STUDY["identifier"], {
        "type": {"coding": [{"system": oru.V2_0203, "code": "ACSN"}]}, "value": "A-9"}])
    ctx = oru.order_context(None, study=study)
    assert ctx.accession_number == "A-9" and ctx.placer_order_number is None and ctx.study_instance_uid == STUDY_UID
    msg = hl7.parse(build(built_report(), order=ctx))
    assert msg["OBR.F18"] == "A-9" and msg["OBR.F3"] == "A-9" and msg["ORC.F3"] == "A-9"


def test_parse_ack() -> None:
    ack = parse_ack("MSH|^~\\&|HIS|BV|HUB|X|20260101||ACK^R01^ACK|9|P|2.5.1\rMSA|AE|CTL-1|Unknown patient\r")
    assert (ack.code, ack.control_id, ack.text, ack.accepted) == ("AE", "CTL-1", "Unknown patient", False)
    for garbage in ("", "HELLO", "MSH|^~\\&|A\rMSA|XX|1", "MSH|^~\\&|A|B\rERR|x"):
        with pytest.raises(BadAck):
            parse_ack(garbage)


# -- an independent MLLP peer ---------------------------------------------------------------
class Peer:
    """python-hl7's asyncio MLLP server in a thread; `mode` says how it answers."""

    def __init__(self, port: int):
        self.port = port
        self.mode = "AA"  # AA | AE | AR | silent | close | garbage | unframed
        self.received: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Any = None

    async def _handle(self, reader: Any, writer: Any) -> None:
        try:
            while True:
                message = await reader.readmessage()
                self.received.append(str(message))
                if self.mode == "close":
                    break
                if self.mode == "silent":
                    continue
                if self.mode == "unframed":
                    writer.write(b"HELLO, NO FRAME\r")
                    await writer.drain()
                    break
                if self.mode == "garbage":
                    writer.writeblock(b"HELLO THERE")
                else:
                    writer.writemessage(message.create_ack(self.mode))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def start(self) -> None:
        async def go() -> Any:
            return await hl7.mllp.start_hl7_server(self._handle, "127.0.0.1", self.port, encoding="utf-8")
        self.server = asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    def stop(self) -> None:
        if self.server is not None:
            server = self.server

            async def close() -> None:  # asyncio's Server is not thread-safe: close it on its own loop
                server.close()
                await server.wait_closed()
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
            self.server = None

    def shutdown(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def control_ids(self) -> list[str]:
        return [str(hl7.parse(m).segment("MSH")[10]) for m in self.received]


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer(free_port())
    p.start()
    yield p
    p.shutdown()


def make_sender(db_url: str, tmp_path: Path, port: int, *, ack_timeout: float = 2.0,
                connect_timeout: float = 2.0) -> Deliverer:
    sites = tmp_path / "sites.yaml"
    sites.write_text(
        "sites:\n  BVDKDN:\n    name: Benh vien Da khoa Dong Nai\n"
        f"    hl7: {{host: 127.0.0.1, port: {port}, receiving_application: HIS, connect_timeout_seconds: {connect_timeout},"
        f" ack_timeout_seconds: {ack_timeout}}}\n"
        "  NOHL7:\n    name: no destination\n", encoding="utf-8")
    ctx = context(INTEROP_SITES=str(sites), DATABASE_URL=db_url, TRITON_URL="unused:1", INTEROP_RETRY_BASE_SECONDS="2")
    return Deliverer(ctx, worker_id="test-sender")


def queue(conn: psycopg.Connection[Any], sender: Deliverer, rid: str = "r1") -> list[int]:
    with conn.transaction():
        report = resources.read(conn, "DiagnosticReport", rid)
        return delivery.queue_report(conn, sender.ctx, report, sender.ctx.sites.get("bvdkdn"))


def row(conn: psycopg.Connection[Any], item_id: int) -> dict[str, Any]:
    return delivery_row(conn, item_id)


REFUSED_ATTEMPTS = context().policies.kind(delivery.HL7).refused_attempts  # HL7 AR: tried this often in all


# -- delivery -------------------------------------------------------------------------------
def test_delivered_once_with_aa(stored: psycopg.Connection[Any], peer: Peer, db_url: str, tmp_path: Path) -> None:
    sender = make_sender(db_url, tmp_path, peer.port)
    try:
        [item_id] = queue(stored, sender)
        assert queue(stored, sender) == []  # the same version is queued once
        assert row(stored, item_id)["priority"] == 0  # critical finding first
        assert sender.run_once() is True
        assert sender.run_once() is False
    finally:
        sender.close()
    assert len(peer.received) == 1
    got = row(stored, item_id)
    assert got["status"] == "sent" and got["sent_at"] is not None and got["attempts"] == 1
    assert got["control_id"] == peer.control_ids()[0] and "MSA|AA|" + got["control_id"] in got["last_answer"]
    assert got["payload"].replace("\r", "") == peer.received[0].replace("\r", "")
    msg = hl7.parse(peer.received[0])
    assert msg["MSH.F6"] == "BVDKDN" and msg["OBR.F25"] == "P" and msg["PID.F5.R1.C1"] == "Nguyễn"
    assert unescape(msg["ORC.F2.R1.C1"]) == "ORD|001"


def test_peer_down_then_up_is_delivered_late_but_once(stored: psycopg.Connection[Any], db_url: str,
                                                      tmp_path: Path) -> None:
    peer = Peer(free_port())  # not listening yet
    sender = make_sender(db_url, tmp_path, peer.port)
    try:
        [item_id] = queue(stored, sender)
        assert sender.run_once() is True
        first = row(stored, item_id)
        assert first["status"] == "pending" and first["attempts"] == 1 and "PeerUnavailable" in first["last_error"]
        assert first["run_after"] > stored.execute("SELECT now() AS t").fetchone()["t"]  # backed off
        assert sender.run_once() is False  # not due yet
        time_passes(stored)
        assert sender.run_once() is True  # still down
        assert row(stored, item_id)["attempts"] == 2
        peer.start()
        time_passes(stored)
        assert sender.run_once() is True
        assert sender.run_once() is False
    finally:
        sender.close()
        peer.shutdown()
    got = row(stored, item_id)
    assert got["status"] == "sent" and got["attempts"] == 3
    assert peer.control_ids() == [first["control_id"]]  # built once, sent once


@pytest.mark.parametrize("mode", ["silent", "close", "garbage", "unframed"])
def test_no_usable_answer_is_retried_with_the_same_control_id(
        stored: psycopg.Connection[Any], peer: Peer, db_url: str, tmp_path: Path, mode: str) -> None:
    sender = make_sender(db_url, tmp_path, peer.port, ack_timeout=0.5)
    try:
        [item_id] = queue(stored, sender)
        peer.mode = mode
        start = time.monotonic()
        assert sender.run_once() is True
        assert time.monotonic() - start < 5
        got = row(stored, item_id)
        assert got["status"] == "pending"
        assert ("BadAck" if mode in ("garbage", "unframed") else "PeerUnavailable") in got["last_error"]
        if mode == "garbage":
            assert got["last_answer"] == "HELLO THERE"
        peer.mode = "AA"
        time_passes(stored)
        assert sender.run_once() is True
    finally:
        sender.close()
    assert row(stored, item_id)["status"] == "sent"
    ids = peer.control_ids()
    assert len(ids) == 2 and ids[0] == ids[1]  # a duplicate the receiver can recognise by MSH-10


def test_ae_is_rejected_at_once_kept_visible_and_replayable(
        stored: psycopg.Connection[Any], peer: Peer, db_url: str, tmp_path: Path) -> None:
    sender = make_sender(db_url, tmp_path, peer.port)
    peer.mode = "AE"
    try:
        [item_id] = queue(stored, sender)
        assert sender.run_once() is True
        got = row(stored, item_id)
        assert got["status"] == "rejected" and got["last_error"].startswith("AE")
        assert f"MSA|AE|{got['control_id']}" in got["last_answer"]
        assert sender.run_once() is False  # not retried blindly
        letters = deliveries(stored, ("rejected", "dead"))
        assert [(d["id"], d["status"]) for d in letters] == [(item_id, "rejected")]
        assert "MSA|AE" in letters[0]["last_answer"]
        assert jobs.series_jobs(stored, "DiagnosticReport/r1")[0]["status"] == "rejected"
        peer.mode = "AA"
        assert jobs.replay(stored, item_id, delivery.KINDS) is True
        assert jobs.replay(stored, item_id, delivery.KINDS) is False  # already pending
        assert sender.run_once() is True
    finally:
        sender.close()
    got = row(stored, item_id)
    assert got["status"] == "sent" and deliveries(stored, ("rejected", "dead")) == []
    first, second = peer.control_ids()
    assert first != second and got["control_id"] == second  # rebuilt with a new control id


def test_ar_is_retried_a_few_times_then_rejected(
        stored: psycopg.Connection[Any], peer: Peer, db_url: str, tmp_path: Path) -> None:
    sender = make_sender(db_url, tmp_path, peer.port)
    peer.mode = "AR"
    try:
        [item_id] = queue(stored, sender)
        statuses = []
        for _ in range(REFUSED_ATTEMPTS):
            assert sender.run_once() is True
            statuses.append(row(stored, item_id)["status"])
            time_passes(stored)
        assert sender.run_once() is False
    finally:
        sender.close()
    assert statuses == ["pending"] * (REFUSED_ATTEMPTS - 1) + ["rejected"]
    got = row(stored, item_id)
    assert "MSA|AR|" in got["last_answer"] and len(set(peer.control_ids())) == 1
    assert [d["id"] for d in deliveries(stored, ("rejected", "dead"))] == [item_id]


def test_new_version_is_sent_again_as_final(
        stored: psycopg.Connection[Any], peer: Peer, db_url: str, tmp_path: Path) -> None:
    sender = make_sender(db_url, tmp_path, peer.port)
    try:
        [v1] = queue(stored, sender)
        report = dict(resources.read(stored, "DiagnosticReport", "r1"))
        report["status"] = "final"
        resources.update(stored, report, PARAMS["DiagnosticReport"])
        [v2] = queue(stored, sender)
        assert queue(stored, sender) == []
        assert sender.run_once() and sender.run_once()
        assert sender.run_once() is False
    finally:
        sender.close()
    assert [m["OBR.F25"] for m in map(hl7.parse, peer.received)] == ["P", "F"]  # in version order
    final = hl7.parse(peer.received[1])
    assert {str(s[11]) for s in final.segments("OBX")} == {"F"}
    assert row(stored, v1)["version"] == 1 and row(stored, v2)["version"] == 2
    assert row(stored, v2)["status"] == "sent"


def test_claim_order_priority_and_versions(stored: psycopg.Connection[Any]) -> None:
    conn = stored

    def enqueue(rid: str, version: int, priority: int = 5) -> int | None:
        return jobs.enqueue(conn, delivery.HL7, {"resource_type": "DiagnosticReport", "resource_id": rid,
                                                 "version": version},
                            dedupe_key=f"deliver:BVDKDN:hl7:DiagnosticReport/{rid}/{version}", priority=priority,
                            lane="BVDKDN:hl7", series=f"DiagnosticReport/{rid}", seq=version)

    a = enqueue("x", 1)
    b = enqueue("x", 2)
    c = enqueue("y", 1, priority=0)
    assert enqueue("x", 1) is None

    def claim(worker: str) -> jobs.Job | None:  # three at once in the lane: the order is what is tested
        return jobs.claim(conn, worker, 60, kinds=delivery.KINDS, lane_limit=3)

    first = claim("w1")
    second = claim("w2")
    assert first is not None and second is not None and (first.id, second.id) == (c, a)
    assert claim("w3") is None  # x v2 waits for x v1
    with conn.transaction():
        jobs.complete(conn, second, answer="MSH|^~\\&\rMSA|AA|1")
    third = claim("w3")
    assert third is not None and third.id == b
    with pytest.raises(jobs.LeaseLost):
        with conn.transaction():
            jobs.complete(conn, second, answer="again")
    assert jobs.depth(conn) == {"running": 2, "done": 1}


def test_lane_runs_one_delivery_at_a_time_and_its_breaker_closes_it(stored: psycopg.Connection[Any]) -> None:
    conn = stored
    ctx = context()
    for rid in ("p", "q"):
        jobs.enqueue(conn, delivery.HL7, {}, dedupe_key=f"k-{rid}", lane="SLOW:hl7", series=f"DiagnosticReport/{rid}",
                     seq=1)
    jobs.enqueue(conn, delivery.HL7, {}, dedupe_key="k-other", lane="OTHER:hl7", series="DiagnosticReport/o", seq=1)
    held = jobs.claim(conn, "w1", 60, kinds=delivery.KINDS, lane="SLOW:hl7")
    assert held is not None
    assert jobs.claim(conn, "w2", 60, kinds=delivery.KINDS, lane="SLOW:hl7") is None  # one at a time
    other = jobs.claim(conn, "w2", 60, kinds=delivery.KINDS)
    assert other is not None and other.lane == "OTHER:hl7"  # another destination is not held up
    assert jobs.ready_lanes(conn, delivery.KINDS, 1) == []
    with conn.transaction():
        jobs.retry_later(conn, held, "PeerUnavailable", 0)
    breaker = ctx.policies.breaker
    for n in range(1, breaker.failures + 1):
        with conn.transaction():
            closed = jobs.lane_failed(conn, "SLOW:hl7", "PeerUnavailable", breaker)
        assert (closed is not None) == (n >= breaker.failures)
    assert jobs.claim(conn, "w3", 60, kinds=delivery.KINDS) is None  # closed: nothing of it is claimed
    assert [lane["open"] for lane in jobs.lanes(conn) if lane["name"] == "SLOW:hl7"] == [True]
    with conn.transaction():
        jobs.lane_succeeded(conn, "SLOW:hl7")
    assert jobs.ready_lanes(conn, delivery.KINDS, 1) == ["SLOW:hl7"]
    assert jobs.claim(conn, "w3", 60, kinds=delivery.KINDS) is not None


def test_site_without_hl7_destination_queues_nothing(stored: psycopg.Connection[Any], db_url: str,
                                                     tmp_path: Path) -> None:
    sender = make_sender(db_url, tmp_path, 1)
    report = resources.read(stored, "DiagnosticReport", "r1")
    assert delivery.queue_report(stored, sender.ctx, report, sender.ctx.sites.get("NOHL7")) == []
    assert delivery.queue_report(stored, sender.ctx, report, sender.ctx.sites.get("UNKNOWN")) == []
    sender.close()


def test_mllp_client_bounds_the_answer(peer: Peer) -> None:
    with pytest.raises(PeerUnavailable):
        MllpClient("127.0.0.1", free_port(), connect_timeout=1).send("MSH|^~\\&|A")
    peer.mode = "silent"
    start = time.monotonic()
    with pytest.raises(PeerUnavailable):
        MllpClient("127.0.0.1", peer.port, ack_timeout=0.3).send("MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5.1")
    assert time.monotonic() - start < 3


def test_an_edit_of_the_sites_file_takes_effect_without_a_restart(
        stored: psycopg.Connection[Any], peer: Peer, db_url: str, tmp_path: Path) -> None:
    """The RIS moved: the operator edits the sites file; the running sender follows it (and a
    broken edit leaves the last good version in force)."""
    sender = make_sender(db_url, tmp_path, free_port())  # the old address: nothing listens there
    sites = tmp_path / "sites.yaml"
    try:
        [item_id] = queue(stored, sender)
        assert sender.run_once() is True
        assert row(stored, item_id)["status"] == "pending"
        time.sleep(1.1)  # the file is looked at again at most once a second
        sites.write_text("sites: [not, a, mapping", encoding="utf-8")
        assert sender.ctx.sites.get("BVDKDN") is not None  # a broken edit: the last good version stays
        time.sleep(1.1)
        sites.write_text("sites:\n  BVDKDN:\n    name: Benh vien Da khoa Dong Nai\n"
                         f"    hl7: {{host: 127.0.0.1, port: {peer.port}, receiving_application: HIS,"
                         " ack_timeout_seconds: 2}\n", encoding="utf-8")
        time_passes(stored)
        assert sender.run_once() is True
    finally:
        sender.close()
    assert row(stored, item_id)["status"] == "sent" and len(peer.received) == 1

"""Every HL7 v2 message gets an answer, and an accepted one is never lost in silence (issue 10).

On the wire (the listener on a real PostgreSQL, python-hl7's client and a raw socket): odd or
over-long values in any MSH field are AR with an ERR and the connection stays open; only
accepted messages hold their control id, so a rejected message can be sent again once fixed and
an operator can release an accepted one; the same control id with other content is refused;
v2.6 orders with a byte-order mark and LF endings are accepted. After the wire (the real hub): a
sender that asks for application acknowledgements (MSH-16) gets AA once its message is processed
and AE with an ERR when it cannot be; a failure is on /hl7/messages and /metrics.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from interop.hl7 import header, mllp
from interop.hl7.order import map_order
from tests.fixtures.hub import HubProcess, start_hub, stop_hub
from tests.fixtures.mllp import ListenerThread, Receiver, RunningListener, listener_settings, orm, raw_exchange, send, unframe
from tests.helpers import ROOT, wait_for
from tests.test_hl7_mapping import TABLES
from tests.test_mllp import ORM, ack_fields, err_code, exchange, jobs, messages, msa_code, rows, sample

HUGE = "Z" * 3000


def msa_text(answer: bytes) -> str:
    fields = ack_fields(answer)["MSA"]
    return fields[3] if len(fields) > 3 else ""


# -- on the wire ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field", [3, 4, 5, 6, 9, 10, 11, 12, 15, 16, 18])
def test_an_over_long_value_in_any_msh_field_is_refused_and_the_connection_stays(
        mllp_listener: RunningListener, db_url: str, field: int) -> None:
    wire = mllp.frame(sample(ORM, "LONG1", **{f"msh{field}": HUGE})) + mllp.frame(sample(ORM, f"OK{field}"))
    frames = unframe(raw_exchange(mllp_listener.port, wire, timeout=5))
    refused = "CR" if field == 15 else "AR"  # a value in MSH-15 asks for enhanced mode: a commit reject
    assert [msa_code(f) for f in frames] == [refused, "AA"], field  # answered, and the next one read
    where = "|".join(ack_fields(frames[0])["ERR"])  # ERR-1 (v2.3 layout) or ERR-2 (v2.5): MSH^1^field
    assert err_code(frames[0]) == "102" and re.search(rf"MSH\^1\^{field}[|^]", where), where
    assert f"MSH-{field} is longer than" in msa_text(frames[0])
    stored = {r[0]: r[2] for r in messages(db_url)}
    assert stored[f"OK{field}"] == "accepted" and len(jobs(db_url)) == 1
    assert len(stored) == 2  # the refused one is kept too


@pytest.mark.parametrize("name,message,code", [
    ("superscript digit in the version", sample(ORM, "V1", msh12="2.5.²"), "203"),
    ("letters in the version", sample(ORM, "V2", msh12="2.x"), "203"),
    ("NUL in the control id", sample(ORM, "N\x001"), "102"),
    ("NUL in a segment", sample(ORM, "N2") + b"NTE|1||a\x00b\r", "102"),
    ("control characters in the facility", sample(ORM, "C3", msh4="BV\x01DK\x7f"), "102"),
])
def test_odd_values_are_refused_with_a_reason(mllp_listener: RunningListener, db_url: str, name: str, message: bytes,
                                              code: str) -> None:
    answers = exchange(mllp_listener.port, message, sample(ORM, "AFTER"))
    assert [msa_code(a) for a in answers] == ["AR", "AA"], name
    assert err_code(answers[0]) == code, name
    assert len(jobs(db_url)) == 1  # nothing refused is ever processed


def test_a_rejected_message_can_be_sent_again_once_the_hub_accepts_it(db_url: str, tmp_path: Path) -> None:
    """The sender's v2.7 ORM is refused; the operator widens the table; the very same bytes pass."""
    message = sample(ORM, "V27", msh12="2.7")
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    first = ListenerThread(listener_settings(db_url, INTEROP_MAPPINGS_DIR=str(mappings)))
    first.start()
    try:
        assert msa_code(exchange(first.settings.mllp_port, message)[0]) == "AR"
    finally:
        first.stop()
    table = mappings / "hl7v2" / "accepted_messages.yaml"
    table.write_text(table.read_text().replace('versions: ["2.3", "2.6"]', 'versions: ["2.3", "2.7"]'))
    second = ListenerThread(listener_settings(db_url, INTEROP_MAPPINGS_DIR=str(mappings)))
    second.start()
    try:
        again = exchange(second.settings.mllp_port, message)[0]
    finally:
        second.stop()
    assert msa_code(again) == "AA" and "duplicate" not in msa_text(again)
    assert [(r[0], r[2]) for r in messages(db_url)] == [("V27", "rejected"), ("V27", "accepted")]
    assert len(jobs(db_url)) == 1


def test_the_same_control_id_with_other_content_is_refused_not_dropped(mllp_listener: RunningListener,
                                                                      db_url: str) -> None:
    first = sample(ORM, "SAME1")
    other = first.replace(b"ORC|NW|", b"ORC|XO|")  # another order, one control id (seen in public samples)
    answers = exchange(mllp_listener.port, first, first, other)
    assert [msa_code(a) for a in answers] == ["AA", "AA", "AR"]
    assert "duplicate" in ack_fields(answers[1])["MSA"][3]
    assert err_code(answers[2]) == "205" and "different message" in msa_text(answers[2])
    assert [(r[0], r[2]) for r in messages(db_url)] == [("SAME1", "accepted"), ("SAME1", "rejected")]
    stored = rows(db_url, "SELECT raw FROM hl7_message WHERE status = 'rejected'")
    assert bytes(stored[0][0]) == other  # kept, for the operator to see
    assert len(jobs(db_url)) == 1


def test_an_operator_releases_a_control_id(mllp_listener: RunningListener, db_url: str) -> None:
    message = sample(ORM, "REL1")
    assert msa_code(exchange(mllp_listener.port, message)[0]) == "AA"
    [(message_id,)] = rows(db_url, "SELECT id FROM hl7_message WHERE control_id = 'REL1'")
    env = {**os.environ, "DATABASE_URL": db_url}
    released = subprocess.run([sys.executable, "-m", "interop.cli", "hl7", "release", str(message_id)], env=env,
                              capture_output=True, text=True, timeout=60)
    assert released.returncode == 0 and "released" in released.stdout
    again = subprocess.run([sys.executable, "-m", "interop.cli", "hl7", "release", str(message_id)], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    answer = exchange(mllp_listener.port, message)[0]
    assert msa_code(answer) == "AA" and "duplicate" not in msa_text(answer)
    assert len(jobs(db_url)) == 2  # processed again, as the operator asked


V26 = ("\ufeffMSH|^~\\&|HIS|BVDKDN|AIHUB|PROVINCE|20261122083000||ORM^O01^ORM_O01|V26-1|P|2.6|||AL|NE||UNICODE UTF-8\n"
       "PID|||BN2600^^^BVDKDN^MR||TRẦN^THỊ MAI||19700101|F\n"
       "ORC|NW|PL2600^HIS|FL2600^RIS||SC\n"
       "OBR|1|PL2600^HIS|FL2600^RIS|36554-4^XR Chest Single view^LN|||20261122083000\n").encode("utf-8")


def test_a_v26_order_with_a_byte_order_mark_and_lf_endings_is_accepted_and_maps(mllp_listener: RunningListener,
                                                                                db_url: str) -> None:
    header_, ids = header.read(V26)
    assert header.check(header_, ids, header.load_table(header.table_path(ROOT / "mappings"))) is None
    answer = exchange(mllp_listener.port, V26)[0]
    assert msa_code(answer) == "CA"  # enhanced mode: the commit acknowledgement
    assert len(jobs(db_url)) == 1
    mapped = map_order(V26.decode("utf-8").lstrip("\ufeff").replace("\n", "\r"), TABLES)
    assert mapped.version == "2.6" and mapped.patient["name"][0]["family"] == "TRẦN"


# -- after the wire: application acknowledgements, failures seen --------------------------------------
@pytest.fixture
def ack_hub(db_url: str, triton_url: str, orthanc: Any, tmp_path: Path) -> Iterator[tuple[HubProcess, Receiver]]:
    sender = Receiver()  # the hospital's engine: receives our acknowledgements (and results)
    sites = {"sites": {"BVDKDN": {"name": "Benh vien Da khoa Dong Nai",
                                  "app_ack": {"host": "127.0.0.1", "port": sender.port}}}}
    path = tmp_path / "sites.yaml"
    path.write_text(yaml.safe_dump(sites), encoding="utf-8")
    hub = start_hub({"DATABASE_URL": db_url, "TRITON_URL": triton_url, "DICOMWEB_URL": orthanc.dicomweb_url,
                     "INTEROP_SITES": str(path), "INTEROP_RETRY_BASE_SECONDS": "1"}, tmp_path)
    yield hub, sender
    stop_hub(hub)
    sender.stop()


def _with_ack_types(message: bytes, accept: str, app: str) -> bytes:
    msh, rest = message.split(b"\r", 1)
    fields = msh.split(b"|")
    while len(fields) < 18:
        fields.append(b"")
    fields[14], fields[15] = accept.encode(), app.encode()
    return b"|".join(fields) + b"\r" + rest


def test_application_acknowledgements_say_what_became_of_each_message(ack_hub: tuple[HubProcess, Receiver],
                                                                      db_url: str) -> None:
    hub, engine = ack_hub
    port = int(hub.env["INTEROP_MLLP_PORT"])
    good = _with_ack_types(orm("APP1", placer="PLA1", filler="FLA1", accession="ACCA1"), "AL", "AL")
    # accepted on the wire (PID is there), but it names no patient identifier: it cannot be processed
    bad = _with_ack_types(orm("APP2", placer="PLA2", filler="FLA2", accession="ACCA2", patient_id=""), "AL", "ER")
    quiet = _with_ack_types(orm("APP3", placer="PLA3", filler="FLA3", accession="ACCA3"), "AL", "ER")
    answers = [a.split("\r") for a in send(port, good, bad, quiet)]
    assert [next(s for s in a if s.startswith("MSA")).split("|")[1] for a in answers] == ["CA", "CA", "CA"]

    def acks() -> dict[str, str]:
        out = {}
        for message in list(engine.messages):
            if str(message.segment("MSH")[9]).startswith("ACK"):
                out[str(message.segment("MSA")[2])] = str(message.segment("MSA")[1])
        return out

    wait_for(lambda: acks() == {"APP1": "AA", "APP2": "AE"}, 60, what="the application acknowledgements")
    ae = next(m for m in engine.messages if str(m.segment("MSA")[2]) == "APP2")
    assert "names no patient identifier" in str(ae.segment("MSA")) and str(ae.segment("MSH")[15]) == "AL"
    assert str(ae.segment("ERR")).startswith("ERR|PID^1^3^101&")  # where, and why (table 0357), for the engine
    failed = hub.session.get(f"{hub.base}/hl7/messages?status=failed", timeout=10).json()
    assert [(m["control_id"], m["app_ack_code"]) for m in failed] == [("APP2", "AE")]
    assert "patient identifier" in failed[0]["error"]
    metrics = hub.session.get(f"{hub.base}/metrics", timeout=10).text
    assert 'interop_hl7_messages{status="failed"} 1.0' in metrics
    assert rows(db_url, "SELECT control_id FROM hl7_failed") == [("APP2",)]
    assert acks().get("APP3") is None  # ER: nothing to say when all went well


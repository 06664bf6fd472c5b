"""HL7 v2 over MLLP: bytes on a socket -> durable row (+ job) -> ACK.

Pure parts (framer, MSH reader, ACK builder) byte by byte; then the real listener on a real
PostgreSQL, driven by independent clients: python-hl7's asyncio MLLP client, its `mllp_send`
command, and a raw socket for bad framing.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hl7
import psycopg
import pytest
from hl7.mllp import open_hl7_connection

from interop.hl7 import ack, header, mllp
from interop.hl7.errors import AckCode, MissingSegment, UnsupportedMessage
from tests.fixtures.mllp import (
    ListenerThread,
    RunningListener,
    listener_settings,
    raw_exchange,
    start_mllp_process,
    unframe,
)
from tests.helpers import DATA, free_port
from tests.helpers import ROOT as REPO_ROOT

SAMPLES = DATA / "hl7v2"
TABLE = header.load_table(header.table_path(REPO_ROOT / "mappings"))
ORM = SAMPLES / "dcm4che_ORM_O01_v231_radiology.hl7"
OMI = SAMPLES / "dcm4che_OMI_O23-ImagingOrder_v251.hl7"


def sample(path: Path, control_id: str | None = None, **replace: str) -> bytes:
    """A sample's bytes, optionally with a new MSH-10 (and other MSH fields by number)."""
    data = path.read_bytes()
    if control_id is None and not replace:
        return data
    msh, rest = data.split(b"\r", 1)
    fields = msh.split(b"|")
    if control_id is not None:
        fields[9] = control_id.encode()
    for key, value in replace.items():
        n = int(key.removeprefix("msh"))
        while len(fields) < n:
            fields.append(b"")
        fields[n - 1] = value.encode()
    return b"|".join(fields) + b"\r" + rest


def ack_fields(answer: bytes) -> dict[str, list[str]]:
    """Segments of an ACK by id (python-hl7 parses it: an independent reader)."""
    msg = hl7.parse(answer.decode("ascii"))
    return {str(seg[0]): [str(f) for f in seg] for seg in msg}


def err_code(answer: bytes) -> str:
    """The HL7 table 0357 code: ERR-3.1 (v2.5 layout) or ERR-1.4.1 (v2.3/2.4 layout)."""
    err = ack_fields(answer)["ERR"]
    if len(err) > 3 and err[3]:
        return err[3].split("^")[0]
    return err[1].split("^")[3].split("&")[0]


def msa_code(answer: bytes) -> str:
    return ack_fields(answer)["MSA"][1]


async def _exchange(port: int, payloads: list[bytes], timeout: float = 10) -> list[bytes]:
    reader, writer = await open_hl7_connection("127.0.0.1", port, encoding="utf-8")
    answers = []
    try:
        for payload in payloads:
            writer.writeblock(payload)
            await writer.drain()
            answers.append(await asyncio.wait_for(reader.readblock(), timeout))
    finally:
        writer.close()
        await writer.wait_closed()
    return answers


def exchange(port: int, *payloads: bytes) -> list[bytes]:
    """Send each payload on one connection with python-hl7's MLLP client; the ACKs in order."""
    return asyncio.run(_exchange(port, list(payloads)))


def rows(db_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def messages(db_url: str) -> list[tuple[Any, ...]]:
    return rows(db_url, "SELECT control_id, message_type, status, ack_code, raw FROM hl7_message ORDER BY id")


def jobs(db_url: str) -> list[tuple[Any, ...]]:
    return rows(db_url, "SELECT kind, payload, dedupe_key FROM job ORDER BY id")


# -- the framer, byte by byte -----------------------------------------------------------------
def test_framer_reassembles_a_frame_split_across_reads() -> None:
    framer = mllp.Framer(1000)
    wire = mllp.frame(b"MSH|one")
    out: list[Any] = []
    for i in range(len(wire)):
        out += framer.feed(wire[i:i + 1])
    assert out == [b"MSH|one"] and framer.garbage_bytes == 0 and not framer.in_frame


def test_framer_several_frames_in_one_read_and_garbage_between() -> None:
    framer = mllp.Framer(1000)
    wire = b"junk" + mllp.frame(b"A") + b"\r\n" + mllp.frame(b"B") + mllp.frame(b"C")[:3]
    assert framer.feed(wire) == [b"A", b"B"]
    assert framer.garbage_bytes == 6 and framer.pending == 2
    assert framer.feed(b"\x0dtrailing") == [b"C"]  # the end block split across reads
    assert framer.garbage_bytes == 14


def test_framer_a_new_start_block_abandons_the_partial_frame() -> None:
    framer = mllp.Framer(1000)
    assert framer.feed(b"\x0bMSH|cut") == []
    assert framer.feed(b"\x0bMSH|whole\x1c\x0d") == [b"MSH|whole"]
    assert framer.garbage_bytes == len(b"\x0bMSH|cut")


def test_framer_end_block_needs_its_carriage_return() -> None:
    framer = mllp.Framer(1000)
    assert framer.feed(b"\x0bA\x1cB\x1c\x0d") == [b"A\x1cB"]


def test_framer_oversize_frame_is_cut_and_skipped() -> None:
    framer = mllp.Framer(10)
    out = framer.feed(b"\x0b" + b"x" * 50)
    assert len(out) == 1 and isinstance(out[0], mllp.FrameTooLarge)
    assert out[0].head.startswith(b"xxxx") and out[0].size > 10 and out[0].limit == 10
    assert framer.feed(b"y" * 1000) == []  # not buffered
    assert len(framer._buf) <= 1
    assert framer.feed(b"\x1c") == [] and framer.feed(b"\x0d" + mllp.frame(b"ok")) == [b"ok"]


def test_framer_complete_oversize_frame_in_one_read() -> None:
    framer = mllp.Framer(10)
    out = framer.feed(mllp.frame(b"z" * 11) + mllp.frame(b"small"))
    assert isinstance(out[0], mllp.FrameTooLarge) and out[0].size == 11 and out[1] == b"small"
    assert framer.feed(mllp.frame(b"0123456789")) == [b"0123456789"]  # exactly the limit is fine


# -- the MSH reader and the check ----------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.hl7")), ids=lambda p: p.name)
def test_every_sample_header_reads(path: Path) -> None:
    h, ids = header.read(path.read_bytes())
    assert ids[0] == "MSH" and h.control_id and h.version.startswith("2.")
    problem = header.check(h, ids, TABLE)
    if h.message_code in ("ORM", "OMI"):
        assert problem is None
    else:
        assert isinstance(problem, UnsupportedMessage) and problem.ack_code is AckCode.AR


def test_msh9_structure_suffix_and_separators() -> None:
    h, ids = header.read(OMI.read_bytes().replace(b"\r", b"\r\n"))
    assert (h.message_type, h.structure, h.charset) == ("OMI^O23", "OMI_O23", "8859/1")
    assert "IPC" in ids and "TQ1" in ids and "" not in ids
    h2, _ = header.read(b"\xef\xbb\xbf" + ORM.read_bytes().replace(b"\r", b"\n"))
    assert (h2.message_type, h2.structure, h2.version, h2.control_id) == ("ORM^O01", "", "2.3.1", "103106")


def test_missing_required_segment_is_named() -> None:
    data = b"\r".join(s for s in ORM.read_bytes().split(b"\r") if not s.startswith(b"OBR"))
    problem = header.check(*header.read(data), TABLE)
    assert isinstance(problem, MissingSegment) and problem.ack_code is AckCode.AE and problem.segment == "OBR"


def test_version_outside_the_range_is_rejected() -> None:
    for version in ("2.7", "2.2", "2.5.²", "2.5a"):  # ORM^O01 was withdrawn in v2.7
        h, ids = header.read(sample(ORM, msh12=version))
        problem = header.check(h, ids, TABLE)
        assert problem is not None and problem.error_code == 203 and problem.field == 12, version


# -- the ACK ---------------------------------------------------------------------------------------
def test_ack_layout_v25_and_v23() -> None:
    h, ids = header.read(OMI.read_bytes())
    problem = MissingSegment("OBR", "OMI^O23")
    segs = ack_fields(ack.build(h, AckCode.AE, problem, control_id="X1", timestamp="20250101000000"))
    assert segs["MSH"][3:7] == ["MESA_IM", "XYZ_IMAGE_MANAGER", "MESA_OF", "XYZ_RADIOLOGY"]
    assert segs["MSH"][9] == "ACK^O23^ACK" and segs["MSH"][10] == "X1" and segs["MSH"][12] == "2.5.1"
    assert segs["MSH"][18] == "8859/1"
    assert segs["MSA"][1:3] == ["AE", "1001125"]
    assert segs["ERR"][2] == "OBR" and segs["ERR"][3] == "100^Segment sequence error^HL70357" and segs["ERR"][4] == "E"
    assert "OBR" in segs["ERR"][8]
    h23, _ = header.read(ORM.read_bytes())
    err = ack_fields(ack.build(h23, AckCode.AR, UnsupportedMessage("x", header.ErrorCode(200), 9)))["ERR"]
    assert err[1] == "MSH^1^9^200&Unsupported message type&HL70357"


@pytest.mark.parametrize("rule,code,sent", [
    ("AL", AckCode.CA, True), ("AL", AckCode.CR, True), ("NE", AckCode.CA, False), ("NE", AckCode.CE, False),
    ("ER", AckCode.CA, False), ("ER", AckCode.CE, True), ("SU", AckCode.CA, True), ("SU", AckCode.CR, False),
])
def test_enhanced_mode_rules(rule: str, code: AckCode, sent: bool) -> None:
    h, _ = header.read(sample(OMI, msh15=rule))
    assert ack.enhanced(h) and ack.should_send(h, code) is sent
    assert ack.answer_code(h, None) is AckCode.CA


# -- the listener on a real PostgreSQL ------------------------------------------------------------
def test_every_sample_is_answered_and_stored(mllp_listener: RunningListener, db_url: str) -> None:
    paths = sorted(SAMPLES.glob("dcm4che_*.hl7"))  # the public samples (hub_* are sent in test_hl7_v2_fields.py)
    answers = exchange(mllp_listener.port, *(p.read_bytes() for p in paths))
    expected = {p.name: ("AA" if "_OMI_" in p.name or "_ORM_" in p.name else "AR") for p in paths}
    assert {p.name: msa_code(a) for p, a in zip(paths, answers)} == expected
    for p, a in zip(paths, answers):
        assert ack_fields(a)["MSA"][2] == header.read(p.read_bytes())[0].control_id
    stored = messages(db_url)
    assert len(stored) == len(paths)
    assert [bytes(r[4]) for r in stored] == [p.read_bytes() for p in paths]  # exactly as received
    assert sorted(r[2] for r in stored) == sorted("accepted" if v == "AA" else "rejected" for v in expected.values())
    ids = rows(db_url, "SELECT id FROM hl7_message WHERE status = 'accepted' ORDER BY id")
    assert [(k, p, d) for k, p, d in jobs(db_url)] == [
        ("process-hl7", {"message": i}, f"hl7:{i}") for (i,) in ids]
    zds = [bytes(r[4]) for r in stored if b"\rZDS|" in bytes(r[4])]
    assert len(zds) == 2  # the Z-segment travels in the raw bytes


def test_mllp_send_command_line(mllp_listener: RunningListener, db_url: str) -> None:
    exe = shutil.which("mllp_send") or str(Path(sys.executable).parent / "mllp_send")
    out = subprocess.run([exe, "--loose", "-f", str(ORM), "-p", str(mllp_listener.port), "127.0.0.1"],
                         capture_output=True, timeout=60, check=True).stdout
    assert b"MSA|AA|103106" in out
    assert [(r[0], r[1], r[2]) for r in messages(db_url)] == [("103106", "ORM^O01", "accepted")]


def test_separators_bom_and_charsets(mllp_listener: RunningListener, db_url: str) -> None:
    base = OMI.read_bytes()
    variants = {
        "lf": sample(OMI, "LF1").replace(b"\r", b"\n"),
        "crlf": sample(OMI, "CRLF1").replace(b"\r", b"\r\n"),
        "bom": b"\xef\xbb\xbf" + sample(OMI, "BOM1"),
        "utf8-under-8859": sample(OMI, "UTF1").replace(b"Smith^Lucy", "Nguyễn^Thị Lựu".encode()),
        "declared-utf8": sample(OMI, "U8", msh18="UNICODE UTF-8").replace(b"Smith", "Trần".encode()),
    }
    assert b"8859/1" in base
    answers = exchange(mllp_listener.port, *variants.values())
    assert [msa_code(a) for a in answers] == ["AA"] * len(variants)
    assert ack_fields(answers[4])["MSH"][18] == "UNICODE UTF-8"
    stored = {r[0]: bytes(r[4]) for r in messages(db_url)}
    assert stored == {"LF1": variants["lf"], "CRLF1": variants["crlf"], "BOM1": variants["bom"],
                      "UTF1": variants["utf8-under-8859"], "U8": variants["declared-utf8"]}
    assert len(jobs(db_url)) == 5


def test_duplicates_are_acknowledged_again_without_a_second_job(mllp_listener: RunningListener, db_url: str) -> None:
    first = exchange(mllp_listener.port, ORM.read_bytes())
    again = exchange(mllp_listener.port, ORM.read_bytes(), ORM.read_bytes())
    assert [msa_code(a) for a in first + again] == ["AA", "AA", "AA"]
    assert "duplicate" in ack_fields(again[0])["MSA"][3]
    assert len(messages(db_url)) == 1 and len(jobs(db_url)) == 1
    # a rejected message resent is judged again (it holds no control id), and each copy is kept
    oru = (SAMPLES / "dcm4che_ORU_R01-SR_v251.hl7").read_bytes()
    assert [msa_code(a) for a in exchange(mllp_listener.port, oru, oru)] == ["AR", "AR"]
    assert len(messages(db_url)) == 3 and len(jobs(db_url)) == 1
    # the same control id from another facility is another message
    assert msa_code(exchange(mllp_listener.port, sample(ORM, msh4="OTHER_SITE"))[0]) == "AA"
    assert len(jobs(db_url)) == 2


def test_enhanced_mode(mllp_listener: RunningListener, db_url: str) -> None:
    answers = exchange(mllp_listener.port, sample(OMI, "E1", msh15="AL", msh16="NE"))
    assert msa_code(answers[0]) == "CA"
    bad = sample(SAMPLES / "dcm4che_ORU_R01-SR_v251.hl7", "E2", msh15="AL")
    assert msa_code(exchange(mllp_listener.port, bad)[0]) == "CR"
    # NE: no answer at all, but stored and queued; then a normal message on the same connection
    nothing = raw_exchange(mllp_listener.port, mllp.frame(sample(OMI, "E3", msh15="NE")) +
                           mllp.frame(sample(OMI, "E4")), timeout=3)
    assert [msa_code(a) for a in unframe(nothing)] == ["AA"]
    assert ack_fields(unframe(nothing)[0])["MSA"][2] == "E4"
    assert [(r[0], r[3]) for r in messages(db_url)] == [("E1", "CA"), ("E2", "CR"), ("E3", "CA"), ("E4", "AA")]
    assert rows(db_url, "SELECT accept_ack_type, app_ack_type FROM hl7_message WHERE control_id = 'E1'") == [
        ("AL", "NE")]
    assert len(jobs(db_url)) == 3


def test_acks_received_are_not_stored_or_answered(mllp_listener: RunningListener, db_url: str) -> None:
    incoming = ack.build(header.read(ORM.read_bytes())[0], AckCode.AA)
    out = raw_exchange(mllp_listener.port, mllp.frame(incoming) + mllp.frame(sample(ORM, "after")), timeout=3)
    assert [ack_fields(a)["MSA"][2] for a in unframe(out)] == ["after"]
    assert [r[0] for r in messages(db_url)] == ["after"]


def _good_message_accepted(port: int, control_id: str) -> None:
    assert msa_code(exchange(port, sample(OMI, control_id))[0]) == "AA"


def test_bad_input_each_answered_then_a_good_message_accepted(mllp_listener: RunningListener, db_url: str) -> None:
    port = mllp_listener.port
    orm_lines = ORM.read_bytes().split(b"\r")
    cases: list[tuple[str, bytes, str | None, str | None]] = [
        # name, bytes on the wire, expected MSA-1 (None: no answer), expected ERR-3 code
        ("not hl7", mllp.frame(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "AR", "100"),
        ("missing msh", mllp.frame(b"\r".join(orm_lines[1:])), "AR", "100"),
        ("bad delimiters", mllp.frame(b"MSH|ab|APP|FAC\rPID|1"), "AR", "102"),
        ("no control id", mllp.frame(sample(ORM, "")), "AR", "101"),
        ("unsupported type", mllp.frame(sample(ORM, "U1", msh9="RDE^O11^RDE_O11")), "AR", "200"),
        ("unsupported trigger", mllp.frame(sample(ORM, "U2", msh9="ADT^A99")), "AR", "201"),
        ("unsupported version", mllp.frame(sample(ORM, "U3", msh12="2.2")), "AR", "203"),
        ("orm without obr", mllp.frame(b"\r".join(s for s in orm_lines if not s.startswith(b"OBR"))), "AE", "100"),
        ("unsupported charset", mllp.frame(sample(ORM, "C1", msh18="KLINGON-8")), "AR", "103"),
        ("oversize", mllp.frame(sample(ORM, "BIG1") + b"NTE|1||" + b"x" * (70 * 1024) + b"\r"), "AR", "207"),
        ("garbage only", b"\x00\xff" * 100, None, None),
        ("truncated frame then close", b"\x0b" + sample(ORM, "T1")[:200], None, None),
    ]
    for i, (name, wire, expected, err) in enumerate(cases):
        answer = raw_exchange(port, wire, timeout=5, close_write=expected is None)
        frames = unframe(answer)
        if expected is None:
            assert frames == [], name
        else:
            assert len(frames) == 1, name
            segs = ack_fields(frames[0])
            assert segs["MSA"][1] == expected, name
            assert err_code(frames[0]) == err, name
            assert "Smith" not in frames[0].decode() and "DOE" not in frames[0].decode(), name
        _good_message_accepted(port, f"GOOD{i}")
    stored = {r[0]: (r[2], r[3]) for r in messages(db_url)}
    assert stored["U1"] == ("rejected", "AR") and stored["103106"] == ("rejected", "AE")
    assert stored["C1"] == ("rejected", "AR") and stored["BIG1"] == ("rejected", "AR")
    assert "T1" not in stored  # a truncated frame is not a message
    assert rows(db_url, "SELECT count(*) FROM hl7_message WHERE control_id IS NULL") == [(4,)]
    assert rows(db_url, "SELECT count(*) FROM job") == [(len(cases),)]  # the good ones only


def test_oversize_message_closes_the_connection(mllp_listener: RunningListener) -> None:
    big = mllp.frame(sample(ORM, "BIG2") + b"x" * (70 * 1024)) + mllp.frame(sample(ORM, "next"))
    frames = unframe(raw_exchange(mllp_listener.port, big, timeout=5))
    assert [msa_code(f) for f in frames] == ["AR"]  # answered, then closed: `next` is not read


def test_pipelined_messages_and_concurrent_connections(mllp_listener: RunningListener, db_url: str) -> None:
    wire = b"".join(mllp.frame(sample(OMI, f"P{i}")) for i in range(20))
    frames = unframe(raw_exchange(mllp_listener.port, wire, timeout=5))
    assert [ack_fields(f)["MSA"][2] for f in frames] == [f"P{i}" for i in range(20)]

    async def many() -> list[list[bytes]]:
        return await asyncio.gather(*(_exchange(mllp_listener.port, [sample(ORM, f"C{c}-{i}") for i in range(10)])
                                      for c in range(8)))

    results = asyncio.run(many())
    assert all(msa_code(a) == "AA" for answers in results for a in answers)
    assert rows(db_url, "SELECT count(*) FROM job") == [(100,)]


def test_idle_connection_is_closed(db_url: str) -> None:
    running = ListenerThread(listener_settings(db_url, INTEROP_MLLP_IDLE_SECONDS="1"))
    running.start()
    try:
        with socket.create_connection(("127.0.0.1", running.settings.mllp_port), timeout=10) as sock:
            started = time.monotonic()
            assert sock.recv(100) == b""  # closed by the listener, not by the 10 s socket timeout
            assert 0.5 < time.monotonic() - started < 5
        _good_message_accepted(running.settings.mllp_port, "after-idle")
    finally:
        running.stop()


def test_database_down_means_no_ack(tmp_path: Path) -> None:
    down = f"postgresql://hub@127.0.0.1:{free_port()}/hub"  # nothing listens there: a database down
    running = start_mllp_process(down, tmp_path)
    try:
        out = raw_exchange(running.port, mllp.frame(ORM.read_bytes()), timeout=30)
        assert out == b""  # closed without an answer: the sender will retry
        assert running.proc.poll() is None  # still listening
    finally:
        running.proc.terminate()
        running.proc.wait(15)
    log = running.log.read_text()
    assert "closed without ACK" in log
    assert "cannot be reached (connection refused); starting anyway" in log  # named at start, not fatal


def test_acknowledged_message_survives_sigkill(db_url: str, tmp_path: Path) -> None:
    running = start_mllp_process(db_url, tmp_path)
    try:
        answers = exchange(running.port, sample(OMI, "K1"), sample(ORM, "K2"))
        os.kill(running.proc.pid, signal.SIGKILL)  # right after the ACK
        running.proc.wait(10)
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
    assert [msa_code(a) for a in answers] == ["AA", "AA"]
    assert [(r[0], r[2]) for r in messages(db_url)] == [("K1", "accepted"), ("K2", "accepted")]
    assert len(jobs(db_url)) == 2
    # and a fresh listener answers the resend as a duplicate, with no new job
    again = start_mllp_process(db_url, tmp_path)
    try:
        assert msa_code(exchange(again.port, sample(ORM, "K2"))[0]) == "AA"
    finally:
        again.proc.terminate()
        assert again.proc.wait(15) == 0
    assert len(jobs(db_url)) == 2


def test_one_senders_messages_are_processed_in_arrival_order(mllp_listener: RunningListener, db_url: str) -> None:
    """Several workers share the queue (one per core): a second worker cannot take a sender's
    next message (the cancel) while its previous one (the order) is queued or running; another
    sender's message is not held up by them."""
    from interop.store import queue as jobs
    from interop.store.db import connect
    from tests.fixtures.mllp import orm, send

    answers = send(mllp_listener.port,
                   orm("ORD-1", placer="PL-ORD", filler="FL-ORD", accession="ACC-ORD"),
                   orm("ORD-2", order_control="CA", order_status="CA", placer="PL-ORD", filler="FL-ORD",
                       accession="ACC-ORD"),
                   orm("ORD-3", placer="PL-OTHER", filler="FL-OTHER", accession="ACC-OTHER", facility="BVTANPHU"))
    assert all("MSA|AA" in a for a in answers)
    with connect(db_url, autocommit=True) as conn:
        first = jobs.claim(conn, "worker-a", 60, kinds=["process-hl7"])
        other = jobs.claim(conn, "worker-b", 60, kinds=["process-hl7"])
        assert first is not None and other is not None
        ids = {j.payload["message"]: j for j in (first, other)}
        rows = conn.execute("SELECT id, control_id FROM hl7_message ORDER BY id").fetchall()
        by_control = {r["control_id"]: r["id"] for r in rows}
        assert set(ids) == {by_control["ORD-1"], by_control["ORD-3"]}  # the cancel waits for its order
        assert jobs.claim(conn, "worker-c", 60, kinds=["process-hl7"]) is None
        with conn.transaction():
            jobs.complete(conn, ids[by_control["ORD-1"]])
        cancel = jobs.claim(conn, "worker-c", 60, kinds=["process-hl7"])
        assert cancel is not None and cancel.payload["message"] == by_control["ORD-2"]

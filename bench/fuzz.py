#!/usr/bin/env python3
"""Fuzz the hub's two doors (issue 10): mutated HL7 v2 messages over MLLP and mutated FHIR
requests over HTTP, against `interop serve` on its embedded defaults. Not part of `make test`.

    python bench/fuzz.py [--hl7 20000] [--fhir 5000] [--seed 1] [--write]

Passes when: every HL7 message is answered (except where the message itself asks for no answer:
an ACK, or MSH-15 NE/SU/ER), the listener still accepts a good message after every batch, and no
FHIR request gets a 5xx; every 4xx is an OperationOutcome. Prints the figures (and, with --write,
appends them to docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import append_to_benchmarks  # noqa: E402
from interop.runtime.processes import free_port  # noqa: E402
from scripts import smart  # noqa: E402
from tests.fixtures.mllp import orm  # noqa: E402

SB, EB = b"\x0b", b"\x1c\x0d"
SAMPLES = sorted((ROOT / "tests" / "data" / "hl7v2").glob("*.hl7"))
ODD = ["", "\x00", "\x01\x02", "²", "２", "ñ" * 50, "Z" * 3000, "9" * 250, "^^^^", "~~~", "\\E\\", "&&&", "|", "\r",
       "\n", "2.5.²", "2.9.9.9", "AL", "NE", "ER", "SU", "ACK", "ORM^O01", "OMI^O23^OMI_O23", "ADT^A08", "CA", "-1",
       "%s%n", "' OR 1=1 --", "<x/>", "\ufeff", "\u202e", "\ud7ff", "🙂" * 40]


# -- HL7 ---------------------------------------------------------------------------------------
def base_messages(rng: random.Random) -> list[bytes]:
    out = [p.read_bytes() for p in SAMPLES]
    out += [orm(f"F{n}", patient_id=f"P{n}", accession=f"A{n}") for n in range(20)]
    return out


def mutate_hl7(message: bytes, rng: random.Random) -> bytes:
    text = message.decode("utf-8", "replace")
    segments = text.replace("\n", "\r").split("\r")
    kind = rng.randrange(10)
    if kind == 0:  # one MSH field replaced by an odd value
        fields = segments[0].split("|")
        n = rng.randrange(1, max(2, len(fields) + 3))
        while len(fields) <= n:
            fields.append("")
        fields[n] = rng.choice(ODD)
        segments[0] = "|".join(fields)
    elif kind == 1:  # any field of any segment
        i = rng.randrange(len(segments))
        fields = segments[i].split("|")
        fields[rng.randrange(len(fields))] = rng.choice(ODD)
        segments[i] = "|".join(fields)
    elif kind == 2:  # a segment dropped, duplicated or shuffled
        i = rng.randrange(len(segments))
        choice = rng.randrange(3)
        if choice == 0:
            del segments[i]
        elif choice == 1:
            segments.insert(i, segments[i])
        else:
            rng.shuffle(segments)
    elif kind == 3:  # delimiters changed
        if len(segments[0]) > 8:
            segments[0] = segments[0][:3] + rng.choice("|#^~&\\x1 ") + segments[0][4:8].replace(
                segments[0][4:8], "".join(rng.sample("^~\\&#$", 4))) + segments[0][8:]
    raw = "\r".join(segments).encode("utf-8", "surrogatepass")
    if kind == 4:  # bytes flipped
        data = bytearray(raw)
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        raw = bytes(data)
    elif kind == 5:  # truncated
        raw = raw[:rng.randrange(len(raw))]
    elif kind == 6:  # a byte-order mark, other line ends, trailing junk
        raw = rng.choice([b"\xef\xbb\xbf", b"", b"\r\n"]) + raw.replace(b"\r", rng.choice([b"\n", b"\r\n", b"\r"])) \
            + rng.choice([b"", b"\x00", b"\r\r\r", b" "])
    elif kind == 7:  # Latin-1 / odd charset labels
        raw = raw.replace(b"UNICODE UTF-8", rng.choice([b"8859/1", b"KLINGON", b"UNICODE UTF-16", b""]))
        raw = raw.replace("Ễ".encode(), "Ễ".encode("utf-16-le"))
    elif kind == 8:  # a long segment (under and over the 1 MiB limit)
        raw += b"\rNTE|1||" + b"x" * rng.choice([10, 70_000, 900_000, 1_200_000])
    return raw


def asks_for_no_answer(raw: bytes) -> bool:
    """An ACK, or MSH-15 NE/SU/ER, may rightly get no answer."""
    head = raw.lstrip(b"\xef\xbb\xbf").split(b"\r", 1)[0].split(b"\n", 1)[0]
    if not head.startswith(b"MSH") or len(head) < 4:
        return False
    fields = head.split(head[3:4])
    msh9 = fields[8] if len(fields) > 8 else b""
    msh15 = fields[14].strip().upper() if len(fields) > 14 else b""
    return msh9.upper().startswith(b"ACK") or msh15 not in (b"", b"AL")


def exchange(port: int, raw: bytes, timeout: float = 15) -> bytes | None:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(SB + raw + EB)
        data = b""
        try:
            while not data.endswith(EB):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    return data if data.endswith(EB) else None


def fuzz_hl7(port: int, n: int, rng: random.Random) -> dict[str, Any]:
    bases = base_messages(rng)
    counts: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    start = time.perf_counter()
    alive_checks = 0
    odd: list[bytes] = []
    for i in range(n):
        raw = mutate_hl7(rng.choice(bases), rng)
        answer = exchange(port, raw)
        if answer is None:
            counts["no answer (asked for none)" if asks_for_no_answer(raw) else "UNANSWERED"] += 1
        else:
            counts["answered"] += 1
            msa = next((s for s in answer[1:-2].split(b"\r") if s.startswith(b"MSA")), b"")
            code = msa[4:6].decode("ascii", "replace") if len(msa) > 5 else "?"
            codes[code] += 1
            if code == "?" and len(odd) < 3:
                odd.append(answer[:200])
        if (i + 1) % 1000 == 0:
            good = exchange(port, orm(f"ALIVE{i}", patient_id=f"AL{i}", accession=f"AL{i}"))
            assert good is not None and b"MSA|AA" in good, f"the listener did not accept a good message after {i + 1}"
            alive_checks += 1
    return {"messages": n, "seconds": round(time.perf_counter() - start, 1), "outcomes": dict(counts),
            "ack_codes": dict(codes), "alive_checks": alive_checks, "answers_without_msa": [repr(a) for a in odd]}


# -- FHIR --------------------------------------------------------------------------------------
def fhir_bases() -> list[tuple[str, str, dict[str, Any]]]:
    study = {"resourceType": "ImagingStudy", "status": "available",
             "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}], "subject": {"reference": "Patient/p1"},
             "contained": [{"resourceType": "Endpoint", "id": "pacs", "status": "active",
                            "connectionType": {"code": "dicom-wado-rs"}, "payloadType": [{"text": "DICOM"}],
                            "address": "http://127.0.0.1:9/dicom-web"}], "endpoint": [{"reference": "#pacs"}]}
    patient = {"resourceType": "Patient", "gender": "female", "birthDate": "1970-01-01",
               "name": [{"family": "Nguyễn", "given": ["Thị"]}], "identifier": [{"system": "urn:x", "value": "1"}]}
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "action", "valueCode": "sign"}, {"name": "reviewer", "valueString": "BS. A"},
        {"name": "finding", "part": [{"name": "observation", "valueReference": {"reference": "Observation/x"}},
                                     {"name": "present", "valueBoolean": True}]}]}
    sub = {"resourceType": "Subscription", "status": "requested", "reason": "r",
           "criteria": "DiagnosticReport?status=final", "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/h"}}
    return [("POST", "/fhir/ImagingStudy", study), ("POST", "/fhir/Patient", patient),
            ("POST", "/fhir/DiagnosticReport/x/$review", params), ("POST", "/fhir/Subscription", sub),
            ("PUT", "/fhir/Patient/p1", {**patient, "id": "p1"})]


def odd_value(rng: random.Random, depth: int = 0) -> Any:
    choices: list[Any] = [{}, [], [[]], None, True, 0, -1, 1e308, 2**70, -(2**63), "", "\u0000", "\ud800",
                          "x" * rng.choice([10, 600, 5000]), {"a": 1}, [1, "b"], "2026-13-45", "urn:oid:",
                          "Patient/..%2F", "☃", {"reference": 5}, {"reference": "Patient/" + "x" * 700},
                          {"coding": [{"system": "\u0000", "code": {}}]}, {"value": "9" * 600, "system": "urn:x"}]
    if depth < 3:
        choices.append({"nested": odd_value(rng, depth + 1)})
        choices.append([odd_value(rng, depth + 1)])
    return rng.choice(choices)


def mutate_json(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict) and value:
        out = dict(value)
        key = rng.choice(list(out))
        action = rng.randrange(4)
        if action == 0:
            out[key] = odd_value(rng)
        elif action == 1:
            del out[key]
        elif action == 2:
            out[key] = mutate_json(out[key], rng)
        else:
            out[rng.choice(["extension", "meta", "id", "resourceType", "contained", "zzz"])] = odd_value(rng)
        return out
    if isinstance(value, list) and value:
        out_list = list(value)
        i = rng.randrange(len(out_list))
        out_list[i] = mutate_json(out_list[i], rng) if rng.random() < 0.7 else odd_value(rng)
        return out_list
    return odd_value(rng)


def fuzz_request(rng: random.Random, bases: list[tuple[str, str, dict[str, Any]]]) -> tuple[str, str, bytes, dict[str, str]]:
    kind = rng.randrange(6)
    headers = {"Content-Type": "application/fhir+json"}
    if kind <= 2:
        method, path, body = rng.choice(bases)
        for _ in range(rng.randrange(1, 4)):
            body = mutate_json(body, rng)
        return method, path, json.dumps(body).encode(), headers
    if kind == 3:  # not JSON, or JSON too deep
        method, path, _ = rng.choice(bases)
        depth = rng.choice([10, 300, 2000])
        raw = rng.choice([b"{", b"\xff\xfe", b"[]", b"null", b'{"resourceType": 5}',
                          b'{"resourceType":"Patient","extension":' + b"[" * depth + b"]" * depth + b"}"])
        return method, path, raw, headers
    if kind == 4:  # searches with odd values
        rtype = rng.choice(["Patient", "DiagnosticReport", "ImagingStudy", "Task", "Nope"])
        param = rng.choice(["name", "identifier", "_id", "status", "_lastUpdated", "_count", "patient", "x:y", "_sort",
                            "_include", "subject:not"])
        value = rng.choice(["a", "%00", "%C2%B2", "gt2026", "ge2026-01-01T00:00:00", "-1", "9" * 700, "a|b|c", "..",
                            "Patient/%00", "%", "%ZZ"])
        return "GET", f"/fhir/{rtype}?{param}={value}", b"", {}
    path = rng.choice(["/fhir/Patient/%00", "/fhir/Patient/" + "x" * 80, "/fhir/Patient/p1/_history/²",
                       "/fhir/Patient/p1/_history/99999999999999999999", "/fhir/%2e%2e/etc", "/fhir/Patient/a b",
                       "/outbox/1/replay", "/hl7/messages?status=nope", "/outbox?status=", "/worklist/%00",
                       "/analytics/api/workload?start=2026-99-99", "/fhir/DiagnosticReport/x/$acknowledge-critical",
                       "/auth/token", "/login", "/fhir/AuditEvent?date=nope", "/fhir/AuditEvent/1"])
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
    return method, path, b"{}", headers


def fuzz_fhir(base: str, n: int, rng: random.Random, session: requests.Session) -> dict[str, Any]:
    bases = fhir_bases()
    statuses: Counter[int] = Counter()
    not_outcome = 0
    server_errors: list[str] = []
    start = time.perf_counter()
    for _ in range(n):
        method, path, body, headers = fuzz_request(rng, bases)
        response = session.request(method, base + path, data=body or None, headers=headers, timeout=30,
                                   allow_redirects=False)
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            server_errors.append(f"{method} {path[:80]} {body[:120]!r}")
        elif 400 <= response.status_code < 500 and path.startswith("/fhir"):
            try:
                if response.json().get("resourceType") != "OperationOutcome":
                    not_outcome += 1
            except ValueError:
                not_outcome += 1
    return {"requests": n, "seconds": round(time.perf_counter() - start, 1),
            "statuses": dict(sorted(statuses.items())), "5xx": len(server_errors), "4xx_not_operation_outcome": not_outcome,
            "first_5xx": server_errors[:5]}


SCOPES = "system/*.cruds hub:admin hub:analytics hub:metrics"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hl7", type=int, default=20_000)
    parser.add_argument("--fhir", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="append the figures to docs/BENCHMARKS.md")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fuzz-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    http, mllp = free_port(), free_port()
    env = {**os.environ, "INTEROP_DATA_DIR": str(work), "INTEROP_HTTP_PORT": str(http), "INTEROP_MLLP_PORT": str(mllp),
           "INTEROP_DICOM_PORT": str(free_port()),
           "INTEROP_TRITON_MODELS": "chest_xray", "INTEROP_MLLP_MAX_BYTES": str(1024 * 1024)}
    log = (work / "hub.log").open("wb")
    hub = subprocess.Popen([sys.executable, "-m", "interop.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        hl7 = fuzz_hl7(mllp, args.hl7, rng)
        # as a backend client with every scope, so that the requests reach the views (issue 12)
        key = smart.ClientKey.new()
        (work / "jwks.json").write_text(json.dumps(key.jwks))
        client_id = subprocess.run([sys.executable, "-m", "interop.cli", "clients", "add", "fuzz", "--jwks",
                                    str(work / "jwks.json"), "--scopes", SCOPES], env=env, capture_output=True,
                                   text=True, check=True).stdout.split()[-1]
        fhir = fuzz_fhir(base, args.fhir, rng, smart.session(smart.Smart(f"{base}/auth/token", client_id, key, SCOPES)))
    finally:
        hub.terminate()
        hub.wait(60)
    passed = hl7["outcomes"].get("UNANSWERED", 0) == 0 and fhir["5xx"] == 0 and fhir["4xx_not_operation_outcome"] == 0
    report = {"date": time.strftime("%Y-%m-%d"), "seed": args.seed, "hl7": hl7, "fhir": fhir, "passed": passed,
              "hub_log_errors": (work / "hub.log").read_text(errors="replace").count(" ERROR ")}
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.write:
        text = (f"\n## Fuzzing the two doors (issue 10)\n\n`python bench/fuzz.py --hl7 {args.hl7} --fhir {args.fhir}"
                f" --seed {args.seed}` on {os.cpu_count()} CPUs, `interop serve` on its embedded defaults,"
                f" {report['date']}:\n\n"
                f"- HL7 v2 over MLLP: {hl7['messages']:,} mutated messages in {hl7['seconds']} s; outcomes"
                f" {hl7['outcomes']}; ACK codes {hl7['ack_codes']}; a good message accepted after each of"
                f" {hl7['alive_checks']} batches of 1,000.\n"
                f"- FHIR over HTTP: {fhir['requests']:,} mutated requests in {fhir['seconds']} s; statuses"
                f" {fhir['statuses']}; 5xx: {fhir['5xx']}; 4xx without an OperationOutcome: "
                f"{fhir['4xx_not_operation_outcome']}.\n")
        append_to_benchmarks(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

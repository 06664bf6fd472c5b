#!/usr/bin/env python3
"""Replicas killed mid-run (issue 14): the hub as Kubernetes runs it, on this machine.

Every process of the hub on its own, as the Deployments in deploy/k8s run them: 2 API replicas
(gunicorn with `interop.supervisor.gunicorn_args`, 2 workers each), 2 MLLP listeners
(`interop mllp`), 2 analysis workers (`interop worker`) and 1 delivery runner (`interop deliver`),
against one PostgreSQL (embedded), one Triton (bundled, chest model only) and Orthanc as the PACS.
Debian's haproxy stands for the Services: an HTTP frontend over the API replicas (health check
/healthz) and a TCP frontend over the MLLP listeners. Every replica has its own data directory and
ports, and shares INTEROP_BASE_URL (the address the clients see), so a token one API replica
issues is accepted by the other (the signing key is the database's, made once).

The hospital's side: a HIS sends N ORM^O01 orders over MLLP through haproxy (8 connections; an
order not acknowledged is sent again, as integration engines do: tests/fixtures/mllp.Resender);
a SMART backend client POSTs S ImagingStudies through haproxy (retried on a connection error or a
5xx; the hub keeps one study per Study Instance UID). Results go to the site's RIS (python-hl7's
MLLP server, ORU^R01) and EMR (Medplum's FHIR router, tests/peers/fhir_server.mjs).

When 40 % of the orders are acknowledged, one replica of each kind is killed with SIGKILL (the
whole process group, as a pod dies): an API replica, an MLLP listener, the analysis worker that
holds the most running jobs, and the delivery runner; each is started again after
--restart-delay seconds, as a Deployment does. INTEROP_JOB_LEASE_SECONDS is short (10 s), so the
jobs a dead process held are taken over soon.

Checks, from PostgreSQL and the receivers: every order stored once (N ServiceRequests, one per
placer number), one DiagnosticReport per study and model, every analysis and delivery job done
(nothing queued, running, failed or dead), each study's result at the RIS and one report per
study at the EMR. Duplicates at the RIS are counted and reported: an ORU resent after its sender
died carries the same MSH-10, which an HL7 receiver dedupes.

    python bench/replicas.py [--orders 1000] [--studies 50] [--out bench/results/replicas.json]

Exits 0 when every check holds, 1 otherwise (the JSON says which).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interop.config import Settings  # noqa: E402
from interop.dicom.study import imaging_study  # noqa: E402
from interop.runtime.postgres import EmbeddedPostgres  # noqa: E402
from interop.runtime.processes import free_port  # noqa: E402
from interop.runtime.supervisor import gunicorn_args  # noqa: E402
from interop.runtime.triton import BundledTriton  # noqa: E402
from interop.store.db import connect, migrate  # noqa: E402
from scripts.peers.orthanc import Orthanc  # noqa: E402
from scripts.smart import ClientKey  # noqa: E402
from scripts.synthetic.dicom import dataset_bytes, make_chest_xray  # noqa: E402
from tests.fixtures.auth import Smart, register_with_cli, session_for  # noqa: E402
from tests.fixtures.fhir_server import PEERS, SERVER, TOKEN, Emr  # noqa: E402
from tests.fixtures.hub import TEST_URL_ALLOW  # noqa: E402
from tests.fixtures.mllp import Receiver, Resender, orm  # noqa: E402

SITE = "BVDKDN"
MODEL = "chest-xray"  # the model the chest studies are routed to: one report per study
LEASE_SECONDS = 10
STUDY_CODE_OBX = "ST"  # the OBX of an ORU that carries the Study Instance UID (hl7/oru.py)


# -- the hub's processes, one per replica ------------------------------------------------------------
@dataclass
class Replica:
    """One process of the hub (a pod's container): started in its own process group, killed whole."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=ROOT, start_new_session=True)
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """To the whole process group (gunicorn's workers too), without waiting."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the group and wait until the process, and with SIGKILL every process of its group, is gone."""
        if self.proc is None:
            return
        self.send_signal(sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if sig != signal.SIGKILL:
            return
        while True:  # a pod is gone when all of its processes are (gunicorn's workers too)
            try:
                os.killpg(self.proc.pid, 0)
                time.sleep(0.05)
            except ProcessLookupError:
                return

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def api_ready(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_until(what: str, probe: Callable[[], Any], timeout: float, replicas: Sequence[Replica] = ()) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for replica in replicas:
            if not replica.alive():
                raise RuntimeError(f"{replica.name} exited with {replica.proc and replica.proc.returncode}:\n{replica.tail()}")
        found = probe()
        if found:
            return found
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def ready(replica: Replica) -> bool:
    if replica.port is None:
        return replica.alive()
    return api_ready(replica.port) if replica.name.startswith("api") else listening(replica.port)


# -- haproxy: the Services ---------------------------------------------------------------------------
HAPROXY_CFG = """\
global
    maxconn 2000

defaults
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch

frontend fhir
    mode http
    bind 127.0.0.1:{http}
    default_backend api

backend api
    mode http
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 1s fall 2 rise 1
{api_servers}

frontend hl7
    mode tcp
    bind 127.0.0.1:{mllp}
    default_backend mllp

backend mllp
    mode tcp
    balance leastconn
    default-server inter 1s fall 2 rise 1
{mllp_servers}
"""


@contextmanager
def haproxy(work: Path, http: int, mllp: int, api_ports: list[int], mllp_ports: list[int]) -> Iterator[None]:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        raise RuntimeError("haproxy is not installed: `make system-deps` (Debian's haproxy)")
    cfg = work / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(
        http=http, mllp=mllp,
        api_servers="\n".join(f"    server api{i} 127.0.0.1:{p} check" for i, p in enumerate(api_ports)),
        mllp_servers="\n".join(f"    server mllp{i} 127.0.0.1:{p} check" for i, p in enumerate(mllp_ports))))
    subprocess.run([binary, "-c", "-q", "-f", str(cfg)], check=True)
    log = (work / "haproxy.log").open("wb")
    proc = subprocess.Popen([binary, "-f", str(cfg), "-db"], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# -- the site's EMR: Medplum's FHIR router (the test peer) -------------------------------------------
@contextmanager
def medplum_emr(work: Path) -> Iterator[Emr]:
    node = shutil.which("node")
    if node is None or not (PEERS / "node_modules" / "@medplum" / "fhir-router").exists():
        raise RuntimeError("the EMR needs node and tests/peers/node_modules: run `make test` once (npm install)")
    port = free_port()
    log = work / "fhir-emr.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([node, str(SERVER), str(port), TOKEN], cwd=PEERS, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until("the EMR", lambda: "listening" in log.read_text(errors="replace") or proc.poll() is not None, 60)
        if proc.poll() is not None:
            raise RuntimeError(f"the EMR exited:\n{log.read_text()[-2000:]}")
        yield Emr(f"http://127.0.0.1:{port}", TOKEN, proc, log)
    finally:
        proc.terminate()
        proc.wait(10)


# -- the hospital's side: studies through the API ----------------------------------------------------
@dataclass
class Poster:
    """A HIS pushing ImagingStudies: each POST until it is answered 200/201; resends on a lost
    connection or a 5xx (haproxy's 502/503 when a replica died under the request)."""

    session: requests.Session
    url: str
    posted: dict[str, int] = field(default_factory=dict)  # study UID -> status of the final answer
    retries: Counter[str] = field(default_factory=Counter)  # why a POST was sent again
    refused: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def post(self, uid: str, body: dict[str, Any], deadline: float, attempts: int = 30) -> None:
        for _ in range(attempts):
            if time.monotonic() > deadline:
                break
            try:
                answer = self.session.post(self.url, json=body, timeout=60,
                                           headers={"Content-Type": "application/fhir+json"})
            except requests.RequestException as exc:
                with self.lock:
                    self.retries[type(exc).__name__] += 1
                time.sleep(0.3)
                continue
            if answer.status_code >= 500:
                with self.lock:
                    self.retries[f"HTTP {answer.status_code}"] += 1
                time.sleep(0.3)
                continue
            with self.lock:
                if answer.status_code in (200, 201):
                    self.posted[uid] = answer.status_code
                else:
                    self.refused[uid] = f"{answer.status_code} {answer.text[:200]}"
            return
        with self.lock:
            self.refused[uid] = "no answer but a 5xx or a lost connection, every attempt"


class PacedResender(Resender):
    """The engine of tests/fixtures/mllp.Resender, sending at most `rate` messages a second in all
    (0: as fast as the hub answers), as a HIS sends its day's orders."""

    def __init__(self, port: int, messages: list[tuple[str, bytes]], *, connections: int, deadline_s: float, rate: float):
        super().__init__(port, messages, connections=connections, deadline_s=deadline_s)
        self.interval = connections / rate if rate > 0 else 0.0

    def _exchange(self, sock: socket.socket, payload: bytes) -> str:
        if self.interval:
            time.sleep(self.interval)
        return super()._exchange(sock, payload)


# -- the checks --------------------------------------------------------------------------------------
def job_counts(conn: Any) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in conn.execute("SELECT kind, status, count(*) AS n FROM job GROUP BY kind, status ORDER BY kind, status"):
        out.setdefault(row["kind"], {})[row["status"]] = row["n"]
    return out


RECURRING = ("refresh-analytics",)  # always one queued for later: not work left over from the run


def processed(db_url: str, orders: int, studies: int) -> bool:
    with connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE kind = 'process-hl7') AS orders, count(*) FILTER (WHERE kind = 'analyse-study')"
            " AS studies FROM job WHERE status IN ('done', 'failed', 'dead')").fetchone()
    assert row is not None
    return bool(row["orders"] >= orders and row["studies"] >= studies)


def drained(db_url: str, studies: int) -> bool:
    with connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status IN ('queued', 'running') AND kind <> ALL(%s)) AS open,"
            " count(*) FILTER (WHERE kind = 'analyse-study' AND status IN ('done', 'failed', 'dead')) AS analysed,"
            " count(*) FILTER (WHERE kind IN ('deliver-hl7', 'deliver-fhir')"
            "                  AND status IN ('done', 'rejected', 'dead')) AS delivered FROM job", (list(RECURRING),)).fetchone()
    assert row is not None
    return bool(row["open"] == 0 and row["analysed"] >= studies and row["delivered"] >= 2 * studies)


def service_requests(conn: Any, placers: list[str]) -> dict[str, Any]:
    rows = conn.execute(
        "SELECT ident->>'value' AS placer, count(*) AS n FROM resource r,"
        " jsonb_array_elements(r.body->'identifier') ident"
        " WHERE r.type = 'ServiceRequest' AND NOT r.deleted"
        "   AND ident->'type'->'coding' @> '[{\"code\": \"PLAC\"}]'"
        " GROUP BY 1").fetchall()
    by_placer = {row["placer"]: row["n"] for row in rows}
    return {"stored": sum(by_placer.values()), "distinct_placers": len(by_placer),
            "lost": sum(1 for p in placers if p not in by_placer),
            "duplicated": sum(1 for n in by_placer.values() if n > 1)}


def reports(conn: Any, uids: list[str]) -> dict[str, Any]:
    rows = conn.execute(
        "SELECT ident->>'value' AS key, count(*) AS n FROM resource r, jsonb_array_elements(r.body->'identifier') ident"
        " WHERE r.type = 'DiagnosticReport' AND NOT r.deleted AND ident->>'system' = 'urn:interop-hub:report'"
        " GROUP BY 1").fetchall()
    by_key = {row["key"]: row["n"] for row in rows}
    return {"stored": sum(by_key.values()), "studies_with_report": sum(1 for u in uids if f"{u}/{MODEL}" in by_key),
            "missing": sum(1 for u in uids if f"{u}/{MODEL}" not in by_key),
            "duplicated": sum(1 for n in by_key.values() if n > 1)}


def ris_results(ris: Receiver, uids: list[str]) -> dict[str, Any]:
    per_study: dict[str, list[str]] = {}
    for message in list(ris.messages):
        if not str(message.segment("MSH")[9]).startswith("ORU"):
            continue
        uid = next((str(s[5]) for s in message.segments("OBX") if str(s[2]) == STUDY_CODE_OBX), "")
        per_study.setdefault(uid, []).append(str(message.segment("MSH")[10]))
    extra = {u: ids for u, ids in per_study.items() if len(ids) > 1}
    return {"orus_received": sum(len(ids) for ids in per_study.values()),
            "studies_received": sum(1 for u in uids if u in per_study),
            "missing": sum(1 for u in uids if u not in per_study),
            "studies_received_twice_or_more": len(extra),
            "duplicates_with_the_same_msh10": sum(len(ids) - len(set(ids)) for ids in extra.values()),
            "duplicates_with_a_new_msh10": sum(len(set(ids)) - 1 for ids in extra.values())}


def emr_results(emr: Emr, uids: list[str]) -> dict[str, Any]:
    counts = [len(emr.search("DiagnosticReport", identifier=f"urn:interop-hub:report|{u}/{MODEL}")) for u in uids]
    return {"studies_with_one_report": sum(1 for n in counts if n == 1), "missing": sum(1 for n in counts if n == 0),
            "duplicated": sum(1 for n in counts if n > 1),
            "transactions_received": sum(1 for r in emr.requests() if r.get("method") == "POST")}


# -- the run -----------------------------------------------------------------------------------------
def run(n_orders: int, n_studies: int, *, kill_at: float = 0.4, restart_delay: float = 2.0, order_rate: float = 0,
        timeout: float = 900, http_workers: int = 2, keep: bool = False) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="interop-replicas-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    began = time.perf_counter()
    marks: dict[str, float] = {}

    def mark(what: str) -> None:
        marks[what] = round(time.perf_counter() - began, 2)

    replicas: list[Replica] = []
    ris = Receiver()
    try:
        with Orthanc(work / "pacs") as pacs, EmbeddedPostgres(work / "pg") as pg, \
                BundledTriton(ROOT / "triton_repo", work / "triton", environ=os.environ, models=("chest_xray",),
                              load_only=("chest_xray",)) as triton, medplum_emr(work) as emr:
            migrate(pg.url)
            mark("peers_ready")
            studies: list[tuple[str, dict[str, Any]]] = []
            for i in range(n_studies):
                ds = make_chest_xray(seed=7000 + i, size=256, accession=f"RS{i:04d}", patient_id=f"RSP{i:04d}")
                pacs.upload(dataset_bytes(ds))
                studies.append((str(ds.StudyInstanceUID),
                                imaging_study([ds], subject=f"Patient/rsp{i}", endpoint_address=pacs.dicomweb_url)))
            uids = [uid for uid, _ in studies]
            orders = [(f"K{n}", orm(f"K{n}", placer=f"KP{n}", filler=f"KF{n}", accession=f"KA{n}", patient_id=f"KPAT{n}"))
                      for n in range(n_orders)]
            placers = [f"KP{n}" for n in range(n_orders)]

            sites = work / "sites.yaml"
            sites.write_text(yaml.safe_dump({"sites": {SITE: {
                "name": "Benh vien Da khoa Dong Nai", "district": "Bien Hoa", "province": "Dong Nai",
                "dicomweb": pacs.dicomweb_url, "pacs_wait_minutes": 1,
                "hl7": {"host": "127.0.0.1", "port": ris.port, "receiving_application": "RIS"},
                "fhir": {"base": emr.base, "max_bundle_entries": 8, "auth": {"type": "bearer", "token_env": "EMR_TOKEN"}},
            }}}), encoding="utf-8")
            lb_http, lb_mllp = free_port(), free_port()
            shared = {**os.environ, "DATABASE_URL": pg.url, "TRITON_URL": triton.url, "DICOMWEB_URL": pacs.dicomweb_url,
                      "INTEROP_SITES": str(sites), "INTEROP_URL_ALLOW": TEST_URL_ALLOW, "EMR_TOKEN": emr.token,
                      "INTEROP_BASE_URL": f"http://127.0.0.1:{lb_http}/fhir",
                      "INTEROP_PSEUDONYM_KEY": "replicas-bench-pseudonym-secret",
                      "INTEROP_JOB_LEASE_SECONDS": str(LEASE_SECONDS), "INTEROP_RETRY_BASE_SECONDS": "1",
                      "INTEROP_HTTP_WORKERS": str(http_workers), "PYTHONUNBUFFERED": "1"}

            def replica(name: str, command: str, **env: str) -> Replica:
                data = work / name
                data.mkdir()
                own = {**shared, "INTEROP_DATA_DIR": str(data), "INTEROP_HTTP_PORT": str(free_port()),
                       "INTEROP_MLLP_PORT": str(free_port()), "INTEROP_DICOM_PORT": str(free_port()), **env}
                port: int | None = None
                if command == "api":
                    (data / "metrics").mkdir()
                    own["PROMETHEUS_MULTIPROC_DIR"] = str(data / "metrics")
                    argv, port = gunicorn_args(Settings.from_env(own)), int(own["INTEROP_HTTP_PORT"])
                else:
                    argv = [sys.executable, "-m", "interop.cli", command]
                    port = int(own["INTEROP_MLLP_PORT"]) if command == "mllp" else None
                made = Replica(name, argv, own, work / f"{name}.log", port)
                replicas.append(made)
                return made

            apis = [replica(f"api-{i}", "api") for i in range(2)]
            mllps = [replica(f"mllp-{i}", "mllp") for i in range(2)]
            workers = [replica(f"worker-{i}", "worker") for i in range(2)]
            deliver = replica("deliver-0", "deliver")
            for r in replicas:
                r.start()
            wait_until("every replica", lambda: all(ready(r) for r in replicas), 180, replicas)
            mark("replicas_ready")
            with haproxy(work, lb_http, lb_mllp, [r.port for r in apis if r.port], [r.port for r in mllps if r.port]):
                wait_until("haproxy", lambda: api_ready(lb_http) and listening(lb_mllp), 30)
                key = ClientKey.new()
                auth = Smart(f"http://127.0.0.1:{lb_http}/auth/token", register_with_cli(shared, work, key), key)
                auth.token()  # the client has its token before it starts sending, as a running HIS does
                poster = Poster(session_for(auth), f"http://127.0.0.1:{lb_http}/fhir/ImagingStudy")
                sender = PacedResender(lb_mllp, orders, connections=8, deadline_s=timeout, rate=order_rate)
                deadline = time.monotonic() + timeout
                kills: dict[str, Any] = {}

                def post_studies() -> None:
                    """Studies spread over the orders' run: study i goes once i/S of the orders are acknowledged."""
                    todo: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()

                    def post_loop() -> None:
                        while (item := todo.get()) is not None:
                            poster.post(item[0], item[1], deadline)

                    threads = [threading.Thread(target=post_loop, daemon=True) for _ in range(4)]
                    for thread in threads:
                        thread.start()
                    for i, item in enumerate(studies):
                        while len(sender.acked) < n_orders * i // max(1, n_studies) and time.monotonic() < deadline:
                            time.sleep(0.02)
                        todo.put(item)
                    for _ in threads:
                        todo.put(None)
                    for thread in threads:
                        thread.join(max(1.0, deadline - time.monotonic()))

                def killer() -> None:
                    try:
                        kill_and_restart()
                    except Exception as exc:  # reported in the result: the checks then fail
                        kills["error"] = repr(exc)

                def kill_and_restart() -> None:
                    held: dict[str, int] = {}  # pid -> jobs it holds a lease on, polled up to the moment
                    with connect(pg.url, autocommit=True) as conn:
                        while len(sender.acked) < n_orders * kill_at and time.monotonic() < deadline:
                            held = {row["pid"]: row["n"] for row in conn.execute(
                                "SELECT split_part(worker, ':', 2) AS pid, count(*) AS n FROM job"
                                " WHERE status = 'running' AND leased_until > now() GROUP BY 1")}
                            time.sleep(0.1)
                        mark("kill_triggered")

                        def pid(r: Replica) -> str:
                            return str(r.proc.pid if r.proc else 0)

                        victim_worker = max(workers, key=lambda w: held.get(pid(w), 0))
                        victims = [apis[0], mllps[0], victim_worker, deliver]
                        for victim in victims:  # all four at once, as a node dies
                            victim.send_signal(signal.SIGKILL)
                        mark("killed")
                        kills["jobs_leased_by_the_killed"] = {v.name: held.get(pid(v), 0) for v in (victim_worker, deliver)}
                        kills["orders_acked_at_kill"] = len(sender.acked)
                        kills["studies_posted_at_kill"] = len(poster.posted)
                        kills["jobs_at_kill"] = job_counts(conn)
                    for victim in victims:
                        victim.kill()
                    kills["killed"] = [v.name for v in victims]
                    time.sleep(restart_delay)
                    for victim in victims:
                        victim.start()
                    mark("restarted")
                    wait_until("the restarted replicas", lambda: all(ready(v) for v in victims), 180, victims)
                    mark("restarted_replicas_ready")

                threads = [threading.Thread(target=post_studies, daemon=True), threading.Thread(target=killer, daemon=True)]
                mark("sending")
                for thread in threads:
                    thread.start()
                acked = sender.run()
                mark("orders_acked")
                for thread in threads:
                    thread.join(max(1.0, deadline - time.monotonic()))
                mark("studies_posted")
                stages: list[tuple[str, Callable[[], bool]]] = [
                    ("orders_processed_and_studies_analysed", lambda: processed(pg.url, n_orders, n_studies)),
                    ("every_result_at_the_ris", lambda: ris_results(ris, uids)["missing"] == 0),
                    ("drained", lambda: drained(pg.url, n_studies))]
                try:
                    for stage, probe in stages:
                        wait_until(stage, probe, max(1.0, deadline - time.monotonic()))
                        mark(stage)
                except RuntimeError as exc:
                    kills["drain_error"] = str(exc)
                time.sleep(1)  # anything late (a resend) arrives now, or not at all
                with connect(pg.url) as conn:
                    orders_db = service_requests(conn, placers)
                    reports_db = reports(conn, uids)
                    jobs = job_counts(conn)
                    messages = conn.execute("SELECT count(*) AS n, count(DISTINCT control_id) AS ids FROM hl7_message"
                                            " WHERE status <> 'rejected'").fetchone()
                ris_seen = ris_results(ris, uids)
                emr_seen = emr_results(emr, uids)
                alive = {r.name: r.alive() for r in replicas}
            for r in replicas:
                r.kill(signal.SIGTERM)
    finally:
        for r in replicas:
            if r.alive():
                r.kill()
        ris.stop()
    open_jobs = {k: {s: n for s, n in v.items() if s in ("queued", "running", "failed", "dead", "rejected")}
                 for k, v in jobs.items() if k not in RECURRING}
    open_jobs = {k: v for k, v in open_jobs.items() if v}
    checks = {
        "orders_acknowledged": len(acked) == n_orders,
        "orders_stored_once": orders_db["distinct_placers"] == n_orders and orders_db["lost"] == 0
        and orders_db["duplicated"] == 0 and orders_db["stored"] == n_orders,
        "studies_accepted": len(poster.posted) == n_studies and not poster.refused,
        "one_report_per_study": reports_db["missing"] == 0 and reports_db["duplicated"] == 0
        and reports_db["stored"] == n_studies,
        "no_job_open_failed_or_dead": not open_jobs,
        "every_result_at_the_ris": ris_seen["missing"] == 0,
        "one_report_per_study_at_the_emr": emr_seen["studies_with_one_report"] == n_studies,
        "every_replica_running_at_the_end": all(alive.values()),
    }
    result = {
        "what": f"{n_orders} HL7 orders over MLLP{f' at {order_rate:g}/s' if order_rate else ''} and {n_studies} FHIR"
                " ImagingStudies through haproxy to 2 API, 2 MLLP,"
                " 2 analysis and 1 delivery process on one PostgreSQL; one of each kind killed with SIGKILL"
                f" at {int(kill_at * 100)} % of the orders, restarted after {restart_delay} s",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "passed": all(checks.values()),
        "checks": checks,
        "kills": kills,
        "timeline_s": marks,
        "orders": {"acknowledged": len(acked), "resends_by_the_engine": sender.resends,
                   "hl7_messages_held": messages["n"] if messages else None, **orders_db},
        "studies": {"posted": len(poster.posted), "retried_posts": dict(poster.retries), "refused": poster.refused},
        "reports": reports_db,
        "jobs": jobs,
        "ris": ris_seen,
        "emr": emr_seen,
        "orders_acked_in_s": round(marks["orders_acked"] - marks["sending"], 2),
        **{f"{stage}_in_s": round(marks[stage] - marks["sending"], 2) if stage in marks else None
           for stage in ("orders_processed_and_studies_analysed", "every_result_at_the_ris", "drained")},
        "workdir": str(work) if keep else None,
    }
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--kill-at", type=float, default=0.4, help="share of the orders acknowledged when the kills happen")
    parser.add_argument("--restart-delay", type=float, default=2.0)
    parser.add_argument("--order-rate", type=float, default=50,
                        help="orders a second from the HIS, all connections together (0: as fast as the hub acknowledges)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--http-workers", type=int, default=2, help="gunicorn workers per API replica")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs of every replica)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "replicas.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop every process this run started
    result = run(args.orders, args.studies, kill_at=args.kill_at, restart_delay=args.restart_delay, order_rate=args.order_rate,
                 timeout=args.timeout, http_workers=args.http_workers, keep=args.keep)
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""FHIR create and search at scale (issue 14), to set against HAPI FHIR's published figures
(382 creates/s and 126 searches/s per vCPU at 1M resources).

Loads --resources resources (a third each Patients with Vietnamese names, ImagingStudies and
DiagnosticReports of those patients) into a fresh database with COPY, each with the index rows the
store itself computes (`resources.index_entries`), then serves the hub as operators do (gunicorn,
--workers) and drives it with `wrk` (Debian package) through the HTTP API with a SMART token:
searches only (a mix: family, given and name prefixes with and without accents, identifier,
patient of a study or report, _lastUpdated), creates only (POST Patient), then both (one create
per nine searches). Rates are per vCPU of the machine (hub, PostgreSQL and wrk share it).

    python bench/fhir_search.py [--resources 1000000] [--seconds 15] [--connections 8] [--workers 2]
    python bench/fhir_search.py --before 003bb35   # and the hub before issue 14, on the same data
    python bench/fhir_search.py --resources 30000 --only create --rounds 4 --workers 2,4 --before HEAD~1
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fresh_database  # noqa: E402
from interop.runtime.processes import free_port  # noqa: E402
from interop.store import resources, search_params  # noqa: E402
from scripts import smart  # noqa: E402

FAMILIES = [("Nguyễn", 38), ("Trần", 11), ("Lê", 9.5), ("Phạm", 7), ("Hoàng", 5), ("Huỳnh", 5), ("Phan", 4.5),
            ("Vũ", 3.9), ("Võ", 3), ("Đặng", 2.1), ("Bùi", 2), ("Đỗ", 1.4), ("Hồ", 1.3), ("Ngô", 1.3),
            ("Dương", 1), ("Lý", 0.5), ("Đinh", 0.5), ("Trương", 0.5), ("Lâm", 0.4), ("Mai", 0.3)]
MIDDLE = ["Văn", "Thị", "Đức", "Hữu", "Minh", "Quang", "Ngọc", "Thanh", "Xuân", "Công"]
GIVEN = ["An", "Anh", "Bảo", "Bình", "Châu", "Cường", "Dũng", "Duy", "Giang", "Hà", "Hải", "Hạnh", "Hiếu", "Hoa",
         "Hùng", "Hương", "Khánh", "Khoa", "Lan", "Linh", "Long", "Mai", "Nam", "Nga", "Ngân", "Nhung", "Phong",
         "Phúc", "Phương", "Quân", "Quỳnh", "Sơn", "Tâm", "Thảo", "Thắng", "Thủy", "Tiến", "Trang", "Trung", "Tú",
         "Tuấn", "Uyên", "Việt", "Vy", "Xuân", "Yến", "Đạt", "Điệp", "Đông", "Ánh"]
MODALITIES = ["CR", "DX", "CT", "MR", "US", "MG"]
SCOPES = "system/Patient.crs system/ImagingStudy.rs system/DiagnosticReport.rs"
START = datetime(2025, 1, 1, tzinfo=UTC)


def patient(n: int, rng: random.Random) -> dict[str, Any]:
    family = rng.choices([f for f, _ in FAMILIES], [w for _, w in FAMILIES])[0]
    return {"resourceType": "Patient", "identifier": [{"system": "urn:bench:mrn", "value": f"MRN{n:07d}"}],
            "name": [{"family": family, "given": [rng.choice(MIDDLE), rng.choice(GIVEN)]}],
            "gender": rng.choice(["male", "female"]),
            "birthDate": f"{rng.randint(1930, 2020)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"}


def study(n: int, subject: str, rng: random.Random) -> dict[str, Any]:
    return {"resourceType": "ImagingStudy", "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:1.2.826.0.1.3680043.8.498.{n}"}],
            "subject": {"reference": subject}, "started": "2025-06-01T08:00:00+07:00",
            "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": rng.choice(MODALITIES)}]}


def report(n: int, subject: str, study_id: str, rng: random.Random) -> dict[str, Any]:
    return {"resourceType": "DiagnosticReport", "status": rng.choice(["preliminary", "final", "final"]),
            "identifier": [{"system": "urn:bench:report", "value": f"R{n:07d}"}],
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
            "subject": {"reference": subject}, "imagingStudy": [{"reference": f"ImagingStudy/{study_id}"}],
            "conclusion": "No acute cardiopulmonary abnormality."}


def _copy_text(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def load(url: str, total: int, mappings: Path) -> tuple[int, float]:
    """COPY `total` resources (and their history and index rows); (index rows, seconds)."""
    params = search_params.load(mappings)
    rng = random.Random(14)
    third = total // 3
    started = time.monotonic()
    index_rows = 0
    step = 20_000
    with psycopg.connect(url) as conn:
        for base in range(0, third, step):
            res, idx = io.StringIO(), io.StringIO()
            for n in range(base, min(base + step, third)):
                pid = f"pt{n}"
                when = START + timedelta(seconds=n * 30)
                bodies = [("Patient", pid, patient(n, rng)),
                          ("ImagingStudy", f"st{n}", study(n, f"Patient/{pid}", rng)),
                          ("DiagnosticReport", f"dr{n}", report(n, f"Patient/{pid}", f"st{n}", rng))]
                for k, (rtype, rid, body) in enumerate(bodies):
                    ts = when + timedelta(seconds=k)
                    stored = {**body, "id": rid, "meta": {"versionId": "1", "lastUpdated": ts.isoformat()}}
                    res.write(f"{rtype}\t{rid}\t1\t{ts.isoformat()}\t{_copy_text(orjson.dumps(stored).decode())}\n")
                    for param, system, value in resources.index_entries(stored, params[rtype]):
                        sys_text = "\\N" if system is None else _copy_text(system)
                        idx.write(f"{rtype}\t{rid}\t{param}\t{sys_text}\t{_copy_text(value)}\t{ts.isoformat()}\n")
                        index_rows += 1
            data = res.getvalue()
            with conn.cursor() as cur:
                for table in ("resource", "resource_history"):
                    with cur.copy(f"COPY {table} (type, id, version, last_updated, body) FROM STDIN") as copy:
                        copy.write(data)
                with cur.copy("COPY search_index (type, id, param, system, value, last_updated) FROM STDIN") as copy:
                    copy.write(idx.getvalue())
            conn.commit()
            done = min(base + step, third) * 3
            print(f"  loaded {done:,} resources, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE resource")
        conn.execute("VACUUM ANALYZE resource_history")
        conn.execute("VACUUM ANALYZE search_index")
    return index_rows, time.monotonic() - started


def searches(third: int, rng: random.Random, n: int = 4000) -> list[str]:
    """GET paths of the search mix."""
    def prefix(text: str) -> str:
        return text if rng.random() < 0.5 else search_params.normalise(text)  # as typed, or without accents

    out = []
    for _ in range(n):
        kind = rng.randrange(8)
        pid = f"pt{rng.randrange(third)}"
        family = rng.choices([f for f, _ in FAMILIES], [w for _, w in FAMILIES])[0]
        if kind == 0:
            out.append(f"/fhir/Patient?family={prefix(family)}&_count=10")
        elif kind == 1:
            out.append(f"/fhir/Patient?family={prefix(family)[:3]}&given={prefix(rng.choice(GIVEN))}&_count=10")
        elif kind == 2:
            out.append(f"/fhir/Patient?name={prefix(rng.choice(GIVEN))}&_count=10")
        elif kind == 3:
            out.append(f"/fhir/Patient?identifier=urn:bench:mrn|MRN{rng.randrange(third):07d}")
        elif kind == 4:
            out.append(f"/fhir/ImagingStudy?patient={pid}")
        elif kind == 5:
            out.append(f"/fhir/DiagnosticReport?patient={pid}&status=final")
        elif kind == 6:
            out.append(f"/fhir/ImagingStudy?patient={pid}&modality={rng.choice(MODALITIES)}")
        else:
            when = START + timedelta(seconds=rng.randrange(third) * 30)
            out.append(f"/fhir/DiagnosticReport?_lastUpdated=gt{when.strftime('%Y-%m-%dT%H:%M:%SZ')}&_count=10")
    return [requests.utils.requote_uri(p) for p in out]


LUA = """
local paths = %(paths)s
local bodies = %(bodies)s
local create_every = %(create_every)d
local n = 0
math.randomseed(%(seed)d)
wrk.headers["Authorization"] = "Bearer %(token)s"
wrk.headers["Accept"] = "application/fhir+json"
request = function()
  n = n + 1
  if create_every > 0 and n %% create_every == 0 then
    wrk.headers["Content-Type"] = "application/fhir+json"
    return wrk.format("POST", "/fhir/Patient", nil, bodies[math.random(#bodies)])
  end
  return wrk.format("GET", paths[math.random(#paths)])
end
done = function(summary, latency, requests)
  local s = summary.errors.status
  io.write(string.format('RESULT {"requests": %%d, "seconds": %%f, "non2xx": %%d, "p50": %%f, "p95": %%f, "p99": %%f}\\n',
    summary.requests, summary.duration / 1e6, s, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3))
end
"""


def lua_list(items: list[str]) -> str:
    """A Lua table of strings, each a long bracket literal (raw UTF-8, no escapes)."""
    assert not any("]==]" in i for i in items)
    return "{" + ",".join(f"[==[{i}]==]" for i in items) + "}"


def wrk(base: str, script: Path, seconds: int, connections: int) -> dict[str, Any]:
    out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "-s", str(script), base],
                         capture_output=True, text=True, check=True).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk: {out}")
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    if result["non2xx"]:
        raise RuntimeError(f"wrk: {result['non2xx']} answers were not 2xx: {out}")
    result["rate"] = result["requests"] / result["seconds"]
    return result


def serve(code: Path, url: str, port: int, workers: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, DATABASE_URL=url, PYTHONPATH=str(code), INTEROP_HTTP_PORT=str(port),
               INTEROP_MAPPINGS_DIR=str(code / "mappings"), INTEROP_URL_ALLOW="http://127.0.0.1:*")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--workers", str(workers), "--bind",
                             f"127.0.0.1:{port}", "--log-level", "warning", "interop.app:create_app()"], env=env, cwd=code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the hub did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resources", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", default="2", help="gunicorn workers; several (2,4) are each a run of their own")
    parser.add_argument("--rounds", type=int, default=1, help="serve each code (and worker count) this many times,"
                                                                 " alternating the order: a noisy machine's drift falls"
                                                                 " on both")
    parser.add_argument("--only", default="search,create,mixed", help="workloads to run, of search,create,mixed")
    parser.add_argument("--before", help="also serve this commit (git worktree) on the same data, with the"
                                         " search index as it had it")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    from interop.runtime.postgres import EmbeddedPostgres

    code = ROOT
    tmp = Path(tempfile.mkdtemp(prefix="fhir-search-bench-", dir="/var/tmp"))
    os.chmod(tmp, 0o755)
    pg = EmbeddedPostgres(tmp / "pg")
    proc = None
    try:
        url = fresh_database(pg.start(), "fhir_search")
        cli = dict(os.environ, DATABASE_URL=url, PYTHONPATH=str(code))
        subprocess.run([sys.executable, "-m", "interop.cli", "migrate"], cwd=code, env=cli, check=True,
                       capture_output=True)
        rows, seconds = load(url, args.resources, code / "mappings")
        with psycopg.connect(url) as conn:
            sizes = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('resource')),"
                                 " pg_size_pretty(pg_total_relation_size('search_index'))").fetchone()
        print(f"loaded {args.resources // 3 * 3:,} resources ({rows:,} index rows) in {seconds:.0f} s;"
              f" resource {sizes[0] if sizes else '?'}, search_index {sizes[1] if sizes else '?'}", flush=True)
        key = smart.ClientKey.new()
        jwks = tmp / "jwks.json"
        jwks.write_text(json.dumps(key.jwks))
        client_id = subprocess.run([sys.executable, "-m", "interop.cli", "clients", "add", "bench", "--jwks", str(jwks),
                                    "--scopes", SCOPES], cwd=code, env=cli, capture_output=True, text=True,
                                   check=True).stdout.split()[-1]
        rng = random.Random(7)
        paths = searches(args.resources // 3, rng)
        bodies = [json.dumps(patient(10_000_000 + n, rng), ensure_ascii=False) for n in range(200)]
        runs = {"after": code}
        if args.before:
            old = tmp / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.before], check=True,
                           capture_output=True)
            runs["before"] = old
        cores = os.cpu_count() or 1
        counts = [int(w) for w in args.workers.split(",")]
        wanted = set(args.only.split(","))
        print(f"\n{args.resources // 3 * 3:,} resources; gunicorn {args.workers} workers; wrk -t2 -c{args.connections}"
              f" {args.seconds}s per run; {cores} vCPUs shared by the hub, PostgreSQL and wrk")
        print("| code | workers | round | workload | requests/s | per vCPU | p50 ms | p95 ms | p99 ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        plan = [(which, checkout, workers) for which, checkout in runs.items() for workers in counts]
        rounds = [plan if n % 2 == 0 else plan[::-1] for n in range(args.rounds)]
        reindexed = False
        for n, (which, checkout, workers) in ((n, run) for n, order in enumerate(rounds) for run in order):
            ordered = (checkout / "interop/store/migrations/0013_search_index_ordered.sql").exists()
            if which == "before" and not ordered and not reindexed:  # the index as it stood: (type, param, value) in the
                with psycopg.connect(url, autocommit=True) as conn:  # database's collation, or as 0011 made it
                    old = (checkout / "interop/store/migrations/0011_string_search_normalised.sql").exists()
                    conn.execute("DROP INDEX search_index_lookup")
                    conn.execute("DROP STATISTICS IF EXISTS search_index_values")
                    conn.execute("ALTER TABLE search_index ALTER COLUMN last_updated DROP NOT NULL")
                    conn.execute("CREATE INDEX search_index_lookup ON search_index (type, param, value text_pattern_ops)"
                                 " INCLUDE (system, id)" if old else
                                 "CREATE INDEX search_index_lookup ON search_index (type, param, value)")
                    conn.execute("ANALYZE search_index")
                reindexed = True  # from here on "after" runs on the old index too: use --rounds with ordered code only
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            proc = serve(checkout, url, port, workers)
            workloads = [("warm-up", "", 0), ("search", "search", 0), ("create", "create", 1),
                         ("mixed 1 create : 9 searches", "mixed", 10)]
            for name, kind, every in workloads:
                if kind and kind not in wanted:
                    continue
                token = smart.Smart(f"{base}/auth/token", client_id, key, SCOPES).token()
                script = tmp / "load.lua"
                script.write_text(LUA % {"paths": lua_list(paths), "bodies": lua_list(bodies), "create_every": every,
                                         "seed": 1, "token": token})
                r = wrk(base, script, 5 if name == "warm-up" else args.seconds, args.connections)
                if name != "warm-up":
                    print(f"| {which} | {workers} | {n + 1} | {name} | {r['rate']:.0f} | {r['rate'] / cores:.0f} | {r['p50']:.1f}"
                          f" | {r['p95']:.1f} | {r['p99']:.1f} |", flush=True)
            proc.terminate()
            proc.wait(30)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        pg.stop()
        if args.before:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")],
                           capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

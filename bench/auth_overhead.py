"""What security costs FHIR reads and searches: the hub as it is (bearer token checked, scopes
enforced, every read and search audited) against the hub before issue 12 (no checks), in the
same run, on the same PostgreSQL and the same data, served the same way (gunicorn, 2 workers).

The "before" hub is the commit given by --before (default: the last commit before the security
work), checked out with `git worktree` into a temporary folder. Each round runs both, one at a
time, with `wrk` (Debian package) on two requests: read one Patient by id, and search Patients by
family name (about 2,000 stored). Rounds alternate the order; the ratio (after / before) is of
the medians.

    python bench/auth_overhead.py [--rounds 3] [--seconds 10] [--patients 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fresh_database  # noqa: E402
from interop.runtime.processes import free_port  # noqa: E402
from interop.store import db  # noqa: E402
from scripts import smart  # noqa: E402

BEFORE = "7b62189"  # main before the security work (issue 12)
FAMILIES = ["Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng", "Tran", "Bùi"]


def serve(code: Path, url: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, DATABASE_URL=url, PYTHONPATH=str(code), INTEROP_HTTP_PORT=str(port),
               INTEROP_MAPPINGS_DIR=str(code / "mappings"), INTEROP_URL_ALLOW="http://127.0.0.1:*")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}",
                             "--log-level", "warning", "interop.app:create_app()"], env=env, cwd=code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the hub did not start")


def seed(base: str, session: requests.Session, patients: int) -> str:
    rng = random.Random(7)
    first = ""
    for n in range(patients):
        body = {"resourceType": "Patient", "identifier": [{"system": "urn:bench", "value": f"BN{n:06d}"}],
                "name": [{"family": rng.choice(FAMILIES), "given": ["Văn", "An"]}], "gender": "male"}
        answer = session.post(f"{base}/fhir/Patient", data=json.dumps(body),
                              headers={"Content-Type": "application/fhir+json"}, timeout=30)
        answer.raise_for_status()
        first = first or answer.json()["id"]
    return first


def wrk(url: str, seconds: int, token: str | None) -> float:
    headers = ["-H", f"Authorization: Bearer {token}"] if token else []
    out = subprocess.run(["wrk", "-t", "1", "-c", "8", "-d", f"{seconds}s", *headers, url],
                         capture_output=True, text=True, check=True).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if found is None or non2xx is not None:
        raise RuntimeError(f"wrk: {out}")
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--before", default=BEFORE)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")

    from interop.runtime.postgres import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="auth-bench-", dir="/var/tmp"))
    os.chmod(tmp, 0o755)
    old = tmp / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.before], check=True,
                   capture_output=True)
    pg = EmbeddedPostgres(tmp / "pg")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = pg.start()
        urls = {"before": fresh_database(server, "before_security"), "after": fresh_database(server, "after_security")}
        subprocess.run([sys.executable, "-m", "interop.cli", "migrate"], cwd=old, check=True, capture_output=True,
                       env=dict(os.environ, DATABASE_URL=urls["before"], PYTHONPATH=str(old)))
        db.migrate(urls["after"])
        ports = {"before": free_port(), "after": free_port()}
        code = {"before": old, "after": ROOT}
        key = smart.ClientKey.new()
        client_id = subprocess.run(
            [sys.executable, "-m", "interop.cli", "clients", "add", "bench", "--jwks", str(_jwks(tmp, key)),
             "--scopes", "system/Patient.crs"], env=dict(os.environ, DATABASE_URL=urls["after"]),
            capture_output=True, text=True, check=True).stdout.split()[-1]
        targets: dict[str, dict[str, str]] = {}
        for which in ("before", "after"):
            proc = serve(code[which], urls[which], ports[which])
            base = f"http://127.0.0.1:{ports[which]}"
            session = requests.Session()
            if which == "after":
                session = smart.session(smart.Smart(f"{base}/auth/token", client_id, key, "system/Patient.crs"))
            first = seed(base, session, args.patients)
            targets[which] = {"read": f"{base}/fhir/Patient/{first}",
                              "search": f"{base}/fhir/Patient?family=Tran&_count=10"}
            proc.terminate()
            proc.wait(30)
        results: dict[str, dict[str, list[float]]] = {w: {"read": [], "search": []} for w in targets}
        for n in range(args.rounds):
            for which in (("before", "after") if n % 2 == 0 else ("after", "before")):
                proc = serve(code[which], urls[which], ports[which])
                procs.append(proc)
                base = f"http://127.0.0.1:{ports[which]}"
                token = smart.Smart(f"{base}/auth/token", client_id, key, "system/Patient.rs").token() \
                    if which == "after" else None
                for kind in ("read", "search"):
                    wrk(targets[which][kind], 2, token)  # warm-up
                    results[which][kind].append(wrk(targets[which][kind], args.seconds, token))
                proc.terminate()
                proc.wait(30)
        with psycopg.connect(urls["after"]) as conn:
            audited = conn.execute("SELECT count(*) FROM audit_event").fetchone()
        print(f"patients: {args.patients}; rounds: {args.rounds} x {args.seconds}s; wrk -t1 -c8; gunicorn 2 workers;"
              f" AuditEvents written by the secured hub: {audited[0] if audited else 0}")
        print("| request | before (no checks) req/s | after (token, scopes, audit) req/s | after / before |")
        print("|---|---|---|---|")
        for kind in ("read", "search"):
            before, after = statistics.median(results["before"][kind]), statistics.median(results["after"][kind])
            print(f"| {kind} | {before:.0f} ({', '.join(f'{v:.0f}' for v in results['before'][kind])})"
                  f" | {after:.0f} ({', '.join(f'{v:.0f}' for v in results['after'][kind])}) | {after / before:.2f} |")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        pg.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _jwks(folder: Path, key: smart.ClientKey) -> Path:
    path = folder / "bench-jwks.json"
    path.write_text(json.dumps(key.jwks))
    return path


if __name__ == "__main__":
    sys.exit(main())

"""ACK throughput of the HL7 v2 MLLP listener against a bare python-hl7 server that only ACKs.

Runs on loopback only and stops by itself. Starts an embedded PostgreSQL (or uses
DATABASE_URL), one `interop mllp` process (durable: one commit per message before its ACK)
and one bare `hl7.mllp.start_hl7_server` process (parse with python-hl7, ACK, store nothing).
A python-hl7 asyncio client sends ORM^O01 orders (each with a new MSH-10) over 1 and 8
concurrent connections, one message in flight per connection, and counts the ACKs.

    python bench/mllp_throughput.py [--messages 3000] [--connections 1 8]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from hl7.mllp import open_hl7_connection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fresh_database  # noqa: E402
from interop.runtime.processes import free_port, wait_listening  # noqa: E402
from interop.store import db  # noqa: E402
from tests.helpers import stop_process  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "samples" / "hl7v2" / "dcm4che_ORM_O01_v231_radiology.hl7"

BARE_SERVER = r"""
import asyncio, sys
import hl7
from hl7.mllp import start_hl7_server

async def handle(reader, writer):
    try:
        while not writer.is_closing():
            message = await reader.readmessage()
            writer.writemessage(message.create_ack())
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()

async def main():
    server = await start_hl7_server(handle, "127.0.0.1", int(sys.argv[1]), encoding="utf-8")
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    wait_listening(port, proc, timeout=30)


def message(template: bytes, control_id: str) -> bytes:
    msh, rest = template.split(b"\r", 1)
    fields = msh.split(b"|")
    fields[9] = control_id.encode()
    return b"|".join(fields) + b"\r" + rest


async def one_connection(port: int, payloads: list[bytes]) -> int:
    reader, writer = await open_hl7_connection("127.0.0.1", port, encoding="utf-8")
    acked = 0
    try:
        for payload in payloads:
            writer.writeblock(payload)
            await writer.drain()
            answer = await asyncio.wait_for(reader.readblock(), 30)
            if b"|AA|" in answer or b"MSA|AA" in answer:
                acked += 1
    finally:
        writer.close()
        await writer.wait_closed()
    return acked


async def run(port: int, total: int, connections: int, tag: str) -> tuple[int, float]:
    template = SAMPLE.read_bytes()
    per = total // connections
    batches = [[message(template, f"{tag}-{c}-{i}") for i in range(per)] for c in range(connections)]
    start = time.perf_counter()
    counts = await asyncio.gather(*(one_connection(port, b) for b in batches))
    return sum(counts), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    stack: list[subprocess.Popen[bytes]] = []
    pg = None
    url = os.environ.get("DATABASE_URL")
    if not url:
        from interop.runtime.postgres import EmbeddedPostgres

        base = Path(tempfile.mkdtemp(prefix="mllp-bench-", dir="/var/tmp"))
        os.chmod(base, 0o755)
        pg = EmbeddedPostgres(base / "pg")
        url = fresh_database(pg.start(), "mllp_bench")
    db.migrate(url)
    with psycopg.connect(url) as conn:
        settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                    for name in ("fsync", "synchronous_commit", "wal_sync_method")}
    try:
        hub_port, bare_port = free_port(), free_port()
        env = dict(os.environ, DATABASE_URL=url, INTEROP_MLLP_PORT=str(hub_port), PYTHONUNBUFFERED="1")
        hub = subprocess.Popen([sys.executable, "-m", "interop.cli", "--log-level", "WARNING", "mllp"],
                               env=env, cwd=ROOT)
        stack.append(hub)
        bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_port)])
        stack.append(bare)
        wait_port(hub_port, hub)
        wait_port(bare_port, bare)
        # warm up both (connections, prepared statements)
        asyncio.run(run(hub_port, 200, 2, "warm"))
        asyncio.run(run(bare_port, 200, 2, "warm"))

        print(f"PostgreSQL: fsync={settings['fsync']} synchronous_commit={settings['synchronous_commit']}"
              f" wal_sync_method={settings['wal_sync_method']}; {os.cpu_count()} CPUs; {args.messages} messages a run")
        print(f"{'server':<34} {'conns':>5} {'acked':>6} {'seconds':>8} {'msg/s':>8}")
        results: dict[tuple[str, int], float] = {}
        for connections in args.connections:
            for name, port in (("interop mllp (durable, 1 process)", hub_port), ("bare python-hl7 (ACK only)", bare_port)):
                acked, seconds = asyncio.run(run(port, args.messages, connections, f"r{connections}"))
                rate = acked / seconds
                results[(name, connections)] = rate
                print(f"{name:<34} {connections:>5} {acked:>6} {seconds:>8.2f} {rate:>8.0f}")
        for connections in args.connections:
            hub_rate = results[("interop mllp (durable, 1 process)", connections)]
            bare_rate = results[("bare python-hl7 (ACK only)", connections)]
            print(f"ratio at {connections} connection(s): {hub_rate / bare_rate:.2f} (target >= 0.5)")
        with psycopg.connect(url) as conn:
            stored = conn.execute("SELECT count(*) FROM hl7_message WHERE control_id NOT LIKE 'warm%%'").fetchone()
            queued = conn.execute("SELECT count(*) FROM job").fetchone()
        print(f"rows stored (excluding warm-up): {stored[0]}; jobs queued (all): {queued[0]}")  # type: ignore[index]
        return 0
    finally:
        for proc in stack:
            stop_process(proc)
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    sys.exit(main())

"""How fast the hub's DICOM Storage SCP receives and durably keeps instances (issue 13), against
dcmtk's own `storescp` in the same run.

Runs on loopback only and stops by itself. Starts an embedded PostgreSQL (or uses DATABASE_URL),
one `interop dicom-scp` process with local storage (no DICOMWEB_URL: each instance copied to
INTEROP_DATA_DIR/dicom and fsynced, then its row, audit record and study-stable job committed,
before 0x0000 is answered) and one dcmtk `storescp` (writes each instance to a directory, no
fsync, records nothing; run with TCP_NODELAY=1, see below). Both on a temporary directory under /var/tmp.

Sends, one association per run:
- a 4-view screening mammography exam (MG For Presentation, 16-bit 3328 x 2560, ~17 MB each);
- N small DX radiographs (512 x 512, 16-bit, ~0.5 MB each), two per study;
with dcmtk `storescu` and with pynetdicom (`send_c_store` of file paths), to both targets. Every
hub run gets files with new UIDs (the storescp runs send the same files). Rounds alternate the
order; the page cache is flushed (`sync`) before each run, so no run pays for another's writes.
The peak RSS of the receiving process is sampled (psutil) during each run.

    python bench/dicom_store.py [--dx 200] [--rounds 3] [--write]
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import psycopg
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fresh_database  # noqa: E402
from interop.runtime.processes import free_port, wait_listening  # noqa: E402
from interop.store import db  # noqa: E402
from scripts.synthetic.dicom import (  # noqa: E402
    DX_FOR_PRESENTATION,
    MG_FOR_PRESENTATION,
    make_chest_xray,
    make_mammography_exam,
)
from tests.helpers import stop_process  # noqa: E402

HEADING = "## DICOM C-STORE into the hub (issue 13): `python bench/dicom_store.py`"
HUB, STORESCP = "interop dicom-scp", "dcmtk storescp"
SENDERS = ("storescu", "pynetdicom")
MB = 1_000_000


# -- files -----------------------------------------------------------------------------------------
def restamp(ds, study_uid: str, series_uid: str):  # type: ignore[no-untyped-def]
    out = copy.copy(ds)  # shallow: the pixel bytes are shared, the UIDs are new
    out.file_meta = copy.deepcopy(ds.file_meta)
    out.StudyInstanceUID, out.SeriesInstanceUID = study_uid, series_uid
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return out


def write_set(base: Path, mg: list, dx: list, count: int) -> dict[str, list[Path]]:  # type: ignore[type-arg]
    """One set of files with new UIDs: the MG exam (one study, a series per breast) and `count` DX."""
    base.mkdir(parents=True)
    study, series = generate_uid(), {"L": generate_uid(), "R": generate_uid()}
    files: dict[str, list[Path]] = {"MG": [], "DX": []}
    for i, ds in enumerate(mg):
        path = base / f"mg{i}.dcm"
        restamp(ds, study, series[str(ds.ImageLaterality)]).save_as(path, enforce_file_format=True)
        files["MG"].append(path)
    for i in range(count):
        if i % 2 == 0:
            study = generate_uid()
        path = base / f"dx{i:04d}.dcm"
        restamp(dx[i % len(dx)], study, generate_uid()).save_as(path, enforce_file_format=True)
        files["DX"].append(path)
    return files


# -- targets and senders ---------------------------------------------------------------------------
def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    wait_listening(port, proc, timeout=60)


class PeakRss:
    """Samples a process's RSS every 5 ms while in the `with` block."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def send_storescu(port: int, aec: str, files: list[Path]) -> int:
    done = subprocess.run(["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"storescu exited with {done.returncode}: {done.stderr[-2000:]}")
    return len(files)


def send_pynetdicom(port: int, aec: str, files: list[Path]) -> int:
    ae = AE(ae_title="BENCHPY")
    for sop_class in (MG_FOR_PRESENTATION, DX_FOR_PRESENTATION):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if not assoc.is_established:
        raise RuntimeError("pynetdicom: association not established")
    # pynetdicom never sets TCP_NODELAY: against storescp's 16 KB PDUs the last, short fragment of
    # each dataset would wait for storescp's delayed ACK (~10 ms an instance). A sender's artefact:
    # off, as for storescp. (Against the hub, which takes PDUs of any size, one PDU carries it all.)
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    stored = 0
    try:
        for path in files:
            status = assoc.send_c_store(path)
            if status and status.Status == 0x0000:
                stored += 1
    finally:
        assoc.release()
    if stored != len(files):
        raise RuntimeError(f"pynetdicom: {len(files) - stored} of {len(files)} C-STOREs failed")
    return stored


def timed(sender: str, target: tuple[str, int, int], files: list[Path]) -> tuple[float, int]:
    """Seconds for one association sending `files`, and the target's peak RSS meanwhile."""
    _, port, pid = target
    aec = "AIHUB" if target[0] == HUB else "STORESCP"
    os.sync()
    with PeakRss(pid) as rss:
        start = time.perf_counter()
        (send_storescu if sender == "storescu" else send_pynetdicom)(port, aec, files)
        seconds = time.perf_counter() - start
    return seconds, rss.peak


def disk_floor(files: list[Path], into: Path) -> tuple[float, float]:
    """Milliseconds per file to copy it (as the hub does: 1 MiB blocks) without and with fsync."""
    into.mkdir(parents=True)
    result = []
    for sync in (False, True):
        os.sync()
        start = time.perf_counter()
        for i, path in enumerate(files):
            with path.open("rb") as src, (into / f"{sync}-{i}.dcm").open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                if sync:
                    dst.flush()
                    os.fsync(dst.fileno())
        result.append((time.perf_counter() - start) * 1000 / len(files))
    return result[0], result[1]


# -- the run ---------------------------------------------------------------------------------------
def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dx", type=int, default=200, help="small DX instances per run (default 200)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the result to docs/BENCHMARKS.md")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="dicom-store-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    pg = None
    try:
        url = os.environ.get("DATABASE_URL")
        if not url:
            from interop.runtime.postgres import EmbeddedPostgres

            pg = EmbeddedPostgres(base / "pg")
            url = fresh_database(pg.start(), "dicom_bench")
        db.migrate(url)
        with psycopg.connect(url) as conn:
            pg_settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                           for name in ("fsync", "synchronous_commit")}

        print("generating files ...", file=sys.stderr)
        mg = make_mammography_exam(7)
        dx = [make_chest_xray(100 + i, size=512) for i in range(20)]
        sets = {(r, s): write_set(base / "files" / f"r{r}-{s}", mg, dx, args.dx)
                for r in range(args.rounds) for s in SENDERS}
        warm = {s: write_set(base / "files" / f"warm-{s}", mg[:0], dx, 10) for s in SENDERS}
        mg_bytes = sum(p.stat().st_size for p in sets[(0, "storescu")]["MG"])
        dx_bytes = sum(p.stat().st_size for p in sets[(0, "storescu")]["DX"])

        hub_port, scp_port = free_port(), free_port()
        env = dict(os.environ, DATABASE_URL=url, INTEROP_DICOM_PORT=str(hub_port), INTEROP_DICOM_AET="AIHUB",
                   INTEROP_DICOM_ALLOW_UNKNOWN_AE="true", INTEROP_DATA_DIR=str(base / "data"), PYTHONUNBUFFERED="1")
        env.pop("DICOMWEB_URL", None)
        hub = subprocess.Popen([sys.executable, "-m", "interop.cli", "--log-level", "WARNING", "dicom-scp"],
                               env=env, cwd=ROOT)
        procs.append(hub)
        (base / "storescp").mkdir()
        # Debian's dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1: storescp's small C-STORE
        # responses then wait for the sender's delayed ACK, 40 ms per instance. The reference is a fast
        # receiver, so it runs with TCP_NODELAY=1; storescu runs as a modality would, unset.
        scp = subprocess.Popen(["storescp", "--aetitle", "STORESCP", "--output-directory", str(base / "storescp"),
                                str(scp_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, TCP_NODELAY="1"))
        procs.append(scp)
        wait_port(hub_port, hub)
        wait_port(scp_port, scp)
        targets = {HUB: (HUB, hub_port, hub.pid), STORESCP: (STORESCP, scp_port, scp.pid)}

        for sender in SENDERS:  # warm up: connections, imports, prepared statements
            for target in targets.values():
                timed(sender, target, warm[sender]["DX"])
        idle = {name: psutil.Process(t[2]).memory_info().rss for name, t in targets.items()}

        runs = [(sender, name) for sender in SENDERS for name in (HUB, STORESCP)]
        seconds: dict[tuple[str, str, str], list[float]] = {}
        peaks: dict[tuple[str, str, str], list[int]] = {}
        for r in range(args.rounds):
            for sender, name in (runs if r % 2 == 0 else runs[::-1]):
                for kind in ("MG", "DX"):
                    took, peak = timed(sender, targets[name], sets[(r, sender)][kind])
                    seconds.setdefault((name, sender, kind), []).append(took)
                    peaks.setdefault((name, sender, kind), []).append(peak)
                    print(f"round {r} {sender:>10} -> {name:<17} {kind}: {took:6.2f} s, peak RSS {peak / 2**20:6.1f} MiB",
                          file=sys.stderr)

        floor = {kind: disk_floor(sets[(0, "storescu")][kind], base / f"floor-{kind}") for kind in ("MG", "DX")}
        with psycopg.connect(url) as conn:
            kept = conn.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM dicom_instance").fetchone()
            jobs = conn.execute("SELECT count(*) FROM job").fetchone()
        on_disk = sum(1 for _ in (base / "data" / "dicom").rglob("*.dcm"))
        expected = len(SENDERS) * (10 + args.rounds * (len(mg) + args.dx))
        if kept[0] != expected or on_disk != expected:  # type: ignore[index]
            raise RuntimeError(f"the hub kept {kept[0]} rows and {on_disk} files, expected {expected}")  # type: ignore[index]

        report = render(args, pg_settings, len(mg), mg_bytes, dx_bytes, seconds, peaks, idle, floor,
                        kept[0], jobs[0])  # type: ignore[index]
        print(report)
        if args.write:
            doc = ROOT / "docs" / "BENCHMARKS.md"
            text = doc.read_text()
            doc.write_text(text.rstrip("\n") + "\n\n" + HEADING + "\n\n" + report)
            print(f"appended to {doc}", file=sys.stderr)
        return 0
    finally:
        for proc in procs:
            stop_process(proc)
        if pg is not None:
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def render(args: argparse.Namespace, pg_settings: dict[str, str], n_mg: int, mg_bytes: int, dx_bytes: int,
           seconds: dict[tuple[str, str, str], list[float]], peaks: dict[tuple[str, str, str], list[int]],
           idle: dict[str, int], floor: dict[str, tuple[float, float]], kept: int, jobs: int) -> str:
    sizes = {"MG": (n_mg, mg_bytes), "DX": (args.dx, dx_bytes)}
    label = {"MG": f"MG exam, {n_mg} × {mg_bytes / n_mg / MB:.1f} MB",
             "DX": f"{args.dx} DX × {dx_bytes / args.dx / MB:.2f} MB"}
    lines = [
        f"What: one association per run, sent by dcmtk `storescu` or pynetdicom (`send_c_store` of file"
        f" paths), received by one `interop dicom-scp` process (local storage: each instance copied"
        f" to INTEROP_DATA_DIR/dicom and fsynced, then its row, its audit record and its study-stable"
        f" job committed before 0x0000; PostgreSQL `fsync={pg_settings['fsync']}`,"
        f" `synchronous_commit={pg_settings['synchronous_commit']}`) or by dcmtk `storescp` (writes"
        f" each file, no fsync, records nothing; with TCP_NODELAY=1, without which Debian's dcmtk 3.6.7"
        f" leaves Nagle's algorithm on and each C-STORE response waits ~40 ms for a delayed ACK; the"
        f" pynetdicom sender also sets TCP_NODELAY on its socket, which pynetdicom itself never does),"
        f" both on /var/tmp, all on loopback on the same"
        f" {os.cpu_count()}-core machine. Every hub run has new UIDs; `sync` before each run;"
        f" {args.rounds} rounds, order alternating; median (range) of the rounds. MB = 10^6 bytes."
        f" {time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        "| files | sender | `interop dicom-scp` | `storescp` | hub / storescp |",
        "|---|---|---|---|---|",
    ]
    for kind in ("MG", "DX"):
        count, size = sizes[kind]
        for sender in SENDERS:
            cells = []
            for name in (HUB, STORESCP):
                runs = seconds[(name, sender, kind)]
                med = statistics.median(runs)
                cells.append(f"{fmt(count / med, 1 if count / med < 10 else 0)} inst/s, {fmt(size / MB / med)} MB/s"
                             f" ({fmt(size / MB / max(runs))} – {fmt(size / MB / min(runs))})")
            ratio = statistics.median(seconds[(STORESCP, sender, kind)]) / statistics.median(seconds[(HUB, sender, kind)])
            lines.append(f"| {label[kind]} | {sender} | {cells[0]} | {cells[1]} | **{ratio:.2f}** |")
    lines += [
        "",
        "Resident memory of the receiving process (idle after warm-up; highest peak sampled every 5 ms"
        " during the runs):",
        "",
        "| process | sender | idle | peak during the MG exams | peak during the DX runs |",
        "|---|---|---|---|---|",
    ]
    for name in (HUB, STORESCP):
        for sender in SENDERS:
            mg_peak, dx_peak = max(peaks[(name, sender, "MG")]), max(peaks[(name, sender, "DX")])
            lines.append(f"| `{name}` | {sender} | {idle[name] / 2**20:.0f} MiB | {mg_peak / 2**20:.0f} MiB"
                         f" (+{(mg_peak - idle[name]) / 2**20:.0f}) | {dx_peak / 2**20:.0f} MiB"
                         f" (+{(dx_peak - idle[name]) / 2**20:.0f}) |")
    lines += [
        "",
        "The disk alone, same files, same directory, copied in 1 MiB blocks as the hub does: "
        + "; ".join(f"{kind} {without:.1f} ms per file without fsync, {with_:.1f} ms with"
                    for kind, (without, with_) in floor.items()) + ".",
        "",
        f"The hub kept {kept:,} instances (rows and files, checked) and queued {jobs:,} study-stable jobs.",
        "",
    ]
    return "\n".join(line if line.startswith("|") else textwrap.fill(line, 100) for line in lines)


if __name__ == "__main__":
    sys.exit(main())

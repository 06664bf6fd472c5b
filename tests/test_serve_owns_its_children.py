"""`interop serve` owns its children (issue 10): a `kill -9` of the supervisor takes every child
with it, the next start finds and ends an orphaned tritonserver and recovers the embedded
PostgreSQL (a stale postmaster.pid included), a clean stop stops the embedded PostgreSQL again,
and a taken port stops the start with a message naming it."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from interop.runtime.postgres import EmbeddedPostgres
from interop.runtime.processes import PidFile
from interop.store import db
from tests.fixtures.hub import start_hub, stop_hub
from tests.helpers import ROOT, free_port, wait_for


def _processes(marker: str, name: str) -> list[psutil.Process]:
    """Running processes whose command line holds `name` and `marker` (zombies excluded)."""
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if name in cmdline and marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def tritons(repo: Path) -> list[psutil.Process]:
    return [p for p in _processes(str(repo), "tritonserver") if p.name() == "tritonserver"]


def postgres(data: Path) -> list[psutil.Process]:
    return [p for p in _processes(str(data), "postgres") if p.name() == "postgres"]


@pytest.fixture
def data_dir() -> Any:
    # the embedded server runs as its own system user: not under root's 0700 tmp
    base = Path(os.environ.get("INTEROP_TEST_PGDIR", "/var/tmp/interop-test-pg")) / f"serve-{os.getpid()}-{time.time_ns()}"
    base.mkdir(parents=True)
    os.chmod(base, 0o755)
    yield base
    for proc in postgres(base) + tritons(ROOT / "triton_repo"):
        if str(base) in " ".join(proc.cmdline()):
            proc.kill()
    shutil.rmtree(base, ignore_errors=True)


def test_kill_9_takes_the_children_and_the_next_start_cleans_up(data_dir: Path) -> None:
    repo = ROOT / "triton_repo"
    # the embedded PostgreSQL and the bundled Triton (one model, to start quickly): what serve owns
    env = {"INTEROP_HTTP_WORKERS": "1", "DATABASE_URL": "", "TRITON_URL": "", "INTEROP_TRITON_MODELS": "chest_xray"}
    first = start_hub(env, data_dir)
    supervisor = psutil.Process(first.proc.pid)
    children = supervisor.children(recursive=True)
    triton_pid = int((data_dir / "triton" / "tritonserver.pid").read_text().split()[0])
    assert triton_pid in {c.pid for c in children}
    assert len(postgres(data_dir / "postgres")) >= 1
    os.kill(first.proc.pid, signal.SIGKILL)  # the supervisor alone: its children are not signalled
    first.proc.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline()[:3] for p in alive]
    assert not psutil.pid_exists(triton_pid) or psutil.Process(triton_pid).status() == psutil.STATUS_ZOMBIE
    assert len(postgres(data_dir / "postgres")) >= 1  # the database server is a daemon: adopted next time

    second = start_hub(env, data_dir)
    try:
        assert len(tritons(repo)) >= 1
        mine = [p for p in tritons(repo) if p.pid in {c.pid for c in psutil.Process(second.proc.pid).children(True)}]
        assert len(mine) == 1
    finally:
        assert stop_hub(second) == 0
    wait_for(lambda: postgres(data_dir / "postgres") == [], 30, what="the clean stop to stop the embedded PostgreSQL")
    assert not [p for p in tritons(repo) if p.pid == mine[0].pid]


def test_the_next_start_ends_an_orphaned_tritonserver_and_only_that(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    stand_in = [sys.executable, "-c", "import time; time.sleep(120)", "tritonserver", f"--model-repository={repo}"]
    orphan = subprocess.Popen(stand_in, start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "tritonserver", "--model-repository=/x"])
    try:
        for proc in (orphan, other):  # until exec, /proc shows the forked pytest's command line, not the stand-in's
            wait_for(lambda p=proc.pid: "tritonserver" in psutil.Process(p).cmdline(), 30, what="the stand-in to start")
        record = PidFile(tmp_path / "tritonserver.pid", "tritonserver", str(repo))
        record.write(orphan.pid)
        assert record.end_orphan() is True
        assert orphan.wait(10) is not None and not record.path.exists()
        record.write(other.pid)  # a pid that now runs something else of the same name: not ours
        assert record.end_orphan() is False and other.poll() is None
        record.write(os.getpid())  # a pid reused by another program
        assert record.end_orphan() is False
    finally:
        for proc in (orphan, other):
            proc.kill()
            proc.wait()


def test_a_stale_postmaster_pid_of_another_program_does_not_stop_the_start(data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir / "postgres")
    server.start()
    server.stop()
    wait_for(lambda: postgres(data_dir / "postgres") == [], 30, what="the server to stop")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # as after a crash: the file names a pid the system has since given to another program
        lines = ["0", str(data_dir / "postgres"), "0", "", "/nonexistent", "", "", "ready"]
        lines[0] = str(stranger.pid)
        (data_dir / "postgres" / "postmaster.pid").write_text("\n".join(lines) + "\n")
        url = server.start()
        with db.connect(url) as conn:
            assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        server.stop()
        assert stranger.poll() is None  # the stranger is left alone
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("which", ["INTEROP_MLLP_PORT", "INTEROP_HTTP_PORT", "INTEROP_DICOM_PORT"])
def test_a_taken_port_stops_the_start_with_a_message(db_url: str, triton_url: str, tmp_path: Path, which: str) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        env = {**os.environ, "DATABASE_URL": db_url, "TRITON_URL": triton_url, "INTEROP_DATA_DIR": str(tmp_path),
               "INTEROP_HTTP_PORT": str(free_port()), "INTEROP_MLLP_PORT": str(free_port()),
               "INTEROP_DICOM_PORT": str(free_port()), which: str(port)}
        result = subprocess.run([sys.executable, "-m", "interop.cli", "serve"], env=env, capture_output=True, text=True,
                                timeout=60)
    finally:
        taken.close()
    assert result.returncode == 2
    assert f"127.0.0.1:{port} is already in use" in result.stderr and which in result.stderr

"""Replicas killed mid-run, scaled down (issue 14): `bench/replicas.py` with 100 orders and 6 studies.

The hub as Kubernetes runs it — 2 API replicas, 2 MLLP listeners, 2 analysis workers and 1 delivery
runner, each its own process, on one PostgreSQL, behind Debian's haproxy — while one process of each
kind is killed with SIGKILL and started again. Orders (HL7 over MLLP, resent by the engine until
acknowledged) and studies (FHIR, resent on a 5xx or a lost connection) must all be stored once,
each study analysed once, and every result must reach the site's RIS and EMR.

SCALED DOWN: the figures in docs/BENCHMARKS.md come from the full run (`python bench/replicas.py`:
1,000 orders, 50 studies). This one takes about a minute on 2 cores (most of it starting the
processes and waiting out the 10 s lease of the jobs a killed process held).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


def test_one_replica_of_each_kind_killed_mid_run_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        pytest.fail("haproxy is not installed: run `make test` (its system-deps target installs Debian's haproxy)")
    out = tmp_path / "replicas.json"
    log = tmp_path / "replicas.log"
    with log.open("wb") as sink:
        bench = subprocess.Popen([sys.executable, str(ROOT / "bench" / "replicas.py"), "--orders", "100", "--studies", "6",
                                  "--order-rate", "20", "--timeout", "240", "--out", str(out)],
                                 stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            bench.wait(420)
        except subprocess.TimeoutExpired:
            bench.terminate()  # SIGTERM: the bench stops every process it started
            bench.wait(60)
    tail = log.read_text(errors="replace")[-3000:]
    assert out.exists(), tail
    result = json.loads(out.read_text())
    summary = json.dumps({k: result[k] for k in ("checks", "kills", "orders", "studies", "reports", "ris", "emr")}, indent=1)
    killed = result["kills"].get("killed", [])
    assert len(killed) == 4 and {"api-0", "mllp-0", "deliver-0"} <= set(killed), summary
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert not failed, f"{failed}\n{summary}"
    assert result["orders"]["lost"] == 0 and result["orders"]["duplicated"] == 0, summary
    assert result["reports"]["duplicated"] == 0 and result["emr"]["duplicated"] == 0, summary
    assert bench.returncode == 0, tail

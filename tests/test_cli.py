"""The `interop` command as an operator meets it: `--help` lists every setting the hub reads
(generated from config.ENVIRONMENT, the list Settings.from_env reads), every command explains
itself, and a wrong DATABASE_URL or TRITON_URL stops the command with one line naming the setting,
the address tried and what was wrong (run as subprocesses, against a real PostgreSQL)."""
from __future__ import annotations

import argparse
import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from interop.cli import COMMANDS, build_parser
from interop.config import ENVIRONMENT, Settings
from interop.runtime.processes import free_port
from tests.helpers import ROOT

SECRET = "s3cr3t-Pa55word"


def interop(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and k != "TRITON_URL"}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "interop.cli", *args], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_help_lists_every_setting_settings_reads() -> None:
    done = interop("--help", env={"COLUMNS": "100"})
    assert done.returncode == 0
    listed = done.stdout.split("settings (environment variables", 1)[1]
    names = re.findall(r"^  ([A-Z][A-Z0-9_]+)\b", listed, re.M)
    assert names == [name for name, _attr, _default, _text in ENVIRONMENT]
    assert {"DATABASE_URL", "TRITON_URL", "DICOMWEB_URL", "INTEROP_PSEUDONYM_KEY", "ANALYTICS_DATABASE_URL",
            "INTEROP_DATA_DIR"} <= set(names)
    # Every field of Settings is set from exactly one listed variable (none is read unlisted) ...
    attrs = [attr for _name, attr, _default, _text in ENVIRONMENT]
    assert sorted(attrs) == sorted(f.name for f in fields(Settings) if f.name != "environ")
    # ... and each listed one reaches its field (a distinct value per variable, read back).
    env: dict[str, str] = {}
    for name, attr, _default, _text in ENVIRONMENT:
        kind = str({f.name: f.type for f in fields(Settings)}[attr])
        env[name] = "30" if name == "INTEROP_TOKEN_SECONDS" else str(1000 + len(env)) if kind == "int" \
            else f"/tmp/{name.lower()}" if "Path" in kind else f"value-of-{name}"
    settings = Settings.from_env(env)
    for name, attr, _default, _text in ENVIRONMENT:
        assert str(getattr(settings, attr)) == env[name], name
    # Meanings and defaults are shown, wrapped under their name.
    section = listed.split("INTEROP_PSEUDONYM_KEY", 1)[1].split("\n  INTEROP_PSEUDONYM_KEY_FILE", 1)[0]
    assert "secret of the analytics patient keys" in " ".join(section.split())
    assert re.search(r"INTEROP_HTTP_PORT\s+port of the FHIR API.*\[default: 8080\]", " ".join(listed.split()))
    assert max(len(line) for line in listed.splitlines()) <= 100
    # Only Settings reads the environment (the sites file's secrets go through Settings.secret).
    readers = [str(p.relative_to(ROOT)) for p in (ROOT / "interop").rglob("*.py")
               if re.search(r"os\.environ\b|os\.getenv\(|getenv\(", p.read_text(encoding="utf-8"))]
    assert readers == ["interop/config.py"]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_has_a_real_help() -> None:
    commands = _subcommands(build_parser())
    assert set(commands) == set(COMMANDS)
    for name, sub in commands.items():
        text = sub.format_help()
        assert sub.description and len(sub.description) > 80, name
        assert " ".join(sub.description.split())[:40] in " ".join(text.split()), name
        for action in sub._actions:
            assert action.help, f"interop {name}: {action.dest} has no help"
    # As a subprocess too: the description and the arguments, exit 0.
    done = interop("outbox", "--help")
    assert done.returncode == 0 and "replay ID" in done.stdout and "the delivery to replay" in done.stdout
    done = interop("demo", "--help")
    assert done.returncode == 0 and "--seed-analytics N" in done.stdout and "real reports are never touched" \
        in " ".join(done.stdout.split())


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and SECRET not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize(("url", "expected"), [
    (f"mysql://hub:{SECRET}@db.example:3306/hub", "DATABASE_URL is not a PostgreSQL URL: the scheme is 'mysql'"),
    (f"postgresql://hub:{SECRET}@127.0.0.1:notaport/hub", "DATABASE_URL cannot be parsed: the port 'notaport'"),
    (f"host=127.0.0.1 password={SECRET} port", "DATABASE_URL cannot be parsed"),
    (f"postgresql://hub:{SECRET}@no-such-host.invalid/hub", "DATABASE_URL: the host 'no-such-host.invalid' cannot be"
                                                             " resolved"),
    (f"postgresql://hub:{SECRET}@127.0.0.1:{{port}}/hub", "DATABASE_URL: the database host 127.0.0.1:{port} cannot"
                                                          " be reached (connection refused)"),
])
def test_a_bad_database_url_is_one_line(url: str, expected: str) -> None:
    port = free_port()
    unreachable = "cannot be reached" in expected  # a service starts anyway (tests/test_mllp.py), a command stops
    for command in ("migrate", "users") if unreachable else ("migrate", "worker", "users"):
        line = _one_line(interop(command, *(["list"] if command == "users" else []),
                                 env={"DATABASE_URL": url.format(port=port)}))
        assert line.startswith(f"interop {command}: ") and expected.format(port=port) in line, line


def test_a_refused_login_or_a_missing_database_is_named(pg_server_url: str) -> None:
    nobody = make_conninfo(pg_server_url, user="nobody_at_all", password=SECRET)
    line = _one_line(interop("migrate", env={"DATABASE_URL": nobody}))
    assert "DATABASE_URL: authentication failed for user 'nobody_at_all'" in line
    assert 'role "nobody_at_all" does not exist' in line
    missing = make_conninfo(pg_server_url, dbname="no_such_database")
    line = _one_line(interop("outbox", "dead", env={"DATABASE_URL": missing}))
    assert "DATABASE_URL: the database 'no_such_database' does not exist" in line
    # A malformed number is named too, before anything is tried.
    line = _one_line(interop("migrate", env={"DATABASE_URL": pg_server_url, "INTEROP_HTTP_PORT": "80a"}))
    assert line == "interop: INTEROP_HTTP_PORT must be an integer, got '80a'"


@pytest.fixture
def not_triton() -> Iterator[int]:
    """An HTTP server that is not a Triton: 501 (no method implemented) for everything."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _serve(db_url: str, triton_url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    http_port = free_port()
    done = interop("serve", env={"DATABASE_URL": db_url, "TRITON_URL": triton_url, "INTEROP_DATA_DIR": str(tmp_path),
                                 "INTEROP_HTTP_PORT": str(http_port), "INTEROP_MLLP_PORT": str(free_port()),
                                 "INTEROP_DICOM_PORT": str(free_port())})
    assert not (tmp_path / "triton").exists()  # nothing was started
    return done


def test_a_bad_triton_url_stops_serve_at_start(db_url: str, not_triton: int, tmp_path: Path) -> None:
    port = free_port()
    line = _one_line(_serve(db_url, f"127.0.0.1:{port}", tmp_path))
    assert line.endswith(f"TRITON_URL: no Triton at http://127.0.0.1:{port} (connection refused)"), line
    line = _one_line(_serve(db_url, f"grpc://127.0.0.1:{port}", tmp_path))
    assert line.endswith(f"TRITON_URL: no Triton at grpc://127.0.0.1:{port} (connection refused)"), line
    line = _one_line(_serve(db_url, f"http://127.0.0.1:{not_triton}", tmp_path))
    assert line.endswith(f"TRITON_URL: http://127.0.0.1:{not_triton} is not a live Triton (HTTP 501 on"
                         " /v2/health/live)"), line
    line = _one_line(_serve(db_url, "http://127.0.0.1/v2", tmp_path))
    assert "TRITON_URL='http://127.0.0.1/v2' is not host:port, http://host:port or grpc://host:port" in line
    # DATABASE_URL is checked by serve as well, before its children start.
    line = _one_line(_serve(f"postgresql://hub:{SECRET}@127.0.0.1:{port}/hub", f"127.0.0.1:{port}", tmp_path))
    assert line.endswith(f"DATABASE_URL: the database host 127.0.0.1:{port} cannot be reached (connection refused)")

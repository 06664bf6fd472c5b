"""Start-up checks of the addresses the environment names: a DATABASE_URL or TRITON_URL that
cannot be used stops the command at once with one line that names the variable, the address
tried and what was wrong, instead of a traceback from deep inside a worker minutes later.

Messages never carry the password of a URL (it is replaced by `***` wherever libpq or the server
repeats it).
"""
from __future__ import annotations

import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

CONNECT_SECONDS = 5


class CheckError(RuntimeError):
    """A setting names something that cannot be used; the message says which and why (one line)."""


class Unreachable(CheckError):
    """The address is well formed but nothing answers there now: a database restarting or
    switching over looks the same, so a long-running service may start anyway and retry."""


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _where(params: dict[str, str]) -> str:
    host = params.get("host") or "the local socket"
    port = params.get("port") or "5432"
    return f"{host}:{port}" if not host.startswith("/") else f"socket {host}"


def database_params(url: str, name: str = "DATABASE_URL") -> dict[str, str]:
    """The connection parameters of `url`; CheckError when it cannot be parsed."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    password = None
    if scheme:
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if scheme not in ("postgresql", "postgres"):
            raise CheckError(f"{name} is not a PostgreSQL URL: the scheme is {scheme!r}, expected"
                             " postgresql://user:password@host:port/database")
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise CheckError(f"{name} cannot be parsed ({_one_line(_scrub(str(exc), password))}); expected"
                         " postgresql://user:password@host:port/database") from None
    port = str(params.get("port") or "")
    if port and not all(p.isdigit() for p in port.split(",")):
        raise CheckError(f"{name} cannot be parsed: the port {port!r} is not a number")
    return {k: str(v) for k, v in params.items() if v is not None}


def check_database(url: str, name: str = "DATABASE_URL") -> None:
    """Parse `url` and open (then close) one connection; CheckError saying what was wrong:
    unparseable, host unknown or unreachable, authentication refused, database missing."""
    params = database_params(url, name)
    secret = params.get("password")
    where = _where(params)
    try:
        psycopg.connect(url, connect_timeout=CONNECT_SECONDS).close()
    except psycopg.OperationalError as exc:
        text = _one_line(_scrub(str(exc), secret))
        low = text.lower()
        user, dbname = params.get("user", "(default user)"), params.get("dbname", "(default database)")
        if "password authentication failed" in low or "role" in low and "does not exist" in low \
                or "pg_hba.conf" in low or "not permitted to log in" in low or "no password supplied" in low \
                or "authentication failed" in low:
            raise CheckError(f"{name}: authentication failed for user {user!r} at {where}"
                             f" ({text.rsplit('FATAL:', 1)[-1].strip()})") from None
        if "database" in low and "does not exist" in low:
            raise CheckError(f"{name}: the database {dbname!r} does not exist at {where}") from None
        if "resolve host" in low or "could not translate host name" in low:
            raise CheckError(f"{name}: the host {params.get('host')!r} cannot be resolved (no such host name)") from None
        reason = "connection refused" if "refused" in low else "timed out" if "timeout" in low or "timed out" in low \
            else text.removeprefix("connection failed: ")
        raise Unreachable(f"{name}: the database host {where} cannot be reached ({reason})") from None


def triton_address(url: str, name: str = "TRITON_URL") -> tuple[str, str, int]:
    """(protocol, host, port) of a Triton URL: host:port or http://host:port (HTTP),
    grpc://host:port (gRPC); CheckError when it is none of these."""
    protocol = "grpc" if url.startswith("grpc://") else "http"
    rest = url.removeprefix("grpc://").removeprefix("http://").rstrip("/")
    if "://" in rest or "/" in rest:
        raise CheckError(f"{name}={url!r} is not host:port, http://host:port or grpc://host:port")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CheckError(f"{name}={url!r} is not host:port, http://host:port or grpc://host:port"
                         " (the port is missing or not a number)")
    return protocol, host, int(port)


def check_triton(url: str, name: str = "TRITON_URL") -> None:
    """Whether a Triton answers at `url`: the port accepts connections, and over HTTP its
    /v2/health/live says 200. CheckError naming the address tried."""
    protocol, host, port = triton_address(url, name)
    tried = f"{protocol}://{host}:{port}"
    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except socket.gaierror:
        raise CheckError(f"{name}: no Triton at {tried}: the host {host!r} cannot be resolved") from None
    except OSError as exc:
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else \
            "timed out" if isinstance(exc, TimeoutError) else exc.strerror or type(exc).__name__
        raise CheckError(f"{name}: no Triton at {tried} ({reason})") from None
    if protocol == "grpc":
        return
    live = f"http://{host if ':' not in host else f'[{host}]'}:{port}/v2/health/live"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # Triton is reached directly
    try:
        with direct.open(live, timeout=CONNECT_SECONDS) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
    except (OSError, ValueError) as exc:
        raise CheckError(f"{name}: {tried} does not answer as Triton does ({type(exc).__name__} on"
                         " /v2/health/live)") from None
    if status != 200:
        raise CheckError(f"{name}: {tried} is not a live Triton (HTTP {status} on /v2/health/live)")

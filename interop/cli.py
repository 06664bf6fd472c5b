"""The `interop` command: serve, worker, deliver, mllp, migrate, build-models, outbox, hl7,
analytics, clients, users, demo."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import textwrap
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .config import ENVIRONMENT, Settings

CHECKOUT = Path(__file__).resolve().parent.parent  # the source checkout, when run from one


def _settings_help(width: int | None = None) -> str:
    """Every setting with its meaning and default, from config.ENVIRONMENT: the list Settings.from_env
    reads, so `interop --help` cannot name a variable the hub ignores or miss one it reads."""
    width = width or max(60, min(120, shutil.get_terminal_size().columns))
    indent = " " * 32
    lines = ["settings (environment variables; each is optional, the default is used when unset):"]
    for name, _attr, default, text in ENVIRONMENT:
        shown = f" [default: {default}]" if default is not None else ""
        if len(name) >= 30:  # a long name on a line of its own
            lines.append(f"  {name}")
        lines.extend(textwrap.wrap(text + shown, width, initial_indent=f"  {name:<29} " if len(name) < 30 else indent,
                                   subsequent_indent=indent, break_on_hyphens=False))
    return "\n".join(lines)


# name -> (one-line summary for `interop --help`, description for `interop NAME --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("run the whole hub (API, workers, delivery, MLLP, DICOM) on one machine",
              "Run the hub: the FHIR API and dashboards (gunicorn, INTEROP_HTTP_PORT), INTEROP_WORKERS analysis"
              " workers, the delivery runner, the HL7 v2 MLLP listener (INTEROP_MLLP_PORT) and the DICOM Storage"
              " SCP (INTEROP_DICOM_PORT). Without DATABASE_URL an embedded PostgreSQL runs under INTEROP_DATA_DIR;"
              " without TRITON_URL the bundled tritonserver serves INTEROP_TRITON_REPO. Before anything starts it"
              " checks the ports, the TLS files, DATABASE_URL and TRITON_URL, and exits 2 with one line naming"
              " the setting that is wrong. SIGTERM/SIGINT stop everything; SIGHUP re-reads the sites file."),
    "worker": ("run one analysis worker (needs DATABASE_URL and TRITON_URL)",
               "Run one analysis worker: claim a study from the queue, fetch its images from the PACS"
               " (DICOMweb), ask Triton (TRITON_URL), store the report and queue its deliveries. Runs until"
               " SIGTERM; run as many as the machine allows. Needs DATABASE_URL."),
    "deliver": ("run the delivery runner (needs DATABASE_URL)",
                "Run the delivery runner: send results to every site's destinations (FHIR, HL7 v2 over"
                " MLLP, DICOM SR), one lane per destination (INTEROP_DELIVERY_LANES at once), retrying with"
                " back-off. Needs DATABASE_URL."),
    "mllp": ("run the HL7 v2 MLLP listener (needs DATABASE_URL)",
             "Run the HL7 v2 listener on INTEROP_MLLP_HOST:INTEROP_MLLP_PORT (TLS with INTEROP_TLS_CERT):"
             " each message is stored, then acknowledged (AA, AE or AR with ERR). Exits 3 when the port is"
             " taken. Needs DATABASE_URL."),
    "dicom-scp": ("run the DICOM Storage SCP (needs DATABASE_URL)",
                  "Run the DICOM Storage SCP (C-STORE, C-ECHO) that modalities and PACS push studies to, on"
                  " INTEROP_DICOM_HOST:INTEROP_DICOM_PORT as AE title INTEROP_DICOM_AET. Exits 3 when the"
                  " port is taken. Needs DATABASE_URL."),
    "migrate": ("apply database migrations to DATABASE_URL",
                "Apply the hub's database migrations to DATABASE_URL and print those applied (or"
                " 'up to date'). `interop serve` does this itself at start."),
    "build-models": ("build the reference model weights into INTEROP_TRITON_REPO",
                     "Build the reference models' weights into INTEROP_TRITON_REPO (deterministic; skipped"
                     " when current). Runs from the source checkout."),
    "triton-repo": ("write the models for Triton's ONNX Runtime backend (GPU nodes)",
                    "Write INTEROP_TRITON_REPO's models as a model repository for Triton's onnxruntime"
                    " backend (NVIDIA's container), for CPU or GPU instances."),
    "outbox": ("results going out: list dead letters, replay one, show the lanes",
               "Operators' view of the deliveries. dead: deliveries that were rejected or gave up, one JSON"
               " object a line; replay ID: queue that delivery again; lanes: each destination's state."
               " Needs DATABASE_URL."),
    "hl7": ("HL7 v2 messages received: list failed ones, release a control id",
            "failed: HL7 v2 messages that could not be processed, and why (one JSON object a line);"
            " release ID: let that message's control id be used again, so the sender can resend it."
            " Needs DATABASE_URL."),
    "demo": ("walk a real study through the hub, or seed the dashboard with synthetic data",
             "Send a real DICOM study and an ImagingStudy through the hub and print the report (from the"
             " source checkout). With --seed-analytics N: add N synthetic studies to the analytics schema"
             " instead (DATABASE_URL, or the embedded PostgreSQL), in one transaction: a failed run leaves"
             " the earlier data as it was, and real reports are never touched."),
    "analytics": ("provincial analytics: rebuild the facts, refresh the views",
                  "backfill: rebuild the de-identified analytics facts from the stored reports (idempotent),"
                  " then refresh; refresh: refresh the dashboard's summary views (a worker also does it every"
                  " INTEROP_ANALYTICS_REFRESH_MINUTES); clear-synthetic: remove the demo's synthetic studies"
                  " before real use. Needs DATABASE_URL; patient keys use INTEROP_PSEUDONYM_KEY."),
    "clients": ("SMART backend clients (HIS/EMR vendors, engines): add, list, disable",
                "SMART backend-services clients that may call the FHIR API with signed assertions: add one"
                " (its public keys and scopes), list them, disable one. Uses DATABASE_URL, else the"
                " embedded PostgreSQL under INTEROP_DATA_DIR."),
    "users": ("people with a local account: add, list, disable, enable, password",
              "Local accounts of the people using the worklist and the dashboard (radiologists,"
              " clinicians, analysts, admins): add, list, disable, enable, set a password (which unlocks)."
              " Uses DATABASE_URL, else the embedded PostgreSQL under INTEROP_DATA_DIR."),
}


def _command(sub: Any, name: str) -> argparse.ArgumentParser:
    summary, description = COMMANDS[name]
    return sub.add_parser(name, help=summary, description=description)  # type: ignore[no-any-return]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interop",
        description=textwrap.fill("Imaging-AI interoperability hub: FHIR/HL7 in, Triton inference, FHIR/HL7 out."
                                  " `interop COMMAND --help` describes each command.", 79),
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ("serve", "worker", "deliver", "mllp", "dicom-scp", "migrate", "build-models"):
        _command(sub, name)
    repo = _command(sub, "triton-repo")
    repo.add_argument("--out", type=Path, required=True, help="the new model repository (Triton's --model-repository)")
    repo.add_argument("--gpu", action="store_true", help="GPU instances (KIND_GPU); default CPU instances")
    repo.add_argument("--tensorrt", action="store_true", help="with --gpu: TensorRT execution provider, FP16")
    repo.add_argument("--instances", type=int, default=1, help="model instances per device [default: 1]")
    out = _command(sub, "outbox")
    out.add_argument("action", choices=["dead", "replay", "lanes"],
                     help="dead: list rejected/dead deliveries; replay ID; lanes: each destination's state")
    out.add_argument("id", nargs="?", type=int, help="the delivery to replay")
    hl7 = _command(sub, "hl7")
    hl7.add_argument("action", choices=["failed", "release"],
                     help="failed: messages that could not be processed, and why; release ID: let that message's"
                          " control id be used again (the sender resends it)")
    hl7.add_argument("id", nargs="?", type=int, help="the message to release")
    demo = _command(sub, "demo")
    demo.add_argument("--keep", action="store_true", help="leave the demo PACS data in INTEROP_DATA_DIR")
    demo.add_argument("--seed-analytics", type=int, metavar="N", default=None,
                      help="instead of the walk-through: add N synthetic studies to the analytics schema,"
                           " refresh its views and exit (running it again adds N more)")
    analytics = _command(sub, "analytics")
    analytics.add_argument("action", choices=["backfill", "refresh", "clear-synthetic"],
                           help="backfill: rebuild the facts from the stored reports (idempotent), then refresh;"
                                " refresh: refresh the materialised views (run from a timer); clear-synthetic:"
                                " delete the synthetic studies `interop demo --seed-analytics` added (real"
                                " facts are not touched), then refresh")
    analytics.add_argument("--rekey", action="store_true",
                           help="backfill: recompute every patient key with the current pseudonym secret")
    clients = _command(sub, "clients")
    clients.add_argument("action", choices=["add", "list", "disable"], help="what to do")
    clients.add_argument("name", nargs="?", help="add: a name for the client; disable: its client_id")
    clients.add_argument("--jwks", metavar="FILE_OR_URL", help="add: the client's public keys (a JWKS file, or its https URL)")
    clients.add_argument("--scopes", help='add: what it may ask for, e.g. "system/DiagnosticReport.rs system/ImagingStudy.cru"')
    clients.add_argument("--site", help="add: the facility code (sites file) it acts for: studies it pushes by STOW-RS"
                                        " are that site's")
    users = _command(sub, "users")
    users.add_argument("action", choices=["add", "list", "disable", "enable", "password"], help="what to do")
    users.add_argument("name", nargs="?", help="the account name")
    users.add_argument("--role", choices=["radiologist", "clinician", "analyst", "admin"], help="add: the person's role")
    users.add_argument("--site", help="add: a clinician's facility code (they read that site's reports only)")
    users.add_argument("--password-stdin", action="store_true",
                       help="add/password: read the password from standard input (else it is asked for)")
    return parser


# Commands that open DATABASE_URL (when it is set): it is checked first, so a wrong one is one line.
USES_DATABASE = ("worker", "deliver", "mllp", "dicom-scp", "migrate", "outbox", "hl7", "analytics", "clients",
                 "users", "demo")
NEEDS_DATABASE = ("worker", "deliver", "mllp", "dicom-scp", "migrate", "outbox", "hl7", "analytics")
# Long-running services retry a database that does not answer (a switchover, a start before the
# database's): for them only a URL that can never work stops the start.
SERVICES = ("worker", "deliver", "mllp", "dicom-scp")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        settings = Settings.from_env()
    except ValueError as exc:  # a malformed setting: named by the message, no traceback
        print(f"interop: {exc}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    # Each command imports what it runs, here: the MLLP listener need not load numpy and Triton's
    # client, nor `interop --help` the whole hub. (No cycle hides here: cli is the top layer.)
    if args.command == "serve":
        from .runtime.supervisor import StartError, serve

        try:
            return serve(settings)
        except StartError as exc:
            print(f"interop serve: {exc}", file=sys.stderr)
            return 2
    if args.command in NEEDS_DATABASE and not settings.database_url:
        parser.error("DATABASE_URL is not set")
    if args.command in USES_DATABASE and settings.database_url:
        from .runtime.checks import CheckError, Unreachable, check_database

        try:
            check_database(settings.database_url)
        except Unreachable as exc:
            if args.command not in SERVICES:
                print(f"interop {args.command}: {exc}", file=sys.stderr)
                return 2
            print(f"interop {args.command}: {exc}; starting anyway, it is retried", file=sys.stderr)
        except CheckError as exc:
            print(f"interop {args.command}: {exc}", file=sys.stderr)
            return 2
    if args.command == "worker":
        from .workers.analysis import main as worker_main

        worker_main(settings)
        return 0
    if args.command == "deliver":
        from .workers.delivery import main as deliver_main

        deliver_main(settings)
        return 0
    if args.command == "mllp":
        from .hl7.listener import main as mllp_main

        mllp_main(settings)
        return 0
    if args.command == "dicom-scp":
        from .workers.dicom_scp import main as scp_main

        scp_main(settings)
        return 0
    if args.command == "migrate":
        from .store import db

        print("\n".join(db.migrate(settings.database_url or "")) or "up to date")
        return 0
    if args.command == "build-models":
        from .runtime.supervisor import ensure_models

        ensure_models(settings.triton_repo)
        return 0
    if args.command == "triton-repo":
        from .runtime.model_repo import write_onnx_repo

        names = write_onnx_repo(settings.triton_repo, args.out, gpu=args.gpu, tensorrt=args.tensorrt,
                                instances=args.instances)
        print(f"{args.out}: {', '.join(names)} for the onnxruntime backend"
              f" ({'GPU' if args.gpu else 'CPU'}{', TensorRT FP16' if args.tensorrt else ''})")
        return 0
    if args.command == "outbox":
        return _outbox(parser, settings, args.action, args.id)
    if args.command == "hl7":
        return _hl7(parser, settings, args.action, args.id)
    if args.command == "analytics":
        return _analytics(settings, args.action, args.rekey)
    if args.command == "demo":
        return _demo(parser, settings, args.keep, args.seed_analytics)
    if args.command == "clients":
        return _clients(parser, settings, args)
    if args.command == "users":
        return _users(parser, settings, args)
    parser.print_help()
    return 2


def _print_rows(rows: list[dict[str, object]]) -> None:
    for row in rows:
        print(json.dumps(row, default=str, ensure_ascii=False))


def _outbox(parser: argparse.ArgumentParser, settings: Settings, action: str, item: int | None) -> int:
    """Operators' view of deliveries that stopped without success, and replay of one of them."""
    from .ops.admin import deliveries
    from .services.delivery import KINDS
    from .store import db, queue

    with db.connect(settings.database_url or "", autocommit=True) as conn:
        if action == "dead":
            _print_rows(deliveries(conn, ("rejected", "dead")))
            return 0
        if action == "lanes":
            _print_rows(queue.lanes(conn))
            return 0
        if item is None:
            parser.error("outbox replay needs the delivery id")
        if queue.replay(conn, item, KINDS):
            print(f"outbox row {item} queued again")
            return 0
        print(f"outbox row {item} is not dead or rejected", file=sys.stderr)
        return 1


def _hl7(parser: argparse.ArgumentParser, settings: Settings, action: str, item: int | None) -> int:
    from .store import db, hl7_messages

    with db.connect(settings.database_url or "", autocommit=True) as conn:
        if action == "failed":
            _print_rows(hl7_messages.listing(conn, ("failed",)))
            return 0
        if item is None:
            parser.error("hl7 release needs the message id (see `interop hl7 failed` or GET /hl7/messages)")
        if hl7_messages.release(conn, item):
            print(f"HL7 message {item} released: its control id can be sent again")
            return 0
        print(f"HL7 message {item} holds no control id (unknown, rejected, or already released)", file=sys.stderr)
        return 1


def _analytics(settings: Settings, action: str, rekey: bool) -> int:
    from .services.analytics import facts
    from .services.context import Context
    from .store import db

    with db.connect(settings.database_url or "", autocommit=True) as conn:
        if action == "backfill":
            count = facts.backfill(conn, Context.from_settings(settings), rekey=rekey)
            print(f"analytics facts rebuilt for {count} reports" + (" (patient keys recomputed)" if rekey else ""))
        if action == "clear-synthetic":
            from .store import analytics as store

            print(f"{store.clear_synthetic(conn)} synthetic studies removed; real facts kept")
        for name, seconds in facts.refresh(conn).items():
            print(f"refreshed {name} in {seconds:.1f}s")
    return 0


@contextmanager
def _hub_database(settings: Settings) -> Iterator[Any]:
    """A connection to the hub's database: DATABASE_URL, else the embedded one under
    INTEROP_DATA_DIR (the running hub's, joined; or started for this command and stopped after
    it), migrated."""
    from .store import db

    with ExitStack() as stack:
        url = settings.database_url
        if not url:
            from .runtime.postgres import EmbeddedPostgres

            url = stack.enter_context(EmbeddedPostgres(settings.data_dir / "postgres")).url
        db.migrate(url)
        with db.connect(url, autocommit=True) as conn:
            yield conn


def _clients(parser: argparse.ArgumentParser, settings: Settings, args: argparse.Namespace) -> int:
    from .services.security import clients

    with _hub_database(settings) as conn:
        if args.action == "list":
            _print_rows(clients.listing(conn))
            return 0
        if not args.name:
            parser.error(f"clients {args.action} needs a name")
        if args.action == "disable":
            if clients.disable(conn, args.name):
                print(f"client {args.name} disabled: its tokens stop working within seconds")
                return 0
            print(f"no enabled client {args.name}", file=sys.stderr)
            return 1
        if not args.jwks or not args.scopes:
            parser.error("clients add needs --jwks FILE_OR_URL and --scopes")
        try:
            client_id = clients.register(conn, args.name, args.jwks, args.scopes, args.site)
        except clients.ClientError as exc:
            print(f"interop clients add: {exc}", file=sys.stderr)
            return 2
        print(f"registered {args.name}; client_id: {client_id}")
    return 0


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise SystemExit("interop users: the two passwords differ")
    return first


def _users(parser: argparse.ArgumentParser, settings: Settings, args: argparse.Namespace) -> int:
    from .services.security import people
    from .store import security as accounts

    with _hub_database(settings) as conn:
        if args.action == "list":
            _print_rows(accounts.people(conn))
            return 0
        if not args.name:
            parser.error(f"users {args.action} needs the account name")
        try:
            if args.action == "add":
                if not args.role:
                    parser.error("users add needs --role")
                people.add(conn, args.name, args.role, _password(args.password_stdin), args.site)
                print(f"account {args.name} ({args.role}) added")
                return 0
            if args.action == "password":
                done = people.set_password(conn, args.name, _password(args.password_stdin))
            else:
                done = accounts.set_person(conn, args.name, disabled=args.action == "disable")
        except people.AccountError as exc:
            print(f"interop users {args.action}: {exc}", file=sys.stderr)
            return 2
        if not done:
            print(f"no account {args.name}", file=sys.stderr)
            return 1
        print(f"account {args.name}: {args.action} done" + (" (unlocked)" if args.action == "password" else ""))
    return 0


def _demo(parser: argparse.ArgumentParser, settings: Settings, keep: bool, seed: int | None) -> int:
    """The demo and its synthetic data live in the checkout's scripts/, not in the installed package."""
    if not (CHECKOUT / "scripts" / "demo.py").is_file():
        parser.error("`interop demo` runs from the source checkout (`make demo`): scripts/demo.py is not here")
    sys.path.insert(0, str(CHECKOUT))
    from scripts import demo

    if seed is None:
        return int(demo.run_demo(settings, keep=keep))
    if seed < 1:
        parser.error("--seed-analytics needs a number of studies above 0")
    import psycopg

    try:
        return int(demo.seed_analytics(settings, seed))
    except psycopg.Error as exc:  # the transaction is rolled back: nothing written, earlier data kept
        reason = exc.diag.message_primary or type(exc).__name__
        print(f"interop demo --seed-analytics: failed, nothing was written and the synthetic studies already there"
              f" are kept ({reason})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

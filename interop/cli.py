"""The `interop` command: serve, worker, deliver, mllp, migrate, build-models, outbox, hl7,
analytics, clients, users, demo."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .config import ENVIRONMENT, Settings

CHECKOUT = Path(__file__).resolve().parent.parent  # the source checkout, when run from one


def _settings_help() -> str:
    lines = ["settings (environment variables):"]
    for name, _attr, default, text in ENVIRONMENT:
        shown = f" [default: {default}]" if default is not None else ""
        lines.append(f"  {name:<28} {text}{shown}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interop",
        description="Imaging-AI interoperability hub: FHIR/HL7 in, Triton inference, FHIR/HL7 out.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="run the hub: FHIR API, workers, delivery, MLLP listener, and embedded"
                                 " PostgreSQL/Triton when not configured")
    sub.add_parser("worker", help="run one analysis worker (needs DATABASE_URL and TRITON_URL)")
    sub.add_parser("deliver", help="run the delivery runner: results to every site, one lane per destination"
                                   " (needs DATABASE_URL)")
    sub.add_parser("mllp", help="run the HL7 v2 MLLP listener (needs DATABASE_URL)")
    sub.add_parser("dicom-scp", help="run the DICOM Storage SCP modalities and PACS push studies to (needs DATABASE_URL)")
    sub.add_parser("migrate", help="apply database migrations to DATABASE_URL")
    sub.add_parser("build-models", help="build the reference model weights into INTEROP_TRITON_REPO")
    repo = sub.add_parser("triton-repo", help="write INTEROP_TRITON_REPO's models for Triton's ONNX Runtime backend"
                                              " (NVIDIA's container, GPU nodes)")
    repo.add_argument("--out", type=Path, required=True, help="the new model repository (Triton's --model-repository)")
    repo.add_argument("--gpu", action="store_true", help="GPU instances (KIND_GPU); default CPU instances")
    repo.add_argument("--tensorrt", action="store_true", help="with --gpu: TensorRT execution provider, FP16")
    repo.add_argument("--instances", type=int, default=1, help="model instances per device [default: 1]")
    out = sub.add_parser("outbox", help="results going out: list dead letters, replay one, show the lanes")
    out.add_argument("action", choices=["dead", "replay", "lanes"],
                     help="dead: list rejected/dead deliveries; replay ID; lanes: each destination's state")
    out.add_argument("id", nargs="?", type=int, help="the delivery to replay")
    hl7 = sub.add_parser("hl7", help="HL7 v2 messages received: list failed ones, release a control id")
    hl7.add_argument("action", choices=["failed", "release"],
                     help="failed: messages that could not be processed, and why; release ID: let that message's"
                          " control id be used again (the sender resends it)")
    hl7.add_argument("id", nargs="?", type=int, help="the message to release")
    demo = sub.add_parser("demo", help="send a real DICOM study and an ImagingStudy through the hub, print the report"
                                       " (from the source checkout)")
    demo.add_argument("--keep", action="store_true", help="leave the demo PACS data in INTEROP_DATA_DIR")
    demo.add_argument("--seed-analytics", type=int, metavar="N", default=None,
                      help="instead of the walk-through: write N synthetic studies into the analytics schema of"
                           " DATABASE_URL (or the embedded PostgreSQL), refresh its views and exit")
    analytics = sub.add_parser("analytics", help="provincial analytics: rebuild the facts, refresh the views")
    analytics.add_argument("action", choices=["backfill", "refresh"],
                           help="backfill: rebuild the facts from the stored reports (idempotent), then refresh;"
                                " refresh: refresh the materialised views (run from a timer)")
    analytics.add_argument("--rekey", action="store_true",
                           help="backfill: recompute every patient key with the current pseudonym secret")
    clients = sub.add_parser("clients", help="SMART backend clients (HIS/EMR vendors, engines, the warehouse):"
                                             " add, list, disable")
    clients.add_argument("action", choices=["add", "list", "disable"])
    clients.add_argument("name", nargs="?", help="add: a name for the client; disable: its client_id")
    clients.add_argument("--jwks", metavar="FILE_OR_URL", help="add: the client's public keys (a JWKS file, or its https URL)")
    clients.add_argument("--scopes", help='add: what it may ask for, e.g. "system/DiagnosticReport.rs system/ImagingStudy.cru"')
    clients.add_argument("--site", help="add: the facility code (sites file) it acts for: studies it pushes by STOW-RS"
                                        " are that site's")
    users = sub.add_parser("users", help="people with a local account (worklist, dashboard, operators): add, list,"
                                         " disable, enable, password")
    users.add_argument("action", choices=["add", "list", "disable", "enable", "password"])
    users.add_argument("name", nargs="?", help="the account name")
    users.add_argument("--role", choices=["radiologist", "clinician", "analyst", "admin"], help="add: the person's role")
    users.add_argument("--site", help="add: a clinician's facility code (they read that site's reports only)")
    users.add_argument("--password-stdin", action="store_true",
                       help="add/password: read the password from standard input (else it is asked for)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    settings = Settings.from_env()
    # Each command imports what it runs, here: the MLLP listener need not load numpy and Triton's
    # client, nor `interop --help` the whole hub. (No cycle hides here: cli is the top layer.)
    if args.command == "serve":
        from .runtime.supervisor import StartError, serve

        try:
            return serve(settings)
        except StartError as exc:
            print(f"interop serve: {exc}", file=sys.stderr)
            return 2
    if args.command in ("worker", "deliver", "mllp", "dicom-scp", "migrate", "outbox", "hl7", "analytics") \
            and not settings.database_url:
        parser.error("DATABASE_URL is not set")
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

    return int(demo.seed_analytics(settings, seed) if seed is not None else demo.run_demo(settings, keep=keep))


if __name__ == "__main__":
    sys.exit(main())

"""The `interop` command: serve, worker, deliver, mllp, migrate, build-models, outbox, hl7,
analytics, demo."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

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
    sub.add_parser("migrate", help="apply database migrations to DATABASE_URL")
    sub.add_parser("build-models", help="build the reference model weights into INTEROP_TRITON_REPO")
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
    if args.command in ("worker", "deliver", "mllp", "migrate", "outbox", "hl7", "analytics") \
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
    if args.command == "migrate":
        from .store import db

        print("\n".join(db.migrate(settings.database_url or "")) or "up to date")
        return 0
    if args.command == "build-models":
        from .runtime.supervisor import ensure_models

        ensure_models(settings.triton_repo)
        return 0
    if args.command == "outbox":
        return _outbox(parser, settings, args.action, args.id)
    if args.command == "hl7":
        return _hl7(parser, settings, args.action, args.id)
    if args.command == "analytics":
        return _analytics(settings, args.action, args.rekey)
    if args.command == "demo":
        return _demo(parser, settings, args.keep, args.seed_analytics)
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
    from .store import analytics, db

    with db.connect(settings.database_url or "", autocommit=True) as conn:
        if action == "backfill":
            count = facts.backfill(conn, Context.from_settings(settings), rekey=rekey)
            print(f"analytics facts rebuilt for {count} reports" + (" (patient keys recomputed)" if rekey else ""))
        for name, seconds in analytics.refresh(conn).items():
            print(f"refreshed {name} in {seconds:.1f}s")
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

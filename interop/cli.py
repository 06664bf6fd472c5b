"""The `interop` command: serve, worker, mllp, migrate, build-models, demo."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ENVIRONMENT, Settings


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
    sub.add_parser("serve", help="run the hub: FHIR API, workers, and embedded PostgreSQL/Triton when not configured")
    sub.add_parser("worker", help="run one inference worker (needs DATABASE_URL and TRITON_URL)")
    sub.add_parser("mllp", help="run the HL7 v2 MLLP listener (needs DATABASE_URL)")
    sub.add_parser("migrate", help="apply database migrations to DATABASE_URL")
    sub.add_parser("build-models", help="build the reference model weights into INTEROP_TRITON_REPO")
    out = sub.add_parser("outbox", help="results going out: list dead letters, replay one")
    out.add_argument("action", choices=["dead", "replay"], help="dead: list rejected/dead deliveries; replay ID")
    out.add_argument("id", nargs="?", type=int, help="the outbox row to replay")
    demo = sub.add_parser("demo", help="send a real DICOM study and an ImagingStudy through the hub, print the report")
    demo.add_argument("--keep", action="store_true", help="leave the demo PACS data in INTEROP_DATA_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    settings = Settings.from_env()
    if args.command == "serve":
        from .runtime.supervisor import serve

        return serve(settings)
    if args.command == "worker":
        from .pipeline.worker import main as worker_main

        worker_main(settings)
        return 0
    if args.command == "mllp":
        from .hl7.listener import main as mllp_main

        if not settings.database_url:
            parser.error("DATABASE_URL is not set")
        mllp_main(settings)
        return 0
    if args.command == "migrate":
        from .store import db

        if not settings.database_url:
            parser.error("DATABASE_URL is not set")
        print("\n".join(db.migrate(settings.database_url)) or "up to date")
        return 0
    if args.command == "build-models":
        from .runtime.supervisor import ensure_models

        ensure_models(settings.triton_repo)
        return 0
    if args.command == "outbox":
        return _outbox(parser, settings, args.action, args.id)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(settings, keep=args.keep)
    parser.print_help()
    return 2


def _outbox(parser: argparse.ArgumentParser, settings: Settings, action: str, item: int | None) -> int:
    """Operators' view of deliveries that stopped without an AA, and replay of one of them."""
    import json

    from .delivery import outbox
    from .store import db

    if not settings.database_url:
        parser.error("DATABASE_URL is not set")
    with db.connect(settings.database_url, autocommit=True) as conn:
        if action == "dead":
            for row in outbox.dead_letters(conn):
                print(json.dumps(row, default=str, ensure_ascii=False))
            return 0
        if item is None:
            parser.error("outbox replay needs the row id")
        if outbox.replay(conn, item):
            print(f"outbox row {item} queued again")
            return 0
        print(f"outbox row {item} is not dead or rejected", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

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
    if args.command == "analytics":
        return _analytics(parser, settings, args.action, args.rekey)
    if args.command == "demo" and args.seed_analytics is not None:
        return _seed_analytics(settings, args.seed_analytics)
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


def _database(settings: Settings) -> tuple[str, object]:
    """DATABASE_URL, or the embedded PostgreSQL under INTEROP_DATA_DIR (returned to be stopped)."""
    from .store import db

    if settings.database_url:
        db.migrate(settings.database_url)
        return settings.database_url, None
    from .runtime.postgres import EmbeddedPostgres

    server = EmbeddedPostgres(settings.data_dir / "postgres")
    url = server.start()
    db.migrate(url)
    return url, server


def _analytics(parser: argparse.ArgumentParser, settings: Settings, action: str, rekey: bool) -> int:
    from .analytics import facts
    from .sites import load
    from .store import db

    if not settings.database_url:
        parser.error("DATABASE_URL is not set")
    with db.connect(settings.database_url, autocommit=True) as conn:
        if action == "backfill":
            count = facts.backfill(conn, sites=load(settings.sites_file), rekey=rekey)
            print(f"analytics facts rebuilt for {count} reports" + (" (patient keys recomputed)" if rekey else ""))
        for name, seconds in facts.refresh(conn).items():
            print(f"refreshed {name} in {seconds:.1f}s")
    return 0


def _seed_analytics(settings: Settings, n: int) -> int:
    """`interop demo --seed-analytics N`: synthetic studies for the dashboard, then exit."""
    from .analytics import facts, seed
    from .store import db

    url, server = _database(settings)
    try:
        with db.connect(url, autocommit=True) as conn:
            seed.clear(conn)
            written = seed.seed(conn, n, sites_file=settings.sites_file, mappings_dir=settings.mappings_dir)
            facts.refresh(conn)
        print(f"{written} synthetic studies in the analytics schema; dashboard at "
              f"http://{settings.http_host}:{settings.http_port}/analytics/")
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())

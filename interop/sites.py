"""The sites file (INTEROP_SITES, default mappings/sites.yaml): the facilities the hub serves,
keyed by the facility code senders put in MSH-4. Unknown facilities have no site: their
messages are accepted and recorded, and their results have no destination."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml


class SitesError(ValueError):
    """The sites file is malformed (the message names the site and the field)."""


@dataclass(frozen=True)
class Hl7Destination:
    host: str
    port: int
    receiving_application: str = "HIS"
    receiving_facility: str = ""


@dataclass(frozen=True)
class Site:
    code: str
    name: str
    district: str | None = None
    province: str | None = None
    hl7: Hl7Destination | None = None
    exam_done_order_status: frozenset[str] = frozenset({"CM"})
    exam_done_result_status: frozenset[str] = frozenset()
    pacs_wait_minutes: int = 60
    extra: dict[str, Any] = field(default_factory=dict)


def _site(code: str, raw: dict[str, Any]) -> Site:
    if not isinstance(raw, dict) or not raw.get("name"):
        raise SitesError(f"site {code}: needs at least a name")
    hl7 = None
    if raw.get("hl7"):
        h = raw["hl7"]
        try:
            hl7 = Hl7Destination(str(h["host"]), int(h["port"]), str(h.get("receiving_application", "HIS")),
                                 str(h.get("receiving_facility", code)))
        except (KeyError, TypeError, ValueError) as exc:
            raise SitesError(f"site {code}: hl7 needs host and an integer port") from exc
    done = raw.get("exam_done") or {}
    known = {"name", "district", "province", "hl7", "exam_done", "pacs_wait_minutes"}
    return Site(
        code=code, name=str(raw["name"]), district=raw.get("district"), province=raw.get("province"), hl7=hl7,
        exam_done_order_status=frozenset(map(str, done.get("order_status", ["CM"]))),
        exam_done_result_status=frozenset(map(str, done.get("result_status", []))),
        pacs_wait_minutes=int(raw.get("pacs_wait_minutes", 60)),
        extra={k: v for k, v in raw.items() if k not in known},
    )


@lru_cache(maxsize=8)
def load(path: Path) -> dict[str, Site]:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return {str(code).upper(): _site(str(code), spec) for code, spec in (raw.get("sites") or {}).items()}


def find(sites: dict[str, Site], facility: str | None) -> Site | None:
    """The site for an MSH-4 value (HD: namespace^universal id^type; the namespace is the code)."""
    if not facility:
        return None
    return sites.get(facility.split("^")[0].strip().upper())

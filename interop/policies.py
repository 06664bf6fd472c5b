"""How each kind of queued work is run, as data: `mappings/queue.yaml` (see the comments there).

The queue engine (`interop.store.queue`) takes these numbers as arguments; the runners
(`interop.workers`) read them from here. Nothing in code decides a retry count or a priority.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

POOLS = ("analysis", "delivery")


class PolicyError(ValueError):
    """queue.yaml is malformed (the message names the kind and the field)."""


@dataclass(frozen=True)
class KindPolicy:
    kind: str
    pool: str
    priority: int
    max_attempts: int
    backoff_cap_seconds: int
    refused_attempts: int = 1


@dataclass(frozen=True)
class Breaker:
    failures: int = 3
    open_seconds: int = 15
    max_open_seconds: int = 600

    def open_for(self, failures: int) -> int | None:
        """Seconds to keep a lane closed after `failures` transport failures in a row (None: stay open)."""
        if failures < self.failures:
            return None
        return int(min(self.max_open_seconds, self.open_seconds * 2 ** (failures - self.failures)))


@dataclass(frozen=True)
class Policies:
    kinds: dict[str, KindPolicy]
    lane_concurrency: int = 1
    breaker: Breaker = Breaker()

    def kind(self, name: str) -> KindPolicy:
        try:
            return self.kinds[name]
        except KeyError:
            raise PolicyError(f"queue kind {name!r} is not described in queue.yaml") from None

    def pool(self, pool: str) -> tuple[str, ...]:
        """The kinds one pool of runners takes."""
        return tuple(sorted(k for k, p in self.kinds.items() if p.pool == pool))


def _int(kind: str, spec: dict[str, Any], name: str, default: int | None = None) -> int:
    value = spec.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PolicyError(f"queue kind {kind}: {name} must be a whole number, not {value!r}")
    return value


def load(mappings_dir: Path, job_max_attempts: int) -> Policies:
    """Read mappings/queue.yaml; `setting` for max_attempts means INTEROP_JOB_MAX_ATTEMPTS."""
    path = Path(mappings_dir) / "queue.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    kinds = {}
    for kind, spec in (raw.get("kinds") or {}).items():
        if not isinstance(spec, dict) or spec.get("pool") not in POOLS:
            raise PolicyError(f"queue kind {kind}: pool must be one of {', '.join(POOLS)}")
        if spec.get("max_attempts") == "setting":
            spec = {**spec, "max_attempts": job_max_attempts}
        kinds[str(kind)] = KindPolicy(str(kind), spec["pool"], _int(kind, spec, "priority", 5),
                                      max(1, _int(kind, spec, "max_attempts")),
                                      _int(kind, spec, "backoff_cap_seconds", 600),
                                      max(1, _int(kind, spec, "refused_attempts", 1)))
    lanes = raw.get("lanes") or {}
    breaker = lanes.get("breaker") or {}
    return Policies(kinds, max(1, _int("lanes", lanes, "concurrency", 1)),
                    Breaker(max(1, _int("breaker", breaker, "failures", 3)), _int("breaker", breaker, "open_seconds", 15),
                            _int("breaker", breaker, "max_open_seconds", 600)))

"""Which models analyse a study: rules as data in `<mappings>/routing.yaml`, matched purely.

Semantics (also written at the top of routing.yaml):
- a rule matches when every condition it names matches (a condition left out matches anything);
  list values are alternatives; text compares case-insensitively after trimming spaces;
  `procedure_codes` matches when any of the study's codes is listed;
- any-match: every matching rule adds its models, in file order, without duplicates;
- first-match where asked: a matching rule with `stop: true` ends the search after adding its
  models (`models: []` + `stop: true` excludes studies from the rules below).

`route` does no I/O; `load_rules` reads and validates the file once.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONDITIONS = ("modality", "body_part", "view_position", "laterality", "series_description", "procedure_codes")


class RoutingError(ValueError):
    """routing.yaml is malformed (message names the file and the rule)."""


@dataclass(frozen=True)
class StudyFacts:
    """What the hub knows about a study when it decides which models to run (DICOM / order terms)."""

    modality: str | None = None          # (0008,0060), e.g. CR, DX, CT
    body_part: str | None = None         # (0018,0015) Body Part Examined, e.g. CHEST
    view_position: str | None = None     # (0018,5101), e.g. PA, AP, LL
    laterality: str | None = None        # (0020,0060) / (0020,0062)
    procedure_codes: tuple[str, ...] = ()  # order / requested procedure codes (LOINC, local)
    series_description: str | None = None


@dataclass(frozen=True)
class RoutingRule:
    name: str
    models: tuple[str, ...]
    conditions: dict[str, frozenset[str]] = field(default_factory=dict)
    stop: bool = False

    def matches(self, facts: StudyFacts) -> bool:
        for key, allowed in self.conditions.items():
            if key == "procedure_codes":
                if not any(_norm(code) in allowed for code in facts.procedure_codes):
                    return False
                continue
            value = getattr(facts, key)
            if value is None or _norm(value) not in allowed:
                return False
        return True


def _norm(value: str) -> str:
    return str(value).strip().upper()


def _values(raw: Any, where: str, key: str) -> frozenset[str]:
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in items):
        raise RoutingError(f"{where}: '{key}' must be a string or a list of strings, got {raw!r}")
    return frozenset(_norm(v) for v in items)


def parse_rules(data: Any, source: str = "routing rules") -> list[RoutingRule]:
    """Validate the parsed YAML document and build the rules, in file order."""
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise RoutingError(f"{source}: expected a top-level 'rules:' list")
    rules: list[RoutingRule] = []
    for i, raw in enumerate(data["rules"]):
        where = f"{source}: rules[{i}]"
        if not isinstance(raw, dict):
            raise RoutingError(f"{where}: expected a mapping")
        unknown = set(raw) - {"name", "models", "stop", *CONDITIONS}
        if unknown:
            raise RoutingError(f"{where}: unknown keys {sorted(unknown)} (known: name, models, stop, {', '.join(CONDITIONS)})")
        models = raw.get("models")
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise RoutingError(f"{where}: 'models' must be a list of model names")
        stop = raw.get("stop", False)
        if not isinstance(stop, bool):
            raise RoutingError(f"{where}: 'stop' must be true or false")
        conditions = {key: _values(raw[key], where, key) for key in CONDITIONS if raw.get(key) is not None}
        if not conditions:
            raise RoutingError(f"{where}: a rule needs at least one condition ({', '.join(CONDITIONS)})")
        rules.append(RoutingRule(name=str(raw.get("name") or f"rule-{i}"), models=tuple(models),
                                 conditions=conditions, stop=stop))
    return rules


def load_rules(mappings_dir: Path) -> list[RoutingRule]:
    """Rules from `<mappings_dir>/routing.yaml`."""
    path = Path(mappings_dir) / "routing.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RoutingError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise RoutingError(f"{path}: not valid YAML: {exc}") from exc
    return parse_rules(data, str(path))


def route(facts: StudyFacts, rules: Sequence[RoutingRule] | Path) -> list[str]:
    """Model names for a study, in rule order; `rules` may also be a mappings folder."""
    if isinstance(rules, Path):
        rules = load_rules(rules)
    chosen: list[str] = []
    for rule in rules:
        if not rule.matches(facts):
            continue
        chosen.extend(m for m in rule.models if m not in chosen)
        if rule.stop:
            break
    return chosen


def check_models_known(rules: Iterable[RoutingRule], model_names: Iterable[str]) -> None:
    """Raise if a rule names a model with no description, so a typo fails at start-up."""
    known = set(model_names)
    for rule in rules:
        missing = [m for m in rule.models if m not in known]
        if missing:
            raise RoutingError(f"routing rule {rule.name!r} names unknown models {missing} (known: {sorted(known)})")

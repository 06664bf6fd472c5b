"""What every service needs besides a connection: the settings and the data the hub runs on.

One per process, built from `Settings` (nothing is read at import time). The sites file is live
(`Sites` reloads it when it changes); models, search parameters, HL7 tables and queue policies
are read once at start.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from inference_client.models import ModelDescription, load_models

from .. import policies
from ..config import Settings
from ..hl7.mapping import Tables, load_tables
from ..sites import Sites
from ..store.search_params import SearchParam, load
from .analytics.pseudonym import Pseudonymizer
from .analytics.pseudonym import load as load_pseudonymizer


@dataclass
class Context:
    settings: Settings
    params: dict[str, dict[str, SearchParam]]
    sites: Sites
    policies: policies.Policies
    _models: dict[str, ModelDescription] | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Context:
        return cls(settings, load(settings.mappings_dir), Sites(settings.sites_file),
                   policies.load(settings.mappings_dir, settings.job_max_attempts))

    @property
    def models(self) -> dict[str, ModelDescription]:
        """The model descriptions (mappings/models), read on first use."""
        if self._models is None:
            self._models = load_models(self.settings.mappings_dir)
        return self._models

    @cached_property
    def critical_codes(self) -> frozenset[tuple[str | None, str]]:
        """(system, code) — or (None, display) for labels without a code — of every critical label."""
        out: set[tuple[str | None, str]] = set()
        for model in self.models.values():
            for label in model.labels:
                if label.critical:
                    out.add((label.system, label.code) if label.code else (None, label.display.en))
        return frozenset(out)

    @cached_property
    def hl7_tables(self) -> Tables:
        """The HL7 v2-to-FHIR tables of INTEROP_MAPPINGS_DIR/hl7v2."""
        return load_tables(self.settings.mappings_dir / "hl7v2")

    @cached_property
    def pseudonymizer(self) -> Pseudonymizer:
        return load_pseudonymizer(self.settings)

"""Synthetic analytics facts for the demo and the benchmark: N studies across the sites file's
facilities and districts, with a rainy-season peak for pneumonia and infiltrates, a weekday
pattern, radiologist verdicts, critical findings, and a second model version whose sensitivity
drops for two findings (so the AI-versus-radiologist view has something to show).

Written straight into the fact tables with COPY (no FHIR resources): about 1 million studies
and their findings in a couple of minutes. Synthetic rows have report ids `synthetic-N` and are
marked `synthetic` (migration 0019), which `interop analytics backfill` leaves alone and
`interop analytics clear-synthetic` removes; real facts are never touched. `add()` writes in the
caller's transaction after the ones already there, so a failed run writes nothing and keeps them.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from interop.sites import load as load_sites
from interop.store.analytics import FINDING_COLUMNS, SYNTHETIC_COLUMNS, synthetic_start

CHUNK = 100_000
LOCAL = timezone(timedelta(hours=7))
# finding key -> (base weekly prevalence, seasonal amplitude, AI sensitivity, specificity)
PROFILE = {
    "Infiltration": (0.080, 0.35, 0.85, 0.93),
    "Pneumonia": (0.050, 0.60, 0.80, 0.95),
    "Effusion": (0.030, 0.10, 0.85, 0.97),
    "Consolidation": (0.025, 0.40, 0.75, 0.97),
    "Nodule": (0.020, 0.0, 0.70, 0.98),
    "Pneumothorax": (0.006, 0.0, 0.90, 0.995),
}
DEFAULT_PROFILE = (0.010, 0.0, 0.75, 0.985)
VERSIONS = ("0.1.0-reference", "0.2.0-reference")
DROP_IN_V2 = {"Nodule": 0.45, "Pneumothorax": 0.65}  # sensitivity of the second version


@dataclass(frozen=True)
class Label:
    key: str
    system: str
    code: str
    label: str
    critical: bool


def _labels(mappings_dir: Path) -> tuple[str, list[Label]]:
    from inference_client.models import load_models

    model = load_models(mappings_dir)["chest-xray"]
    return model.name, [Label(label.key, label.system if label.code else "", label.code or label.key,
                              label.display.en, label.critical) for label in model.labels]


def _copy(conn: psycopg.Connection[Any], table: str, columns: tuple[str, ...], frame: Any) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, sep="\t", header=False, index=False, na_rep="\\N", date_format="%Y-%m-%d %H:%M:%S%z")
    data = buffer.getvalue().encode("utf-8")
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for start in range(0, len(data), 8 << 20):
            copy.write(data[start:start + (8 << 20)])


def add(conn: psycopg.Connection[Any], n: int, *, sites_file: Path, mappings_dir: Path, **kwargs: Any) -> int:
    """`n` more synthetic studies after those already there, in one transaction: all of them or,
    when anything fails, none (and the earlier ones as they were). Two writers take turns."""
    with conn.transaction():
        return seed(conn, n, sites_file=sites_file, mappings_dir=mappings_dir, start_index=synthetic_start(conn),
                    **kwargs)


def seed(conn: psycopg.Connection[Any], n: int, *, sites_file: Path, mappings_dir: Path, weeks: int = 104,
         end: date | None = None, random_seed: int = 6, start_index: int = 0) -> int:
    """Write `n` synthetic studies (and their findings); returns how many."""
    import pandas as pd

    sites = [s for s in load_sites(sites_file).values()]
    if not sites:
        raise ValueError(f"{sites_file} names no sites")
    by_province: dict[Any, list[str]] = {}
    for s in sites:
        by_province.setdefault(s.province, [])
        if (s.district or "unknown") not in by_province[s.province]:
            by_province[s.province].append(s.district or "unknown")
    model_name, labels = _labels(mappings_dir)
    rng = np.random.default_rng(random_seed + start_index)
    end = end or datetime.now(LOCAL).date()
    first_day = end - timedelta(weeks=weeks) + timedelta(days=1)
    days = np.array([first_day + timedelta(days=i) for i in range((end - first_day).days + 1)])
    weights = np.array([0.6 if d.weekday() == 6 else 0.8 if d.weekday() == 5 else 1.0 for d in days])
    weights = weights * np.linspace(0.85, 1.15, len(days))  # volume grows over the period
    site_weight = np.array([3.0 if i == 0 else 1.0 for i in range(len(sites))])
    written = 0
    while written < n:
        m = min(CHUNK, n - written)
        base = start_index + written
        day_idx = rng.choice(len(days), size=m, p=weights / weights.sum())
        site_idx = rng.choice(len(sites), size=m, p=site_weight / site_weight.sum())
        moved = rng.random(m) < 0.15  # lives in another district than the facility's
        fac_district = np.array([sites[i].district or "unknown" for i in site_idx], dtype=object)
        other = np.array([by_province[sites[i].province][k % len(by_province[sites[i].province])]
                          for i, k in zip(site_idx, rng.integers(0, 1 << 30, m))], dtype=object)
        district = np.where(moved, other, fac_district)  # another district of the same province
        start_ts = np.array([datetime.combine(d, time(7), LOCAL).timestamp() for d in days])[day_idx]
        ai_at = start_ts + rng.uniform(0, 12 * 3600, m)
        ordered = ai_at - rng.lognormal(math.log(40 * 60), 0.6, m)
        images = ordered + rng.lognormal(math.log(15 * 60), 0.5, m)
        age_days = (datetime.combine(end, time(23), LOCAL).timestamp() - ai_at) / 86400
        reviewed_mask = np.where(age_days > 2, rng.random(m) < 0.995, rng.random(m) < 0.4)
        reviewed = np.where(reviewed_mask, ai_at + rng.lognormal(math.log(3 * 3600), 0.9, m), np.nan)
        delivered = np.where(reviewed_mask, reviewed + rng.lognormal(math.log(90), 0.5, m), np.nan)
        version_idx = (day_idx >= len(days) // 2).astype(int)
        week_of_year = np.array([d.isocalendar()[1] for d in days])[day_idx]
        season = np.sin(2 * math.pi * (week_of_year - 20) / 52)  # peaks in the rainy season (Aug)
        findings: dict[str, np.ndarray] = {}
        ai: dict[str, np.ndarray] = {}
        critical = np.zeros(m, dtype=bool)
        positives = np.zeros(m, dtype=int)
        for label in labels:
            prev, amp, sens, spec = PROFILE.get(label.key, DEFAULT_PROFILE)
            truth = rng.random(m) < prev * (1 + amp * season)
            sens_v = np.where(version_idx == 1, DROP_IN_V2.get(label.key, sens), sens)
            call = np.where(truth, rng.random(m) < sens_v, rng.random(m) > spec)
            findings[label.key], ai[label.key] = truth, call
            if label.critical:
                critical |= call
            positives += np.where(reviewed_mask, truth, call)
        ack = np.where(critical & (rng.random(m) < 0.92), ai_at + rng.lognormal(math.log(12 * 60), 0.7, m), np.nan)
        transfer_done = critical & (rng.random(m) < 0.4)
        ages = np.array(["0-4", "5-14", "15-24", "25-34", "35-44", "45-54", "55-64", "65-74", "75+"], dtype=object)
        patient = rng.integers(0, max(1, int((start_index + n) * 0.7)), m)

        def ts(values: np.ndarray) -> Any:
            return pd.to_datetime(values, unit="s", utc=True)

        study = pd.DataFrame({
            "report_id": [f"synthetic-{base + i}" for i in range(m)],
            "patient_key": [f"{p:064x}" for p in (patient * 2654435761 + random_seed) % (1 << 62)],
            "key_id": "synthetic",
            "age_band": ages[rng.choice(len(ages), m, p=[.04, .06, .1, .13, .15, .16, .15, .12, .09])],
            "sex": np.where(rng.random(m) < 0.52, "male", "female"),
            "district": district, "commune": None,
            "province": np.array([sites[i].province or "unknown" for i in site_idx], dtype=object),
            "facility": np.array([sites[i].code.upper() for i in site_idx], dtype=object),
            "facility_district": fac_district,
            "modality": np.where(rng.random(m) < 0.75, "CR", "DX"), "body_part": "CHEST",
            "procedure_code": "36554-4", "model_name": model_name,
            "model_version": np.array(VERSIONS, dtype=object)[version_idx],
            "report_status": np.where(reviewed_mask, "final", "preliminary"),
            "critical": critical, "positives": positives,
            "ordered_at": ts(ordered), "images_at": ts(images), "ai_result_at": ts(ai_at),
            "ai_delivered_at": ts(ai_at + 30), "reviewed_at": ts(reviewed), "delivered_at": ts(delivered),
            "acknowledged_at": ts(ack), "reviewer_group": "hub",
            "transfer_recommended": critical, "transfer_done": transfer_done, "synthetic": True,
        }, columns=list(SYNTHETIC_COLUMNS))
        _copy(conn, "analytics.study_fact", SYNTHETIC_COLUMNS, study)
        parts = []
        for j, label in enumerate(labels):
            truth, call = findings[label.key], ai[label.key]
            prob = np.where(call, rng.uniform(0.5, 0.99, m), rng.uniform(0.01, 0.49, m)).round(4)
            parts.append(pd.DataFrame({
                "report_id": study["report_id"], "observation_id": [f"s{base + i}-{j}" for i in range(m)],
                "code_system": label.system or None, "code": label.code, "label": label.label,
                "probability": prob, "ai_positive": call,
                "verdict": np.where(reviewed_mask, np.where(truth == call, "agree", "disagree"), None),
                "radiologist_positive": np.where(reviewed_mask, truth, None),
                "final_positive": np.where(reviewed_mask, truth, call),
                "critical": call & label.critical,
            }, columns=list(FINDING_COLUMNS)))
        _copy(conn, "analytics.finding_fact", FINDING_COLUMNS, pd.concat(parts, ignore_index=True))
        written += m
    return written

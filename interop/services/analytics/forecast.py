"""Forecast of weekly positive findings per district, with prediction intervals.

Method: exponential smoothing state-space model (ETS: additive error, damped additive trend;
an additive 52-week season once a series holds more than two years) from statsmodels
(`statsmodels.tsa.exponential_smoothing.ets.ETSModel`), whose prediction intervals are analytic.
Each forecast carries its back-test: the model refitted without the last `holdout` weeks,
forecast over them, and the mean absolute error (MAE) and mean absolute percentage error
(MAPE, over the held-back weeks with a non-zero count) against what happened.

A series too short for ETS (fewer than MIN_WEEKS weeks) falls back, and says so in `method`,
to the mean of its last weeks with a Poisson interval.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
Prediction = tuple[Array, Array, Array, str]  # mean, lower, upper, method

MIN_WEEKS = 20
SEASON = 52
ETS_METHOD = "ETS(A,Ad,N) exponential smoothing, statsmodels ETSModel"
ETS_SEASONAL_METHOD = "ETS(A,Ad,A) exponential smoothing with a 52-week season, statsmodels ETSModel"


@dataclass
class Forecast:
    district: str
    code: str
    label: str
    method: str
    level: float  # interval coverage, e.g. 0.95
    history: list[dict[str, Any]] = field(default_factory=list)   # week, count
    forecast: list[dict[str, Any]] = field(default_factory=list)  # week, mean, lower, upper
    backtest: dict[str, Any] | None = None                        # weeks, mae, mape

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ets(values: Array, horizon: int, alpha: float) -> Prediction:
    from statsmodels.tools.sm_exceptions import ConvergenceWarning
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    seasonal = len(values) >= 2 * SEASON + 8
    import pandas as pd

    endog = pd.Series(values.astype(float))  # a Series: get_prediction needs an index
    model = ETSModel(endog, error="add", trend="add", damped_trend=True,
                     seasonal="add" if seasonal else None, seasonal_periods=SEASON if seasonal else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = model.fit(disp=False, maxiter=200)
    frame = fit.get_prediction(start=len(values), end=len(values) + horizon - 1).summary_frame(alpha=alpha)
    mean = np.clip(frame["mean"].to_numpy(), 0, None)
    return (mean, np.clip(frame["pi_lower"].to_numpy(), 0, None), np.clip(frame["pi_upper"].to_numpy(), 0, None),
            ETS_SEASONAL_METHOD if seasonal else ETS_METHOD)


def _fallback(values: Array, horizon: int, alpha: float) -> Prediction:
    from scipy.stats import poisson

    recent = values[-8:] if len(values) else np.zeros(1)
    mu = float(recent.mean())
    lower, upper = poisson.ppf(alpha / 2, mu) if mu > 0 else 0.0, poisson.ppf(1 - alpha / 2, mu) if mu > 0 else 0.0
    method = (f"fallback: mean of the last {len(recent)} weeks with a Poisson interval "
              f"(series of {len(values)} weeks; ETS needs at least {MIN_WEEKS})")
    return np.full(horizon, mu), np.full(horizon, float(lower)), np.full(horizon, float(upper)), method


def predict(values: Sequence[float] | Array, horizon: int, alpha: float = 0.05) -> Prediction:
    """(mean, lower, upper, method) for the next `horizon` weeks."""
    series = np.asarray(values, dtype=float)
    if len(series) < MIN_WEEKS or not np.any(series):
        return _fallback(series, horizon, alpha)
    if np.ptp(series) == 0:  # a constant series: ETS has nothing to estimate
        return np.full(horizon, series[-1]), np.full(horizon, series[-1]), np.full(horizon, series[-1]), \
            "constant series: last value repeated"
    return _ets(series, horizon, alpha)


def backtest(values: Sequence[float], holdout: int, alpha: float = 0.05) -> dict[str, Any] | None:
    """Refit without the last `holdout` weeks and score the forecast of them."""
    series = np.asarray(values, dtype=float)
    if len(series) < holdout + 4:
        return None
    train, test = series[:-holdout], series[-holdout:]
    mean, lower, upper, method = predict(train, holdout, alpha)
    nonzero = test > 0
    return {
        "weeks": holdout,
        "method": method,
        "mae": round(float(np.mean(np.abs(mean - test))), 2),
        "mape": round(float(np.mean(np.abs(mean[nonzero] - test[nonzero]) / test[nonzero]) * 100), 1)
        if nonzero.any() else None,
        "coverage": round(float(np.mean((test >= lower) & (test <= upper))), 2),
    }


def weekly_series(rows: list[dict[str, Any]], start: date, end: date) -> tuple[list[date], list[float]]:
    """Fill the weeks between start and end (Mondays) with the counts of `rows` (week, positives)."""
    first = start - timedelta(days=start.weekday())
    weeks = [first + timedelta(weeks=i) for i in range(((end - first).days // 7) + 1)]
    counts = {r["week"]: float(r["positives"]) for r in rows}
    return weeks, [counts.get(w, 0.0) for w in weeks]


def forecast(rows: list[dict[str, Any]], *, district: str, code: str, label: str, start: date, end: date,
             horizon: int = 8, holdout: int = 8, level: float = 0.95) -> Forecast:
    """Forecast one district × finding series from its weekly rows."""
    if not 4 <= horizon <= 8 and horizon != 1:
        horizon = max(4, min(8, horizon))
    weeks, values = weekly_series(rows, start, end)
    alpha = 1 - level
    mean, lower, upper, method = predict(values, horizon, alpha)
    last = weeks[-1]
    return Forecast(
        district=district, code=code, label=label, method=method, level=level,
        history=[{"week": w.isoformat(), "count": int(v)} for w, v in zip(weeks, values)],
        forecast=[{"week": (last + timedelta(weeks=i + 1)).isoformat(), "mean": round(float(m), 2),
                   "lower": round(float(lo), 2), "upper": round(float(hi), 2)}
                  for i, (m, lo, hi) in enumerate(zip(mean, lower, upper))],
        backtest=backtest(values, holdout, alpha),
    )

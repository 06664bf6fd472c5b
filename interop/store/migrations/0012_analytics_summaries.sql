-- Turnaround from a maintained summary (issue 14): the exact p50/p90 minutes of each step per
-- week and facility, for every district and modality filter the dashboard can ask for, computed
-- once per changed week instead of sorting the raw facts on every read.
--
-- * analytics.stale_week: weeks whose facts changed since the summary last covered them. Triggers
--   on study_fact append a row per changed week (insert, update, delete, COPY; one row per week per
--   statement, never an update of a shared row, so concurrent writers never wait on each other).
-- * analytics.turnaround_summary: one row per week × facility × grain, where the grain is every
--   district and modality (district and modality NULL), one district, one modality, or both.
--   Percentiles do not add up, so each grain is computed from the facts, with the very expression of
--   the live query: the figures are exact, not estimated from buckets.
-- * `interop analytics refresh` (and the refresh-analytics job) takes the stale weeks and recomputes
--   only them (store/analytics.py, refresh_turnaround).
-- * Readers take the summary for clean weeks and compute stale weeks live from study_fact, in one
--   statement: a report is counted the moment its facts commit, before any refresh.

CREATE TABLE analytics.stale_week (
    study_week date        NOT NULL,
    marked_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stale_week_week ON analytics.stale_week (study_week);

CREATE FUNCTION analytics.mark_stale_weeks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO analytics.stale_week (study_week) SELECT DISTINCT study_week FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO analytics.stale_week (study_week)
        SELECT study_week FROM new_rows UNION SELECT study_week FROM old_rows;
    ELSE
        INSERT INTO analytics.stale_week (study_week) SELECT DISTINCT study_week FROM old_rows;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER study_fact_stale_insert AFTER INSERT ON analytics.study_fact
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION analytics.mark_stale_weeks();
CREATE TRIGGER study_fact_stale_update AFTER UPDATE ON analytics.study_fact
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION analytics.mark_stale_weeks();
CREATE TRIGGER study_fact_stale_delete AFTER DELETE ON analytics.study_fact
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION analytics.mark_stale_weeks();

CREATE TABLE analytics.turnaround_summary (
    study_week                date             NOT NULL,
    province                  text             NOT NULL,
    facility                  text             NOT NULL,
    district                  text,            -- NULL: every district
    modality                  text,            -- NULL: every modality
    studies                   bigint           NOT NULL,
    order_to_ai_p50           double precision,
    order_to_ai_p90           double precision,
    ai_to_reviewed_p50        double precision,
    ai_to_reviewed_p90        double precision,
    reviewed_to_delivered_p50 double precision,
    reviewed_to_delivered_p90 double precision,
    order_to_delivered_p50    double precision,
    order_to_delivered_p90    double precision
);
CREATE UNIQUE INDEX turnaround_summary_key ON analytics.turnaround_summary
    (study_week, facility, province, coalesce(district, ''), coalesce(modality, ''),
     (district IS NULL), (modality IS NULL));

-- The summary's rows of the given weeks, from the facts (what refresh stores, and what readers
-- compute live for stale weeks). Rejected reports (cancelled) are left out, as before.
CREATE FUNCTION analytics.turnaround_rollup(weeks date[]) RETURNS SETOF analytics.turnaround_summary
LANGUAGE sql STABLE AS $$
SELECT study_week, province, facility, district, modality, count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM ai_result_at - ordered_at) / 60),
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM ai_result_at - ordered_at) / 60),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM reviewed_at - ai_result_at) / 60),
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM reviewed_at - ai_result_at) / 60),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - reviewed_at) / 60),
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - reviewed_at) / 60),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - ordered_at) / 60),
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - ordered_at) / 60)
FROM analytics.study_fact
WHERE study_week = ANY (weeks) AND report_status <> 'cancelled'
GROUP BY GROUPING SETS ((study_week, province, facility), (study_week, province, facility, district),
                        (study_week, province, facility, modality),
                        (study_week, province, facility, district, modality))
$$;

-- Every week is stale until the first refresh builds the summary (reads stay exact meanwhile).
INSERT INTO analytics.stale_week (study_week) SELECT DISTINCT study_week FROM analytics.study_fact;

-- The unfiltered view, now from the summary (stale weeks live): same columns as before. The live
-- part is written out rather than calling turnaround_rollup, so that an analyst granted only the
-- view reads it with the view owner's rights (a function would run with the analyst's).
CREATE OR REPLACE VIEW analytics.turnaround_weekly AS
WITH stale AS (SELECT DISTINCT study_week FROM analytics.stale_week)
SELECT study_week AS week, province, facility, studies,
       order_to_ai_p50, order_to_ai_p90, ai_to_reviewed_p50, ai_to_reviewed_p90,
       reviewed_to_delivered_p50, reviewed_to_delivered_p90, order_to_delivered_p50, order_to_delivered_p90
FROM analytics.turnaround_summary
WHERE district IS NULL AND modality IS NULL AND study_week NOT IN (SELECT study_week FROM stale)
UNION ALL
SELECT study_week, province, facility, count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM ai_result_at - ordered_at) / 60),
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM ai_result_at - ordered_at) / 60),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM reviewed_at - ai_result_at) / 60),
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM reviewed_at - ai_result_at) / 60),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - reviewed_at) / 60),
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - reviewed_at) / 60),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - ordered_at) / 60),
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - ordered_at) / 60)
FROM analytics.study_fact
WHERE report_status <> 'cancelled' AND study_week = ANY (ARRAY(SELECT study_week FROM stale))
GROUP BY study_week, province, facility;

-- Forecasts kept by the refresh (services/analytics/forecasting.py): every district × finding
-- series of the dashboard's default period, under a digest of the forecast's inputs (the series'
-- weeks and counts, horizon, hold-out, level), so a request with the same series reads it instead
-- of refitting. District names, finding codes and counts only.
CREATE TABLE analytics.forecast_cache (
    key         text        PRIMARY KEY,  -- SHA-256 of the inputs
    body        jsonb       NOT NULL,     -- the forecast as /analytics/api/forecast returns it
    computed_at timestamptz NOT NULL DEFAULT now()
);

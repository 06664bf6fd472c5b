-- Provincial analytics (issue 6), schema `analytics`: de-identified facts, one row per analysed
-- study (one per AI report) and one per finding, written by interop.analytics.facts.record in the
-- transaction that changes the report, its review, its delivery or its critical alert.
-- No names, identifiers, dates of birth, addresses or free text: see docs/ANALYTICS.md.
-- Days and weeks are local to Vietnam (Asia/Ho_Chi_Minh); a week starts on Monday.
CREATE SCHEMA analytics;

CREATE TABLE analytics.study_fact (
    report_id            text        PRIMARY KEY,  -- hub-internal link for updates; never exported
    patient_key          text,                     -- HMAC-SHA256(secret, identifier system|value), hex
    key_id               text,                     -- fingerprint of the secret that made patient_key
    age_band             text,                     -- at the study date: 0-4, 5-14, ... 75+
    sex                  text,                     -- FHIR administrative gender
    district             text        NOT NULL DEFAULT 'unknown', -- residence district, else the facility's
    commune              text,                     -- Address.city of the residence (commune / ward)
    province             text        NOT NULL DEFAULT 'unknown',
    facility             text        NOT NULL DEFAULT 'unknown', -- site code from the sites file
    facility_district    text,
    modality             text        NOT NULL DEFAULT 'unknown',
    body_part            text,
    procedure_code       text,
    model_name           text        NOT NULL,
    model_version        text        NOT NULL,
    report_status        text        NOT NULL,     -- preliminary | final | amended | corrected | cancelled
    critical             boolean     NOT NULL DEFAULT false,
    positives            integer     NOT NULL DEFAULT 0,
    ordered_at           timestamptz,              -- ServiceRequest.authoredOn
    images_at            timestamptz,              -- the ImagingStudy reached the hub
    ai_result_at         timestamptz NOT NULL,     -- first version of the report
    ai_delivered_at      timestamptz,              -- the preliminary result was accepted (AA) by the site
    reviewed_at          timestamptz,              -- first radiologist review
    delivered_at         timestamptz,              -- the reviewed result was accepted (AA) by the site
    acknowledged_at      timestamptz,              -- critical result acknowledged
    reviewer_group       text        NOT NULL DEFAULT 'hub',
    transfer_recommended boolean     NOT NULL DEFAULT false,
    transfer_done        boolean     NOT NULL DEFAULT false,
    study_day            date GENERATED ALWAYS AS ((ai_result_at AT TIME ZONE 'Asia/Ho_Chi_Minh')::date) STORED,
    study_week           date GENERATED ALWAYS AS
                         (date_trunc('week', ai_result_at AT TIME ZONE 'Asia/Ho_Chi_Minh')::date) STORED,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX study_fact_week_facility ON analytics.study_fact (study_week, facility);
CREATE INDEX study_fact_backlog ON analytics.study_fact (reviewer_group, ai_result_at)
    WHERE report_status = 'preliminary';
CREATE INDEX study_fact_critical ON analytics.study_fact (study_week, facility) WHERE critical;
CREATE INDEX study_fact_patient ON analytics.study_fact (patient_key);

CREATE TABLE analytics.finding_fact (
    report_id            text        NOT NULL REFERENCES analytics.study_fact ON DELETE CASCADE,
    observation_id       text        NOT NULL,     -- hub-internal; never exported
    code_system          text,
    code                 text        NOT NULL,     -- the code, or the model's label key when uncoded
    label                text        NOT NULL,     -- from mappings/models, never the reviewer's words
    probability          real,                     -- NULL for a finding the radiologist added
    ai_positive          boolean,                  -- NULL for a finding the radiologist added
    verdict              text CHECK (verdict IN ('agree', 'disagree', 'added')),
    radiologist_positive boolean,
    final_positive       boolean,                  -- the radiologist's call when reviewed, else the AI's
    critical             boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (report_id, observation_id)
);

-- Aggregates the dashboard reads. Refreshed by `interop analytics refresh` (CONCURRENTLY: readers
-- are never blocked); run it from a timer, e.g. every 15 minutes. NULLs are folded to '' or
-- 'unknown' in the facts so the unique indexes (needed for CONCURRENTLY) cover every row.
CREATE MATERIALIZED VIEW analytics.mv_study_daily AS
SELECT study_day, study_week, province, district, facility, modality, model_name, model_version,
       count(*)                                          AS studies,
       count(*) FILTER (WHERE critical)                  AS critical,
       count(*) FILTER (WHERE reviewed_at IS NOT NULL)   AS reviewed
FROM analytics.study_fact
GROUP BY study_day, study_week, province, district, facility, modality, model_name, model_version;
CREATE UNIQUE INDEX mv_study_daily_key ON analytics.mv_study_daily
    (study_day, province, district, facility, modality, model_name, model_version);

CREATE MATERIALIZED VIEW analytics.mv_finding_weekly AS
SELECT s.study_week, s.province, s.district, s.facility, s.modality, s.model_name, s.model_version,
       coalesce(f.code_system, '') AS code_system, f.code, f.label,
       count(*) FILTER (WHERE f.ai_positive IS NOT NULL)                         AS assessed,
       count(*) FILTER (WHERE f.ai_positive)                                     AS ai_positive,
       count(*) FILTER (WHERE f.final_positive)                                  AS positive,
       count(*) FILTER (WHERE f.critical)                                        AS critical,
       count(*) FILTER (WHERE f.verdict IS NOT NULL)                             AS reviewed,
       count(*) FILTER (WHERE f.verdict = 'agree')                               AS agree,
       count(*) FILTER (WHERE f.verdict = 'disagree')                            AS disagree,
       count(*) FILTER (WHERE f.verdict = 'added')                               AS added,
       count(*) FILTER (WHERE f.verdict IN ('agree', 'disagree') AND f.ai_positive AND f.radiologist_positive) AS tp,
       count(*) FILTER (WHERE f.verdict IN ('agree', 'disagree') AND f.ai_positive AND NOT f.radiologist_positive) AS fp,
       count(*) FILTER (WHERE (f.verdict IN ('agree', 'disagree') AND NOT f.ai_positive AND f.radiologist_positive)
                           OR (f.verdict = 'added' AND f.radiologist_positive))  AS fn,
       count(*) FILTER (WHERE f.verdict IN ('agree', 'disagree') AND NOT f.ai_positive AND NOT f.radiologist_positive) AS tn
FROM analytics.study_fact s JOIN analytics.finding_fact f USING (report_id)
WHERE s.report_status <> 'cancelled'
GROUP BY s.study_week, s.province, s.district, s.facility, s.modality, s.model_name, s.model_version,
         coalesce(f.code_system, ''), f.code, f.label;
CREATE UNIQUE INDEX mv_finding_weekly_key ON analytics.mv_finding_weekly
    (study_week, province, district, facility, modality, model_name, model_version, code_system, code, label);
CREATE INDEX mv_finding_weekly_code ON analytics.mv_finding_weekly (code, study_week);

CREATE TABLE analytics.refresh_log (
    name         text        PRIMARY KEY,
    refreshed_at timestamptz NOT NULL,
    seconds      real        NOT NULL
);

-- The views: what the analytics answers (docs/ANALYTICS.md). Unfiltered; the dashboard and
-- the CSV exports run the same queries with filters (interop/analytics/queries.py).

-- Positive findings per week, district and finding, with the province total (level = 'province').
CREATE VIEW analytics.findings_weekly AS
SELECT study_week AS week,
       CASE WHEN grouping(district) = 1 THEN 'province' ELSE 'district' END AS level,
       province, district, code_system, code, label,
       sum(assessed)::bigint AS studies, sum(positive)::bigint AS positives,
       round(1000.0 * sum(positive) / nullif(sum(assessed), 0), 1) AS rate_per_1000
FROM analytics.mv_finding_weekly
GROUP BY GROUPING SETS ((study_week, province, district, code_system, code, label),
                        (study_week, province, code_system, code, label));

-- Turnaround per facility and week, in minutes: order -> AI result -> reviewed -> delivered.
CREATE VIEW analytics.turnaround_weekly AS
SELECT study_week AS week, province, facility, count(*) AS studies,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM ai_result_at - ordered_at) / 60) AS order_to_ai_p50,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM ai_result_at - ordered_at) / 60) AS order_to_ai_p90,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM reviewed_at - ai_result_at) / 60) AS ai_to_reviewed_p50,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM reviewed_at - ai_result_at) / 60) AS ai_to_reviewed_p90,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - reviewed_at) / 60) AS reviewed_to_delivered_p50,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - reviewed_at) / 60) AS reviewed_to_delivered_p90,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - ordered_at) / 60) AS order_to_delivered_p50,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - ordered_at) / 60) AS order_to_delivered_p90
FROM analytics.study_fact
WHERE report_status <> 'cancelled'
GROUP BY study_week, province, facility;

-- Studies per facility per day, by modality.
CREATE VIEW analytics.workload_daily AS
SELECT study_day AS day, province, facility, modality, sum(studies)::bigint AS studies
FROM analytics.mv_study_daily
GROUP BY study_day, province, facility, modality;

-- Reports waiting for a radiologist, per reviewing group (now).
CREATE VIEW analytics.review_backlog AS
SELECT reviewer_group, count(*) AS waiting,
       round((extract(epoch FROM now() - min(ai_result_at)) / 3600)::numeric, 1) AS oldest_hours,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM now() - ai_result_at)) / 3600)::numeric, 1)
           AS median_wait_hours,
       count(*) FILTER (WHERE ai_result_at < now() - interval '24 hours') AS over_24h,
       count(*) FILTER (WHERE critical) AS critical
FROM analytics.study_fact
WHERE report_status = 'preliminary'
GROUP BY reviewer_group;

-- AI versus the radiologist's verdict, per model version and finding.
CREATE VIEW analytics.ai_agreement AS
SELECT model_name, model_version, code_system, code, label,
       sum(reviewed)::bigint AS reviewed, sum(agree)::bigint AS agree, sum(disagree)::bigint AS disagree,
       sum(added)::bigint AS added, sum(tp)::bigint AS tp, sum(fp)::bigint AS fp,
       sum(fn)::bigint AS fn, sum(tn)::bigint AS tn,
       round(sum(agree)::numeric / nullif(sum(agree) + sum(disagree), 0), 3) AS agreement,
       round(sum(tp)::numeric / nullif(sum(tp) + sum(fn), 0), 3) AS sensitivity,
       round(sum(tp)::numeric / nullif(sum(tp) + sum(fp), 0), 3) AS ppv
FROM analytics.mv_finding_weekly
GROUP BY model_name, model_version, code_system, code, label;

-- Critical findings per facility and week: counts, time to acknowledgement, transfers.
CREATE VIEW analytics.critical_weekly AS
SELECT study_week AS week, province, facility, count(*) AS critical_studies,
       count(acknowledged_at) AS acknowledged,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM acknowledged_at - ai_result_at) / 60) AS ack_minutes_p50,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM acknowledged_at - ai_result_at) / 60) AS ack_minutes_p90,
       count(*) FILTER (WHERE transfer_recommended) AS transfers_recommended,
       count(*) FILTER (WHERE transfer_done) AS transfers_done
FROM analytics.study_fact
WHERE critical
GROUP BY study_week, province, facility;

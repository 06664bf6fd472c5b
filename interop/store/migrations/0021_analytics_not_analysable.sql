-- Not-analysable studies in the analytics (issue 15, the image-quality gate).
--
-- A report whose images the quality gate refused (conclusionCode urn:interop-hub:ai-result#not-analysable,
-- no finding) is a study the AI did not read: counted as a negative it would lower every rate. It is
-- marked `analysable = false`, counted in the workload, the turnaround, the backlog and the critical
-- follow-up, and left out of every rate (numerator and denominator) and of AI-radiologist agreement.
-- The mark is the AI's own reading (the report's first version): a radiologist who later reads the
-- study does not make the images readable by the AI, so a reviewed not-analysable study stays out of
-- the "per 1,000 AI-read studies" rates and agreement (docs/ANALYTICS.md).

ALTER TABLE analytics.study_fact ADD COLUMN IF NOT EXISTS analysable boolean NOT NULL DEFAULT true;

-- Existing facts, from the first version of their stored report (one index probe per report).
UPDATE analytics.study_fact s SET analysable = false
FROM resource_history h
WHERE h.type = 'DiagnosticReport' AND h.id = s.report_id AND h.version = 1 AND s.analysable
  AND h.body->'conclusionCode' @> '[{"coding": [{"system": "urn:interop-hub:ai-result", "code": "not-analysable"}]}]';

-- The rollups are recreated with the new counts; the plain views over them are dropped with them and
-- recreated unchanged. Privileges granted on any of them (e.g. to analysts, docs/ANALYTICS.md) are
-- kept: read here, granted again below.
CREATE TEMPORARY TABLE analytics_0021_grants ON COMMIT DROP AS
SELECT c.relname, a.grantee, a.privilege_type, a.is_grantable
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
WHERE n.nspname = 'analytics' AND a.grantee <> c.relowner
  AND c.relname IN ('mv_study_daily', 'mv_finding_weekly', 'findings_weekly', 'workload_daily', 'ai_agreement');

DROP VIEW IF EXISTS analytics.findings_weekly, analytics.workload_daily, analytics.ai_agreement;
DROP MATERIALIZED VIEW IF EXISTS analytics.mv_study_daily, analytics.mv_finding_weekly;

-- studies: every study (workload); ai_read / ai_read_critical: the studies the AI read, the
-- denominators and the critical numerator of the rates; not_analysable: the studies it could not read.
CREATE MATERIALIZED VIEW analytics.mv_study_daily AS
SELECT study_day, study_week, province, district, facility, modality, model_name, model_version,
       count(*)                                          AS studies,
       count(*) FILTER (WHERE critical)                  AS critical,
       count(*) FILTER (WHERE reviewed_at IS NOT NULL)   AS reviewed,
       count(*) FILTER (WHERE analysable)                AS ai_read,
       count(*) FILTER (WHERE analysable AND critical)   AS ai_read_critical,
       count(*) FILTER (WHERE NOT analysable)            AS not_analysable
FROM analytics.study_fact
GROUP BY study_day, study_week, province, district, facility, modality, model_name, model_version;
CREATE UNIQUE INDEX mv_study_daily_key ON analytics.mv_study_daily
    (study_day, province, district, facility, modality, model_name, model_version);

-- As in 0005, less the findings of not-analysable studies (a finding a radiologist added to one has
-- no AI call: it is neither a rate's numerator nor a false negative of the model).
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
WHERE s.report_status <> 'cancelled' AND s.analysable
GROUP BY s.study_week, s.province, s.district, s.facility, s.modality, s.model_name, s.model_version,
         coalesce(f.code_system, ''), f.code, f.label;
CREATE UNIQUE INDEX mv_finding_weekly_key ON analytics.mv_finding_weekly
    (study_week, province, district, facility, modality, model_name, model_version, code_system, code, label);
CREATE INDEX mv_finding_weekly_code ON analytics.mv_finding_weekly (code, study_week);

-- The plain views of 0005, unchanged.
CREATE VIEW analytics.findings_weekly AS
SELECT study_week AS week,
       CASE WHEN grouping(district) = 1 THEN 'province' ELSE 'district' END AS level,
       province, district, code_system, code, label,
       sum(assessed)::bigint AS studies, sum(positive)::bigint AS positives,
       round(1000.0 * sum(positive) / nullif(sum(assessed), 0), 1) AS rate_per_1000
FROM analytics.mv_finding_weekly
GROUP BY GROUPING SETS ((study_week, province, district, code_system, code, label),
                        (study_week, province, code_system, code, label));

CREATE VIEW analytics.workload_daily AS
SELECT study_day AS day, province, facility, modality, sum(studies)::bigint AS studies
FROM analytics.mv_study_daily
GROUP BY study_day, province, facility, modality;

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

DO $$
DECLARE g record;
BEGIN
    FOR g IN SELECT * FROM analytics_0021_grants LOOP
        EXECUTE format('GRANT %s ON analytics.%I TO %s%s', g.privilege_type, g.relname,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(g.grantee)) END,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END $$;

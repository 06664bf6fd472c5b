-- Synthetic analytics facts (`interop demo --seed-analytics`, the benchmark) are marked by a column,
-- not only by their report id: removing or replacing synthetic data deletes `WHERE synthetic`, so a
-- real report's facts are never touched, whatever its id. A real report's facts always have
-- synthetic = false (the upsert of analytics.study_fact sets it).
ALTER TABLE analytics.study_fact ADD COLUMN synthetic boolean NOT NULL DEFAULT false;
-- What the seeding wrote before this column: ids synthetic-N and the key id 'synthetic'.
UPDATE analytics.study_fact SET synthetic = true WHERE report_id LIKE 'synthetic-%' AND key_id = 'synthetic';
CREATE INDEX study_fact_synthetic ON analytics.study_fact (report_id) WHERE synthetic;

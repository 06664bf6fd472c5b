-- Issue 15: date, number and quantity search parameters (mappings/search_parameters.yaml). The store
-- indexes them at write time; this gives resources stored before it their rows, computed exactly as
-- interop.store.search_params computes them (tests/test_fhir_search_migration.py compares the two):
-- a date is the range its precision gives, [low, high) as fixed-width UTC text, in two rows: low in
-- `value` and high in `system`, and as 'param:end' high in `value` and low in `system`; a Period from its start's low to its end's high (an open end unbounded); a
-- Quantity its value as a plain decimal and its unit as system|code. A date with no time zone is UTC.
-- And ImagingStudy's basedon (R4's name) gets the rows of based-on.
SET LOCAL TimeZone = 'UTC';

CREATE FUNCTION pg_temp.fhir_date_range(t text) RETURNS text[] LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    m text[];
    low timestamptz;
    high timestamptz;
BEGIN
    m := regexp_match(btrim(t), '^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?'
                                '(Z|[+-]\d{2}:\d{2})?)?)?)?$');
    IF m IS NULL THEN
        RETURN NULL;
    END IF;
    low := (m[1] || '-' || coalesce(m[2], '01') || '-' || coalesce(m[3], '01') || ' ' || coalesce(m[4], '00') || ':'
            || coalesce(m[5], '00') || ':' || coalesce(m[6], '00') || '.' || rpad(left(coalesce(m[7], ''), 6), 6, '0')
            || CASE WHEN m[8] IS NULL OR m[8] = 'Z' THEN '+00:00' ELSE m[8] END)::timestamptz;
    high := CASE
        WHEN m[2] IS NULL THEN low + interval '1 year'
        WHEN m[3] IS NULL THEN low + interval '1 month'
        WHEN m[4] IS NULL THEN low + interval '1 day'
        WHEN m[6] IS NULL THEN low + interval '1 minute'
        WHEN m[7] IS NULL THEN low + interval '1 second'
        ELSE low + (10 ^ greatest(0, 6 - length(m[7]))) * interval '1 microsecond'
    END;
    RETURN ARRAY[to_char(low, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                 CASE WHEN m[2] IS NULL AND m[1] = '9999' THEN '9999-12-31T23:59:59.999999Z'
                      ELSE to_char(high, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') END];
EXCEPTION WHEN others THEN
    RETURN NULL;  -- not a date (2026-13): not indexed, as the store does
END $$;

CREATE FUNCTION pg_temp.fhir_range(v jsonb) RETURNS text[] LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    s text[];
    e text[];
BEGIN
    IF jsonb_typeof(v) = 'string' THEN
        RETURN pg_temp.fhir_date_range(v #>> '{}');
    END IF;
    IF jsonb_typeof(v) <> 'object' OR NOT (v ? 'start' OR v ? 'end') THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(v -> 'start') = 'string' THEN
        s := pg_temp.fhir_date_range(v ->> 'start');
        IF s IS NULL THEN RETURN NULL; END IF;
    END IF;
    IF jsonb_typeof(v -> 'end') = 'string' THEN
        e := pg_temp.fhir_date_range(v ->> 'end');
        IF e IS NULL THEN RETURN NULL; END IF;
    END IF;
    RETURN ARRAY[coalesce(s[1], '0001-01-01T00:00:00.000000Z'), coalesce(e[2], '9999-12-31T23:59:59.999999Z')];
END $$;

CREATE TEMPORARY TABLE fhir_param_0016 (type text, param text, kind text, path jsonpath) ON COMMIT DROP;
INSERT INTO fhir_param_0016 VALUES
    ('ImagingStudy', 'started', 'date', 'lax $.started'),
    ('DiagnosticReport', 'date', 'date', 'lax $.effectiveDateTime'),
    ('DiagnosticReport', 'date', 'date', 'lax $.effectivePeriod'),
    ('DiagnosticReport', 'issued', 'date', 'lax $.issued'),
    ('Observation', 'date', 'date', 'lax $.effectiveDateTime'),
    ('Observation', 'date', 'date', 'lax $.effectivePeriod'),
    ('Observation', 'date', 'date', 'lax $.effectiveInstant'),
    ('Observation', 'value-quantity', 'quantity', 'lax $.valueQuantity'),
    ('Provenance', 'recorded', 'date', 'lax $.recorded'),
    ('Task', 'authored-on', 'date', 'lax $.authoredOn'),
    ('Task', 'modified', 'date', 'lax $.lastModified'),
    ('Task', 'period', 'date', 'lax $.executionPeriod'),
    ('Patient', 'birthdate', 'date', 'lax $.birthDate'),
    ('ServiceRequest', 'authored', 'date', 'lax $.authoredOn'),
    ('ServiceRequest', 'occurrence', 'date', 'lax $.occurrenceDateTime'),
    ('ServiceRequest', 'occurrence', 'date', 'lax $.occurrencePeriod'),
    ('Encounter', 'date', 'date', 'lax $.period'),
    ('Encounter', 'length', 'quantity', 'lax $.length'),
    ('Communication', 'sent', 'date', 'lax $.sent'),
    ('Communication', 'received', 'date', 'lax $.received');

-- rows a hub already on the new code may have written while this waited: replaced, not doubled
DELETE FROM search_index s USING fhir_param_0016 p
 WHERE s.type = p.type AND (s.param = p.param OR s.param = p.param || ':end');

INSERT INTO search_index (type, id, param, system, value, last_updated)
SELECT DISTINCT r.type, r.id, e.param, e.system, e.value, r.last_updated
  FROM fhir_param_0016 p
  JOIN resource r ON r.type = p.type AND NOT r.deleted
  CROSS JOIN LATERAL jsonb_path_query(r.body, p.path) v
  CROSS JOIN LATERAL (SELECT pg_temp.fhir_range(v)) x(d)
  CROSS JOIN LATERAL (VALUES (p.param, d[2], d[1]), (p.param || ':end', d[1], d[2])) e(param, system, value)
 WHERE p.kind = 'date' AND d IS NOT NULL;

INSERT INTO search_index (type, id, param, system, value, last_updated)
SELECT DISTINCT r.type, r.id, p.param,
       CASE WHEN coalesce(v ->> 'code', v ->> 'unit') IS NOT NULL
            THEN coalesce(v ->> 'system', '') || '|' || coalesce(v ->> 'code', v ->> 'unit') END,
       (v -> 'value')::text, r.last_updated
  FROM fhir_param_0016 p
  JOIN resource r ON r.type = p.type AND NOT r.deleted
  CROSS JOIN LATERAL jsonb_path_query(r.body, p.path) v
 WHERE p.kind = 'quantity' AND jsonb_typeof(v) = 'object' AND jsonb_typeof(v -> 'value') = 'number';

-- ImagingStudy?basedon, R4's name for based-on: the same rows under that name
DELETE FROM search_index WHERE type = 'ImagingStudy' AND param = 'basedon';
INSERT INTO search_index (type, id, param, system, value, last_updated)
SELECT type, id, 'basedon', system, value, last_updated FROM search_index WHERE type = 'ImagingStudy' AND param = 'based-on';

ANALYZE search_index;

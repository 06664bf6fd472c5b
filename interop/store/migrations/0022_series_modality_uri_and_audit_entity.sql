-- Search as R4 defines it (tests/test_fhir_conformance.py).
--
-- ImagingStudy?modality is R4's ImagingStudy.series.modality: the store now indexes the series'
-- modalities beside the study-level list (mappings/search_parameters.yaml). Subscription?url is a
-- uri parameter, matched exactly as written, where it was a string one (held lower-cased, accents
-- dropped). Both parameters' rows of stored resources are rebuilt here exactly as
-- interop.store.search_params.index_rows builds them (tests/test_fhir_search_migration.py compares
-- the two): a token of a Coding is (system, code), of a CodeableConcept each coding's with a code,
-- of a string itself; a uri is the text as written. Rows longer than the store's index takes
-- (512 characters) are left out: the store would have refused them.
--
-- AuditEvent?entity is R4's AuditEvent.entity.what, the patient entities included: a search for
-- Type/id reads every version of it in `entities` and the patients in `patients`, through one
-- index on both (audit_what; interop.store.audit searches by the same expression). Running this
-- again changes nothing (tests/test_fhir_search_migration.py runs it on a migrated database).

CREATE FUNCTION pg_temp.fhir_tokens(v jsonb) RETURNS TABLE (system text, value text)
    LANGUAGE sql IMMUTABLE AS $$
    SELECT NULL, v #>> '{}' WHERE jsonb_typeof(v) = 'string'
    UNION ALL
    SELECT NULL, v::text WHERE jsonb_typeof(v) = 'boolean'
    UNION ALL  -- a CodeableConcept: each coding with a code
    SELECT c ->> 'system', c ->> 'code'
      FROM jsonb_array_elements(CASE WHEN jsonb_typeof(v) = 'object' AND jsonb_typeof(v -> 'coding') = 'array'
                                     THEN v -> 'coding' ELSE '[]' END) c
     WHERE coalesce(c ->> 'code', '') <> ''
    UNION ALL  -- a Coding
    SELECT v ->> 'system', v ->> 'code'
     WHERE jsonb_typeof(v) = 'object' AND NOT v ? 'coding' AND v ->> 'code' IS NOT NULL
    UNION ALL  -- an Identifier
    SELECT v ->> 'system', v ->> 'value'
     WHERE jsonb_typeof(v) = 'object' AND NOT v ? 'coding' AND NOT v ? 'code' AND jsonb_typeof(v -> 'value') = 'string'
$$;

-- rows a hub already on the new code may have written while this waited: replaced, not doubled
DELETE FROM search_index WHERE (type, param) IN (('ImagingStudy', 'modality'), ('Subscription', 'url'));

INSERT INTO search_index (type, id, param, system, value, last_updated)
SELECT DISTINCT r.type, r.id, 'modality', t.system, t.value, r.last_updated
  FROM resource r
  CROSS JOIN LATERAL (SELECT v FROM jsonb_path_query(r.body, 'lax $.modality[*]') v
                      UNION ALL
                      SELECT v FROM jsonb_path_query(r.body, 'lax $.series[*].modality[*]') v) m
  CROSS JOIN LATERAL pg_temp.fhir_tokens(m.v) t
 WHERE r.type = 'ImagingStudy' AND NOT r.deleted
   AND length(t.value) <= 512 AND length(coalesce(t.system, '')) <= 512;

INSERT INTO search_index (type, id, param, system, value, last_updated)
SELECT DISTINCT r.type, r.id, 'url', NULL, v #>> '{}', r.last_updated
  FROM resource r
  CROSS JOIN LATERAL jsonb_path_query(r.body, 'lax $.channel[*].endpoint[*]') v
 WHERE r.type = 'Subscription' AND NOT r.deleted AND jsonb_typeof(v) = 'string' AND length(v #>> '{}') <= 512;

ANALYZE search_index;

-- What an AuditEvent touched, as `Type/id` (a version dropped), and the patients it concerned.
CREATE OR REPLACE FUNCTION audit_what(entities text[], patients text[]) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT ARRAY(SELECT regexp_replace(e, '/_history/.*$', '') FROM unnest(entities) e) || patients
$$;
CREATE INDEX IF NOT EXISTS audit_event_what ON audit_event USING gin (audit_what(entities, patients));

-- DiagnosticReport?_tag= (issue 15). The worklist filters reports by site in SQL, over every
-- report of the status, and a site's EMR may search its reports the same way: the site is the
-- report's meta.tag `urn:interop-hub:site|CODE`. The store now indexes DiagnosticReport.meta.tag
-- (mappings/search_parameters.yaml); this gives reports stored before the rows it would have
-- written: each tag Coding with a code is one (system, code) row, as
-- interop.store.search_params.index_rows builds a token (tests/test_fhir_search_migration.py
-- compares the two). Running it again adds nothing.
INSERT INTO search_index (type, id, param, system, value, last_updated)
SELECT DISTINCT r.type, r.id, '_tag', t ->> 'system', t ->> 'code', r.last_updated
  FROM resource r
 CROSS JOIN jsonb_array_elements(CASE WHEN jsonb_typeof(r.body -> 'meta' -> 'tag') = 'array'
                                      THEN r.body -> 'meta' -> 'tag' ELSE '[]' END) t
 WHERE r.type = 'DiagnosticReport' AND NOT r.deleted
   AND jsonb_typeof(t) = 'object' AND NOT t ? 'coding' AND t ->> 'code' IS NOT NULL
   AND length(t ->> 'code') <= 512
   AND NOT EXISTS (SELECT 1 FROM search_index s WHERE s.type = r.type AND s.id = r.id AND s.param = '_tag');

-- One small covering index over the tag rows alone: the worklist reads a listed report's (or its
-- study's) site tag from the index and nothing else, where the owner index (type, id) walked every
-- search row of the resource and its table rows to find the one tag.
CREATE INDEX search_index_tag ON search_index (type, id, system, value) WHERE param = '_tag';

-- Search index rows carry their resource's last_updated (issue 14), so that a page of a search is
-- chosen from the index alone: for one value the rows of (type, param, value) are read in
-- last_updated order and the walk stops at the page's last row, however many resources match and
-- whatever the planner estimates; only the page's resources are then read. A row is written with
-- its resource's version (every write replaces a resource's rows in the same statement), so the
-- copy is never stale.
--
-- The table is rebuilt rather than updated in place: one pass that writes each row once, where an
-- UPDATE of every row would leave the old ones behind and maintain both indexes row by row.
CREATE TABLE search_index_0013 (
    type         text        NOT NULL,
    id           text        NOT NULL,
    param        text        NOT NULL,
    system       text,
    value        text        NOT NULL,
    last_updated timestamptz NOT NULL
);
INSERT INTO search_index_0013 (type, id, param, system, value, last_updated)
SELECT s.type, s.id, s.param, s.system, s.value, r.last_updated
  FROM search_index s JOIN resource r ON r.type = s.type AND r.id = s.id;
DROP TABLE search_index;
ALTER TABLE search_index_0013 RENAME TO search_index;

-- Equality on value (tokens, references, each value a string prefix expands to) reads the matches
-- in (last_updated, id) order, forwards or backwards; LIKE 'prefix%' is still a byte range
-- (text_pattern_ops). The system is included for token|system searches without the table.
CREATE INDEX search_index_lookup ON search_index (type, param, value text_pattern_ops, last_updated, id)
    INCLUDE (system);
CREATE INDEX search_index_owner ON search_index (type, id);

-- type, param and value are far from independent (a value of one parameter is rarely a value of
-- another): estimates of how common a value is are taken from their combinations.
CREATE STATISTICS search_index_values (mcv) ON type, param, value FROM search_index;
ANALYZE search_index;

-- Type- and system-level _history (issue 15) read a type's versions newest first, a page at a time:
-- without this index each page sorted every version of the type.
CREATE INDEX resource_history_type_updated ON resource_history (type, last_updated, id, version);

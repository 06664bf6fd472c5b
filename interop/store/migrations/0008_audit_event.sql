-- The audit trail in a table of its own (issue 12): append-only, one narrow row per AuditEvent.
-- Every read is audited, so a record must cost one short row, not a FHIR resource's body, its
-- history copy and a dozen index rows; the AuditEvent is rebuilt from the row when it is read
-- (interop.domain.audit). Served at /fhir/AuditEvent.
CREATE TABLE audit_event (
    id             bigserial   PRIMARY KEY,
    recorded       timestamptz NOT NULL DEFAULT clock_timestamp(),
    type           text        NOT NULL,   -- rest | 110114 (user authentication)
    subtype_system text        NOT NULL,
    subtype        text        NOT NULL,   -- the interaction or operation (read, search-type, worklist-sign, 110122 ...)
    action         text        NOT NULL,   -- C R U D E
    outcome        text        NOT NULL,   -- 0 success, 4 minor failure, 8 serious failure
    client         text,                   -- the machine client (its client_id)
    person         text,                   -- the person (account name) and their role
    role           text,
    address        text,                   -- where the request came from
    entities       text[]      NOT NULL,   -- what it touched: Type/id/_history/N as served
    patients       text[]      NOT NULL,   -- which patients: Patient/id
    query          text,                   -- a search's parameters
    description    text,
    agents         text[]      GENERATED ALWAYS AS (array_remove(ARRAY[client, person], NULL)) STORED
);
CREATE INDEX audit_event_recorded ON audit_event (recorded);
CREATE INDEX audit_event_agents ON audit_event USING gin (agents);
CREATE INDEX audit_event_patients ON audit_event USING gin (patients);

-- FHIR resources as JSONB: the current version, every version, and a write-time search index.
CREATE TABLE resource (
    type         text        NOT NULL,
    id           text        NOT NULL,
    version      integer     NOT NULL,
    last_updated timestamptz NOT NULL,
    deleted      boolean     NOT NULL DEFAULT false,
    body         jsonb       NOT NULL,
    PRIMARY KEY (type, id)
);
CREATE INDEX resource_type_updated ON resource (type, last_updated, id);

CREATE TABLE resource_history (
    type         text        NOT NULL,
    id           text        NOT NULL,
    version      integer     NOT NULL,
    last_updated timestamptz NOT NULL,
    deleted      boolean     NOT NULL DEFAULT false,
    body         jsonb       NOT NULL,
    PRIMARY KEY (type, id, version)
);

-- One row per (resource, search parameter, value): tokens carry a system, references a target.
CREATE TABLE search_index (
    type   text NOT NULL,
    id     text NOT NULL,
    param  text NOT NULL,
    system text,
    value  text NOT NULL
);
CREATE INDEX search_index_lookup ON search_index (type, param, value);
CREATE INDEX search_index_owner ON search_index (type, id);

-- The work queue shared by every worker of every hub replica (claimed FOR UPDATE SKIP LOCKED).
CREATE TABLE job (
    id           bigserial   PRIMARY KEY,
    kind         text        NOT NULL,
    dedupe_key   text        UNIQUE,
    status       text        NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    payload      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    attempts     integer     NOT NULL DEFAULT 0,
    max_attempts integer     NOT NULL DEFAULT 8,
    run_after    timestamptz NOT NULL DEFAULT now(),
    leased_until timestamptz,
    worker       text,
    last_error   text,
    timings      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz
);
CREATE INDEX job_ready ON job (run_after, id) WHERE status IN ('queued', 'running');

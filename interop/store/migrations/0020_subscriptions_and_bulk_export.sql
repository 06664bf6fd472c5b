-- Issue 15: topic-based Subscriptions (the R4 Subscriptions Backport) and FHIR Bulk Data export.

-- How many events each Subscription has had since it started (the backport's
-- `events-since-subscription-start` and each notification's `event-number`): counted in the
-- transaction that queues the notification, so numbers are gapless and never repeat.
CREATE TABLE subscription_event (
    subscription_id text   PRIMARY KEY,
    events          bigint NOT NULL DEFAULT 0
);

-- A Bulk Data export (`$export`): asked by one client, run by a `bulk-export` job of the one queue,
-- polled at its status URL. Its NDJSON files are rows of bulk_export_file, in PostgreSQL rather
-- than under INTEROP_DATA_DIR: every hub replica serves the status and the files whichever worker
-- wrote them, they survive a restart with the job, a cancel or expiry deletes them in the same
-- statement, and TOAST compresses them.
CREATE TABLE bulk_export (
    id               text        PRIMARY KEY,                 -- random (128 bits), in the status URL
    client_id        text        NOT NULL,                    -- only this client may poll and download
    kind             text        NOT NULL CHECK (kind IN ('analytics', 'resources')),
    site             text,                                    -- resources: only this facility's
    request          text        NOT NULL,                    -- the kick-off URL, as the manifest repeats it
    types            text[]      NOT NULL,
    since            timestamptz,
    status           text        NOT NULL DEFAULT 'accepted'
                     CHECK (status IN ('accepted', 'in-progress', 'completed', 'failed', 'cancelled')),
    progress         text,
    transaction_time timestamptz,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    expires_at       timestamptz
);
CREATE INDEX bulk_export_client ON bulk_export (client_id, status);

CREATE TABLE bulk_export_file (
    export_id text    NOT NULL REFERENCES bulk_export ON DELETE CASCADE,
    n         integer NOT NULL,                               -- the file's number in the manifest
    type      text    NOT NULL,
    count     integer NOT NULL,
    ndjson    text    NOT NULL,
    PRIMARY KEY (export_id, n)
);

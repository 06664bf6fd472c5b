-- One queue for analyses and result deliveries (issues 10 and 11). The outbox's rows become jobs of
-- kind deliver-hl7 / deliver-fhir / notify-rest-hook, each in a lane (its destination), so one engine
-- claims, leases, retries and dead-letters everything. Lanes carry a circuit breaker.
ALTER TABLE job DROP CONSTRAINT job_status_check;
ALTER TABLE job ADD CONSTRAINT job_status_check
    CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled', 'rejected', 'dead'));
ALTER TABLE job
    ADD COLUMN priority   integer NOT NULL DEFAULT 5,  -- lower is sooner (critical results: 0)
    ADD COLUMN lane       text,                        -- deliveries: the destination, e.g. 'BVDKDN:hl7'
    ADD COLUMN series     text,                        -- deliveries: the resource, e.g. 'DiagnosticReport/<id>'
    ADD COLUMN seq        integer,                     -- deliveries: its version; lower goes first in a lane
    ADD COLUMN message    text,                        -- what was sent (ER7 or JSON), fixed before the first send
    ADD COLUMN message_id text,                        -- its MSH-10 or Bundle id
    ADD COLUMN answer     text;                        -- the peer's last answer, as received
DROP INDEX job_ready;
CREATE INDEX job_ready ON job (priority, run_after, id) WHERE status IN ('queued', 'running');
CREATE INDEX job_lane ON job (lane, status) WHERE lane IS NOT NULL AND status IN ('queued', 'running');
CREATE INDEX job_series ON job (series, seq) WHERE series IS NOT NULL;

CREATE TABLE lane (
    name            text        PRIMARY KEY,
    failures        integer     NOT NULL DEFAULT 0,   -- transport failures in a row
    open_until      timestamptz,                      -- breaker open: nothing of the lane is claimed before this
    last_error      text,
    last_failure_at timestamptz,
    last_success_at timestamptz
);

INSERT INTO job (kind, dedupe_key, status, payload, attempts, max_attempts, run_after, leased_until, worker,
                 last_error, created_at, finished_at, priority, lane, series, seq, message, message_id, answer)
SELECT CASE channel WHEN 'hl7' THEN 'deliver-hl7' WHEN 'fhir' THEN 'deliver-fhir' ELSE 'notify-rest-hook' END,
       'deliver:' || destination || ':' || resource_type || '/' || resource_id || '/' || version,
       CASE status WHEN 'pending' THEN 'queued' WHEN 'sending' THEN 'running' WHEN 'sent' THEN 'done' ELSE status END,
       jsonb_build_object('resource_type', resource_type, 'resource_id', resource_id, 'version', version),
       attempts, CASE channel WHEN 'rest-hook' THEN 5 ELSE 100 END, run_after, leased_until, worker, last_error,
       created_at, sent_at, priority, destination, resource_type || '/' || resource_id, version, payload, control_id,
       last_answer
FROM outbox ORDER BY id;
DROP TABLE outbox;

-- HL7 v2 duplicates (issue 10): only messages that were accepted hold their control id; a rejected
-- message can be sent again once fixed, and an operator can release an accepted one
-- (`interop hl7 release`). The same control id with other content is refused, never dropped.
ALTER TABLE hl7_message DROP CONSTRAINT hl7_message_sending_application_sending_facility_control_id_key;
ALTER TABLE hl7_message
    ADD COLUMN content_sha256 bytea,      -- of the message as normalised (segment separators, BOM)
    ADD COLUMN released_at    timestamptz, -- an operator let its control id be used again
    ADD COLUMN app_ack_code   text;        -- the application acknowledgement queued (MSH-16), if any
CREATE UNIQUE INDEX hl7_message_held ON hl7_message (sending_application, sending_facility, control_id)
    WHERE status <> 'rejected' AND released_at IS NULL AND control_id IS NOT NULL;

-- What operators look at when a message could not be processed: no content, only what and why.
CREATE VIEW hl7_failed AS
SELECT id, received_at, processed_at, sending_application, sending_facility, control_id, message_type, version,
       app_ack_type, app_ack_code, error
FROM hl7_message WHERE status = 'failed';

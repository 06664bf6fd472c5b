-- Results going out (HL7 ORU^R01 now; FHIR push later): one row per (report version,
-- destination), so a report version is never sent twice to the same place. Retried with
-- back-off until the peer accepts it; every answer is kept.
CREATE TABLE outbox (
    id            bigserial   PRIMARY KEY,
    channel       text        NOT NULL CHECK (channel IN ('hl7', 'fhir')),
    destination   text        NOT NULL,          -- site code : destination name
    resource_type text        NOT NULL,
    resource_id   text        NOT NULL,
    version       integer     NOT NULL,
    priority      integer     NOT NULL DEFAULT 5, -- lower is sooner (critical findings: 0)
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'sending', 'sent', 'rejected', 'dead')),
    attempts      integer     NOT NULL DEFAULT 0,
    run_after     timestamptz NOT NULL DEFAULT now(),
    leased_until  timestamptz,
    worker        text,
    payload       text,                           -- the message as sent (ER7 or JSON)
    control_id    text,                           -- MSH-10 of the message sent
    last_answer   text,                           -- the peer's ACK / OperationOutcome, as received
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    UNIQUE (channel, destination, resource_type, resource_id, version)
);
CREATE INDEX outbox_ready ON outbox (priority, run_after, id) WHERE status IN ('pending', 'sending');

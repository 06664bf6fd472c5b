-- HL7 v2 messages received over MLLP, stored as received before they are acknowledged.
-- One row per message, accepted or not: a rejected message (AR/AE) is kept with the reason.
-- The full parse and the FHIR mapping happen later in a `process-hl7` job.
CREATE TABLE hl7_message (
    id                    bigserial   PRIMARY KEY,
    received_at           timestamptz NOT NULL DEFAULT now(),
    -- MSH-3..6 as sent (whole HD value); '' rather than NULL so the duplicate key works.
    sending_application   text        NOT NULL DEFAULT '',
    sending_facility      text        NOT NULL DEFAULT '',
    receiving_application text        NOT NULL DEFAULT '',
    receiving_facility    text        NOT NULL DEFAULT '',
    -- MSH-10. NULL only when no header could be read (those are never duplicates).
    control_id            text,
    message_type          text,                 -- MSH-9.1^MSH-9.2, e.g. 'ORM^O01'
    message_structure     text,                 -- MSH-9.3 when given, e.g. 'OMI_O23'
    version               text,                 -- MSH-12.1
    processing_id         text,                 -- MSH-11
    accept_ack_type       text,                 -- MSH-15 (enhanced mode when present)
    app_ack_type          text,                 -- MSH-16
    charset               text,                 -- MSH-18 as declared
    raw                   bytea       NOT NULL, -- the exact bytes inside the MLLP frame
    ack_code              text,                 -- what we answered (AA/AE/AR or CA/CE/CR)
    ack_error             text,                 -- why, when not AA/CA (never patient data)
    status                text        NOT NULL
                          CHECK (status IN ('accepted', 'rejected', 'processed', 'failed')),
    error                 text,                 -- processing error, set by the worker
    processed_at          timestamptz,
    UNIQUE (sending_application, sending_facility, control_id)
);
CREATE INDEX hl7_message_received ON hl7_message (received_at);
CREATE INDEX hl7_message_status ON hl7_message (status) WHERE status IN ('accepted', 'failed');

-- What the radiologist said of each AI finding (the analytics issue measures agreement from it),
-- and the critical-result notifications waiting for someone to acknowledge them.
CREATE TABLE review_verdict (
    id              bigserial   PRIMARY KEY,
    report_id       text        NOT NULL,
    report_version  integer     NOT NULL,
    observation_id  text,
    code_system     text,
    code            text,
    finding         text        NOT NULL,          -- the label key / display
    ai_positive     boolean,                       -- NULL for a finding the radiologist added
    radiologist_positive boolean,
    verdict         text        NOT NULL CHECK (verdict IN ('agree', 'disagree', 'added', 'rejected')),
    action          text        NOT NULL,          -- sign | edit | reject | amend | correct
    reviewer        text        NOT NULL,          -- Practitioner reference or display
    reviewed_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX review_verdict_report ON review_verdict (report_id, report_version);

CREATE TABLE critical_alert (
    id              bigserial   PRIMARY KEY,
    report_id       text        NOT NULL UNIQUE,
    site            text,
    task_id         text        NOT NULL,          -- FHIR Task tracking the acknowledgement
    referral_id     text,                          -- ServiceRequest recommending transfer
    contact_index   integer     NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    escalated_at    timestamptz,
    acknowledged_at timestamptz,
    acknowledged_by text,
    transfer_decision text CHECK (transfer_decision IN ('transfer', 'no-transfer')),
    decided_at      timestamptz,
    decided_by      text
);

-- FHIR Subscriptions (rest-hook) are delivered through the same outbox.
ALTER TABLE outbox DROP CONSTRAINT outbox_channel_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_channel_check CHECK (channel IN ('hl7', 'fhir', 'rest-hook'));

-- Studies pushed to the hub (issue 13, the "in" half): by a modality or PACS over DICOM C-STORE
-- (`interop dicom-scp`) or over STOW-RS (POST /dicom-web/studies). An instance is acknowledged
-- only once it is kept (in the archive PACS, or under INTEROP_DATA_DIR) and its row is here.
CREATE TABLE dicom_study (
    study_uid        text        PRIMARY KEY,
    site             text,                  -- the site of the sender's AE title (or client)
    patient_id       text,
    patient_name     text,
    accession        text,
    identity_conflict text,                 -- set when instances disagree on patient ID or name
    first_received   timestamptz NOT NULL DEFAULT now(),
    last_received    timestamptz NOT NULL DEFAULT now(),
    instances        integer     NOT NULL DEFAULT 0,
    bytes            bigint      NOT NULL DEFAULT 0,
    round            integer     NOT NULL DEFAULT 1,  -- one analysis per round; an instance after analysis started opens the next
    state            text        NOT NULL DEFAULT 'receiving',  -- receiving | unmatched | analysing
    decision         text,                  -- an admin's: release | match
    service_request  text,                  -- ServiceRequest/<id> the study was matched to
    imaging_study    text                   -- ImagingStudy/<id> made for it
);
CREATE INDEX dicom_study_unmatched ON dicom_study (last_received) WHERE state = 'unmatched';

CREATE TABLE dicom_instance (
    sop_instance_uid text        PRIMARY KEY,
    study_uid        text        NOT NULL REFERENCES dicom_study,
    series_uid       text        NOT NULL,
    sop_class_uid    text        NOT NULL,
    transfer_syntax  text,
    modality         text,
    series_number    integer,
    instance_number  integer,
    series_description text,
    body_part        text,
    bytes            bigint      NOT NULL,
    sender           text,                  -- calling AE title, or the STOW client
    stored_in        text        NOT NULL,  -- the archive's base URL, or the local file
    received         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dicom_instance_study ON dicom_instance (study_uid);

"""Results going out, through one PostgreSQL outbox.

`deliver.on_report_changed` queues a report version for every destination (HL7, FHIR push,
rest-hook Subscriptions); `outbox` is the queue (rows claimed under a lease, back-off, dead
letters, replay); `sender.OutboxSender` claims rows and dispatches them by channel to
`hl7_sender` (ORU^R01 over MLLP with `mllp_client`), `fhir_push` (transaction Bundle to the
site's HIS/EMR, credentials from `fhir_auth`) and `subscriptions` (FHIR R4 rest-hook).
"""

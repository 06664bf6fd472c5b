"""HL7 v2: MLLP framing, ACKs, durable intake, order mapping to FHIR, ORU^R01 out."""

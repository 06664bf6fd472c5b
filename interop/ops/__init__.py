"""Endpoints for operators: liveness, readiness, metrics, dead letters, HL7 messages."""

"""The hub's FHIR R4 REST API (Flask)."""

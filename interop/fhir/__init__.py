"""The hub's FHIR R4 REST API: interactions, operations, errors as OperationOutcomes."""

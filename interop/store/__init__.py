"""PostgreSQL: migrations, FHIR resource store, job queue. All shared state of the hub lives here."""

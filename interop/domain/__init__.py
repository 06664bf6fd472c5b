"""The hub's vocabulary and builders: FHIR resources, Bundles, search parsing. Pure: no I/O."""

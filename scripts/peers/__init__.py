"""Stand-in peers for the demo and the tests: a PACS (Orthanc) and a RIS (MLLP)."""

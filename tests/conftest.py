"""Fixtures per peer, as plugin modules: each starts a real server on loopback."""
pytest_plugins = (
    "tests.fixtures.postgres",
    "tests.fixtures.triton",
    "tests.fixtures.orthanc",
    "tests.fixtures.auth",
    "tests.fixtures.hub",
    "tests.fixtures.validator",
    "tests.fixtures.proxy",
    "tests.fixtures.mllp",
    "tests.fixtures.fhir_server",
    "tests.fixtures.browser",
    "tests.fixtures.tls",
    "tests.fixtures.stored_report",
    "tests.fixtures.oidc",
    "tests.fixtures.fhir_check",
    "tests.fixtures.receiver",
)

"""What the API supports, as one table; the CapabilityStatement and the routes both read it."""
from __future__ import annotations

from typing import Any

from .. import __version__
from ..store.search_params import SearchParam

READ = ["read", "vread", "history-instance", "search-type"]
WRITE = ["create", "update"]

# resource type -> interactions. Reports, observations, devices and tasks are written by the hub.
RESOURCES: dict[str, list[str]] = {
    "ImagingStudy": READ + WRITE,
    "Endpoint": READ + WRITE,
    "Patient": READ + WRITE,
    "DiagnosticReport": READ,
    "Observation": READ,
    "Device": READ,
    "Task": READ,
    "ServiceRequest": READ,
    "Encounter": READ,
    "Communication": READ,
    # who made each report version: the model (and the images it read), the radiologist who signed
    "Provenance": READ,
    # rest-hook Subscriptions on DiagnosticReport (interop.domain.subscriptions)
    "Subscription": READ + WRITE,
    # the audit trail, written by the hub; for admins (system/AuditEvent.rs)
    "AuditEvent": ["read", "search-type"],
}
# the audit trail's own search (interop.domain.audit.parse_query)
AUDIT_PARAMS = [{"name": "date", "type": "date"}, *({"name": n, "type": "reference" if n in ("patient", "entity") else
                                                     "token"} for n in ("altid", "agent", "agent-name", "patient",
                                                                        "entity", "subtype", "action", "outcome",
                                                                        "address"))]
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


def writable(rtype: str) -> bool:
    return "create" in RESOURCES.get(rtype, [])


STRING_SEARCH = ("matches when the text (or a part of a name: family, each given) starts with the value, ignoring"
                 " case and accents (tran finds Trần, duc finds Đức); :exact for the text as written, :contains"
                 " for the value anywhere in it")


def _search_param(param: SearchParam) -> dict[str, str]:
    if param.type == "string":
        return {"name": param.name, "type": param.type, "documentation": STRING_SEARCH}
    return {"name": param.name, "type": param.type}


def statement(base: str, token_url: str, params: dict[str, dict[str, SearchParam]], software_date: str) -> dict[str, Any]:
    resources = []
    for rtype, interactions in RESOURCES.items():
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": i} for i in interactions],
            "versioning": "versioned-update" if "vread" in interactions else "no-version",
            "readHistory": "history-instance" in interactions,
            "updateCreate": "update" in interactions,
            "conditionalCreate": rtype == "ImagingStudy",
            "searchParam": [
                {"name": "_id", "type": "token"},
                {"name": "_lastUpdated", "type": "date"},
                *(_search_param(p) for p in params.get(rtype, {}).values()),
                *(AUDIT_PARAMS if rtype == "AuditEvent" else []),
            ],
        }
        includes = [f"{rtype}:{p.name}" for p in params.get(rtype, {}).values() if p.type == "reference"]
        if includes:
            entry["searchInclude"] = includes
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": software_date,
        "kind": "instance",
        "software": {"name": "interop-hub", "version": __version__},
        "implementation": {"description": "Imaging-AI interoperability hub", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "AI results are preliminary until a radiologist signs them.",
            "security": security(token_url),
            "resource": resources,
        }],
    }


def security(token_url: str) -> dict[str, Any]:
    """SMART Backend Services: the service and its token endpoint (the oauth-uris extension)."""
    origin = token_url.removesuffix("/auth/token")
    return {
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                 "code": "SMART-on-FHIR"}],
                     "text": "SMART Backend Services (client_credentials, private_key_jwt)"}],
        "extension": [{"url": OAUTH_URIS, "extension": [{"url": "token", "valueUri": token_url}]}],
        "description": "Every interaction but this statement needs a bearer token with system/ scopes;"
                       f" see {origin}/.well-known/smart-configuration",
    }

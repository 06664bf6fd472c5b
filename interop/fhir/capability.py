"""What the API supports, generated from what is routed: the CapabilityStatement (`/fhir/metadata`).

Two sources, so that it cannot drift from the server: the Flask URL map says which interactions,
conditional forms and operations have a route at all (ROUTED maps each rule to its R4 interaction
code), and RESOURCES declares which of them each type allows (the routes are generic over the
type; a type the hub writes refuses clients' writes with 405). A type's interactions are those both
name. Search parameters come from mappings/search_parameters.yaml with their types, and the
includes and reverse includes from its reference parameters.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from flask import current_app

from .. import __version__
from ..domain import subscriptions
from ..store.search_params import SearchParam

READ = ["read", "vread", "history-instance", "history-type", "search-type"]
WRITE = ["create", "update", "patch", "delete"]

# resource type -> the interactions it allows. Reports, observations, devices and tasks are written
# by the hub.
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

# (method, rule with its variables as *) -> what a route is, in R4's words. Type-level rules name
# the type as a variable (/fhir/*), so they serve every type RESOURCES allows.
ROUTED: dict[tuple[str, str], str] = {
    ("GET", "/fhir/*"): "search-type",
    ("POST", "/fhir/*/_search"): "search-type",
    ("POST", "/fhir/*"): "create",
    ("GET", "/fhir/*/*"): "read",
    ("PUT", "/fhir/*/*"): "update",
    ("PATCH", "/fhir/*/*"): "patch",
    ("DELETE", "/fhir/*/*"): "delete",
    ("GET", "/fhir/*/*/_history/*"): "vread",
    ("GET", "/fhir/*/*/_history"): "history-instance",
    ("GET", "/fhir/*/_history"): "history-type",
    ("PUT", "/fhir/*"): "conditional-update",
    ("DELETE", "/fhir/*"): "conditional-delete",
    ("PATCH", "/fhir/*"): "conditional-patch",
    ("POST", "/fhir"): "transaction",
    ("GET", "/fhir/_history"): "history-system",
}
SYSTEM = {"transaction": ["transaction", "batch"], "history-system": ["history-system"]}
# operations with a published definition; the hub's own are defined by their documentation
OPERATIONS = {
    "export": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
    "status": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status",
}
HUB_OPERATION = "urn:interop-hub:OperationDefinition:"
# the implementation guides a routed operation makes the hub a server of
INSTANTIATES = {
    "export": "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data",
    "status": "http://hl7.org/fhir/uv/subscriptions-backport/CapabilityStatement/backport-subscription-server-r4",
}
TOPIC_CANONICAL = ("http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
                   "capabilitystatement-subscriptiontopic-canonical")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def routed(rules: Iterable[Any] | None = None) -> list[tuple[str, str]]:
    """(method, rule with variables as *) of every route under /fhir (the app's URL map by default)."""
    out: list[tuple[str, str]] = []
    for rule in rules if rules is not None else current_app.url_map.iter_rules():
        text = re.sub(r"<[^>]+>", "*", rule.rule).rstrip("/")
        if text == "/fhir" or text.startswith("/fhir/"):
            out.extend((m, text) for m in sorted(rule.methods or ()) if m in METHODS)
    return out

# the audit trail's own search (interop.domain.audit.parse_query)
AUDIT_AGENT = ("agent.who, an identifier (urn:interop-hub:client or urn:interop-hub:person, the name): Device/name is"
               " the machine client of that name, Practitioner/name the person, a name alone either;"
               " agent:identifier=system|name as R4 writes it")
AUDIT_STRING = "starts with the value, ignoring case and accents; :exact for the text as written, :contains anywhere"
AUDIT_PARAMS: list[dict[str, str]] = [
    {"name": "date", "type": "date"}, {"name": "altid", "type": "token"},
    {"name": "agent", "type": "reference", "documentation": AUDIT_AGENT},
    {"name": "agent-name", "type": "string", "documentation": AUDIT_STRING},
    {"name": "patient", "type": "reference"},
    {"name": "entity", "type": "reference", "documentation": "entity.what: every version of Type/id, and the patients"
     " an event concerned"},
    {"name": "subtype", "type": "token"}, {"name": "action", "type": "token"}, {"name": "outcome", "type": "token"},
    {"name": "address", "type": "string", "documentation": AUDIT_STRING}]
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


def writable(rtype: str) -> bool:
    return "create" in RESOURCES.get(rtype, [])


STRING_SEARCH = ("matches when the text (or a part of a name: family, each given) starts with the value, ignoring"
                 " case and accents (tran finds Trần, duc finds Đức); :exact for the text as written, :contains"
                 " for the value anywhere in it")


DATE_SEARCH = ("a range as precise as written (2026 is the year); prefixes eq ne gt lt ge le sa eb ap as HAPI FHIR"
               " compares ranges; no time zone: UTC")
QUANTITY_SEARCH = "[prefix]number[|system|code] or [prefix]number||code; 100 stands for [99.5, 100.5)"
CHAIN_SEARCH = "chains one level: {name}.identifier=, {name}:Patient.family= (name the type when it can be another)"


def _search_param(param: SearchParam) -> dict[str, str]:
    documentation = {"string": STRING_SEARCH, "date": DATE_SEARCH, "quantity": QUANTITY_SEARCH, "number": QUANTITY_SEARCH,
                     "reference": CHAIN_SEARCH.format(name=param.name)}.get(param.type)
    if documentation is None:
        return {"name": param.name, "type": param.type}
    return {"name": param.name, "type": param.type, "documentation": documentation}


def _reverse_includes(rtype: str, params: dict[str, dict[str, SearchParam]]) -> list[str]:
    return [f"{source}:{p.name}" for source, named in params.items() if source in RESOURCES
            for p in named.values() if p.type == "reference" and p.refers_to(rtype)]


def _operations(routes: list[tuple[str, str]], rtype: str | None) -> list[dict[str, str]]:
    """Operations routed at the base (rtype None), on any type (/fhir/*/$op) or on this type."""
    names = []
    for _method, rule in routes:
        parts = rule.split("/")[2:]
        name = next((p[1:] for p in parts if p.startswith("$")), None)
        if name is None or name.startswith("export-"):  # the export's own status URL and files
            continue
        at_base = parts[0].startswith("$")
        if (rtype is None and at_base) or (rtype is not None and not at_base and parts[0] in ("*", rtype)):
            names.append(name)
    return [{"name": n, "definition": OPERATIONS.get(n, HUB_OPERATION + n)} for n in dict.fromkeys(names)]


def statement(base: str, token_url: str, params: dict[str, dict[str, SearchParam]], software_date: str,
              routes: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The CapabilityStatement of the routes (`routed()` by default) and the declared tables."""
    routes = routes if routes is not None else routed()
    found = {ROUTED[r] for r in routes if r in ROUTED}
    resources = []
    for rtype, allowed in RESOURCES.items():
        interactions = [i for i in allowed if i in found]
        writes = "update" in interactions
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": i} for i in interactions],
            "versioning": "versioned-update" if "vread" in interactions else "no-version",
            "readHistory": "history-instance" in interactions,
            "updateCreate": writes,
            "conditionalCreate": "create" in interactions,
            "conditionalRead": "full-support" if "read" in interactions else "not-supported",
            "conditionalUpdate": writes and "conditional-update" in found,
            "conditionalDelete": "single" if "delete" in interactions and "conditional-delete" in found
            else "not-supported",
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
        reverse = _reverse_includes(rtype, params) if rtype != "AuditEvent" else []
        if reverse:
            entry["searchRevInclude"] = reverse
        operations = _operations(routes, rtype)
        if operations:
            entry["operation"] = operations
        if rtype == "Subscription" and "create" in interactions:  # the backport's topic, named as its IG asks
            entry["extension"] = [{"url": TOPIC_CANONICAL, "valueCanonical": subscriptions.TOPIC}]
        resources.append(entry)
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": "AI results are preliminary until a radiologist signs them. " + SEARCH_DOCUMENTATION,
        "security": security(token_url),
        "resource": resources,
        "interaction": [{"code": code} for kind in SYSTEM if kind in found for code in SYSTEM[kind]],
        "searchParam": COMMON_PARAMS,
    }
    operations = _operations(routes, None)
    if operations:
        rest["operation"] = operations
    named = {o["name"] for o in operations} | {o["name"] for r in resources for o in r.get("operation", [])}
    instantiates = [url for name, url in INSTANTIATES.items() if name in named]
    return {
        "resourceType": "CapabilityStatement",
        **({"instantiates": instantiates} if instantiates else {}),
        "status": "active",
        "date": software_date,
        "kind": "instance",
        "software": {"name": "interop-hub", "version": __version__},
        "implementation": {"description": "Imaging-AI interoperability hub", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [rest],
    }


SEARCH_DOCUMENTATION = (
    "Search as HAPI FHIR answers it: date, number and quantity values take R4's prefixes (eq ne gt lt ge le sa"
    " eb ap) and a date is the range its precision gives (2026, 2026-12, 2026-12-01, an instant); a reference"
    " parameter chains one level (subject:Patient.identifier=, patient.family=); _has:Type:reference:parameter="
    " for the reverse; :missing=true|false on any parameter; _include, _revinclude, _summary (true, text, data,"
    " count, false), _elements, _total"
    " (none, estimate, accurate), _count, _offset, _sort=_lastUpdated or a date parameter (-issued). An unknown"
    " parameter is refused (400) unless Prefer: handling=lenient.")
COMMON_PARAMS = [
    {"name": "_id", "type": "token"},
    {"name": "_lastUpdated", "type": "date"},
    {"name": "_has", "type": "special",
     "documentation": "_has:Type:reference-parameter:parameter=value, one level"
                      " (Patient?_has:DiagnosticReport:subject:status=final)"},
]


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

"""FHIR AuditEvents after IHE Basic Audit Log Patterns (BALP): who (client and/or person, from
which address), what (the interaction, the resources, the query), which patient, and the outcome.

Pure builders; `interop.services.security.audit` stores them. An AuditEvent never carries a
token, a password or a cookie: callers give names, addresses and references only.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import __version__

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
HUB_OPERATION = "urn:interop-hub:operation"
CLIENT_ID = "urn:interop-hub:client"
PERSON_ID = "urn:interop-hub:person"

# interaction -> CRUDE action
ACTIONS = {"create": "C", "read": "R", "vread": "R", "history-instance": "R", "search-type": "E",
           "update": "U", "patch": "U", "delete": "D", "operation": "E"}
# outcome codes (R4 AuditEvent.outcome)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"

LOGIN = {"system": DCM, "code": "110122", "display": "Login"}
LOGOUT = {"system": DCM, "code": "110123", "display": "Logout"}
AUTHENTICATION = {"system": DCM, "code": "110114", "display": "User Authentication"}


@dataclass(frozen=True)
class Who:
    """The caller as the audit names it: a machine client, a person, or both (a person using a client)."""

    address: str | None
    client: str | None = None
    person: str | None = None
    role: str | None = None


@dataclass
class Event:
    """One audited happening; `what` are resource references, `patients` the patients they concern."""

    who: Who
    subtype: dict[str, str]
    action: str
    outcome: str = SUCCESS
    description: str | None = None
    what: list[str] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    query: str | None = None
    type: dict[str, str] = field(default_factory=lambda: {"system": EVENT_TYPE, "code": "rest",
                                                         "display": "RESTful Operation"})


def clean(text: str, limit: int = 200) -> str:
    """Text from a request as the audit keeps it: printable, bounded (a NUL cannot be stored)."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def interaction(code: str) -> dict[str, str]:
    return {"system": INTERACTION, "code": code}


def operation(name: str) -> dict[str, str]:
    """A subtype for the hub's own operations and page actions (sign, acknowledge, ...)."""
    return {"system": HUB_OPERATION, "code": name}


def _agent(kind: str, name: str, requestor: bool, address: str | None, role: str | None) -> dict[str, Any]:
    name = clean(name, 128)
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": {"identifier": {"system": CLIENT_ID if kind == "client" else PERSON_ID, "value": name}},
        "altId": name, "name": name, "requestor": requestor,
    }
    if role:
        agent["role"] = [{"text": role}]
    if address:
        agent["network"] = {"address": address[:64], "type": "2"}
    return agent


def _patient(ref: str) -> dict[str, Any]:
    return {"what": {"reference": ref}, "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}}


def resource(event: Event, recorded: datetime | None = None) -> dict[str, Any]:
    """The AuditEvent resource for `event`."""
    who = event.who
    agents = []
    if who.client:
        agents.append(_agent("client", who.client, who.person is None, who.address, None))
    if who.person:
        agents.append(_agent("person", who.person, True, who.address, who.role))
    if not agents:  # nobody authenticated: the address is all there is
        agents.append({"type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
                       "who": {"display": "anonymous"}, "name": "anonymous", "requestor": True,
                       **({"network": {"address": who.address[:64], "type": "2"}} if who.address else {})})
    entities: list[dict[str, Any]] = [
        {"what": {"reference": clean(ref)}, "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
         "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"}} for ref in dict.fromkeys(event.what)]
    entities += [_patient(clean(ref)) for ref in dict.fromkeys(event.patients)]
    if event.query is not None:
        entities.append({"type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                         "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
                         "query": base64.b64encode(event.query.encode()).decode()})
    body: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": event.type,
        "subtype": [event.subtype],
        "action": event.action,
        "recorded": (recorded or datetime.now(UTC)).isoformat(),
        "outcome": event.outcome,
        "agent": agents,
        "source": {"observer": {"display": f"interop-hub {__version__}"},
                   "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}]},
    }
    if event.description:
        body["outcomeDesc"] = clean(event.description, 500)
    if entities:
        body["entity"] = entities
    return body


def patients_of(resource_: dict[str, Any]) -> list[str]:
    """The patient references a resource concerns (itself, for a Patient)."""
    if resource_.get("resourceType") == "Patient" and resource_.get("id"):
        return [f"Patient/{resource_['id']}"]
    out = []
    for key in ("subject", "patient", "for"):
        ref = resource_.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str) and ref["reference"].startswith("Patient/"):
            out.append(ref["reference"])
    return out

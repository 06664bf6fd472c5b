"""FHIR AuditEvents after IHE Basic Audit Log Patterns (BALP): who (client and/or person, from
which address), what (the interaction, the resources, the query), which patient, and the outcome.

Pure builders; `interop.services.security.audit` stores them. An AuditEvent never carries a
token, a password or a cookie: callers give names, addresses and references only.
"""
from __future__ import annotations

import base64
import re
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
EVENT_TYPES = {"rest": {"system": EVENT_TYPE, "code": "rest", "display": "RESTful Operation"},
               AUTHENTICATION["code"]: AUTHENTICATION}


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
    type: dict[str, str] = field(default_factory=lambda: dict(EVENT_TYPES["rest"]))


def clean(text: str, limit: int = 200) -> str:
    """Text from a request as the audit keeps it: printable, bounded (a NUL cannot be stored)."""
    if text.isprintable():
        return text[:limit]
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


# What a FHIR Reference.reference may be: Type/id (a version too), or an absolute URI.
LITERAL_REFERENCE = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?|[a-z][a-z0-9+.\-]*:\S+")


def _entity(ref: str) -> dict[str, Any]:
    """What the event touched: a resource by its reference; anything else (a resource type
    searched, a refused request's path, an export's files) by its name, since it is no reference."""
    kind = {"type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"}}
    if not LITERAL_REFERENCE.fullmatch(ref):
        return {**kind, "name": ref}
    return {"what": {"reference": ref}, **kind, "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"}}


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
    entities: list[dict[str, Any]] = [_entity(clean(ref)) for ref in dict.fromkeys(event.what)]
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


def reference_of(ref: str) -> str:
    """`Type/id` of a reference (a version or a base URL dropped), as the audit table keeps it."""
    parts = [x for x in ref.split("/") if x]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else ref


def row_of(event: Event) -> dict[str, Any]:
    """The audit table's row for an event (interop.store.audit.COLUMNS)."""
    who = event.who
    return {"type": event.type["code"], "subtype_system": event.subtype.get("system", HUB_OPERATION),
            "subtype": event.subtype["code"], "action": event.action, "outcome": event.outcome,
            "client": clean(who.client, 128) if who.client else None,
            "person": clean(who.person, 128) if who.person else None, "role": who.role,
            "address": who.address[:64] if who.address else None,
            "entities": [clean(r) for r in dict.fromkeys(event.what)],
            "patients": [reference_of(clean(r)) for r in dict.fromkeys(event.patients)],
            "query": event.query, "description": clean(event.description, 500) if event.description else None}


def from_row(row: dict[str, Any]) -> dict[str, Any]:
    """The AuditEvent resource a stored row stands for."""
    subtype = {"system": row["subtype_system"], "code": row["subtype"]}
    if subtype == LOGIN or subtype["code"] == LOGIN["code"]:
        subtype = LOGIN
    elif subtype["code"] == LOGOUT["code"]:
        subtype = LOGOUT
    event = Event(Who(row["address"], client=row["client"], person=row["person"], role=row["role"]), subtype,
                  row["action"], outcome=row["outcome"], description=row["description"], what=list(row["entities"]),
                  patients=list(row["patients"]), query=row["query"],
                  type=EVENT_TYPES.get(row["type"], {"system": DCM, "code": row["type"]}))
    body = resource(event, row["recorded"])
    return {"resourceType": "AuditEvent", "id": str(row["id"]),
            "meta": {"versionId": "1", "lastUpdated": row["recorded"].isoformat()}, **body}


class QueryError(ValueError):
    """An AuditEvent search the hub cannot run (HTTP 400); the message is safe to return."""


@dataclass
class AuditQuery:
    """A search of the audit trail, from FHIR search parameters (`parse_query`)."""

    ids: list[int] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)  # altid: a client's or person's name
    # agent (R4: a reference, AuditEvent.agent.who): (client | person | any | none, name)
    agent_refs: list[tuple[str, str]] = field(default_factory=list)
    agent_names: list[tuple[str, str]] = field(default_factory=list)  # (modifier, text): R4 string search
    patients: list[str] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)
    subtypes: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    addresses: list[tuple[str, str]] = field(default_factory=list)  # (modifier, text): R4 string search
    recorded: list[tuple[str, datetime]] = field(default_factory=list)
    count: int = 50
    offset: int = 0
    newest_first: bool = True


# FHIR R4 AuditEvent search parameter -> AuditQuery field
QUERY_PARAMS = {"altid": "agents", "agent": "agent_refs", "agent-name": "agent_names", "patient": "patients",
                "entity": "entities", "subtype": "subtypes", "action": "actions", "outcome": "outcomes",
                "address": "addresses"}
STRING_PARAMS = ("agent-name", "address")  # R4 string parameters: :exact and :contains as for every string
# An agent's who is an identifier (CLIENT_ID or PERSON_ID, the name); as a reference the hub reads
# Device/name as the machine client of that name and Practitioner/name as the person.
AGENT_TYPES = {"Device": "client", "Practitioner": "person"}
AGENT_SYSTEMS = {CLIENT_ID: "client", PERSON_ID: "person"}
PREFIXES = ("eq", "gt", "lt", "ge", "le")
MAX_COUNT = 1000


def _instant(raw: str) -> datetime:
    text = raw.strip().replace(" ", "+").replace("Z", "+00:00")
    if len(text) == 10:
        text += "T00:00:00+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise QueryError("date: not a FHIR dateTime") from None
    if when.tzinfo is None:
        raise QueryError("date: a time zone is required")
    return when


def parse_query(args: list[tuple[str, str]], lenient: bool = False) -> AuditQuery:
    """The AuditQuery for these search parameters (`date`/`_lastUpdated` with prefixes, `_id`,
    `_count`, `_offset`, `_sort=date|-date`, and QUERY_PARAMS; OR within a parameter by commas)."""
    q = AuditQuery()
    for name, raw in args:
        if name in ("date", "_lastUpdated"):
            prefix = raw[:2] if raw[:2] in PREFIXES else "eq"
            q.recorded.append((prefix, _instant(raw[2:] if raw[:2] == prefix else raw)))
        elif name == "_id":  # AuditEvent ids are numbers: another id matches nothing
            q.ids.extend(int(v) if v.isascii() and v.isdigit() and len(v) < 19 else -1 for v in raw.split(","))
        elif name in ("_count", "_offset"):
            if not (raw.isascii() and raw.isdigit()) or int(raw) > (MAX_COUNT if name == "_count" else 10**9):
                raise QueryError(f"{name} must be a whole number (at most {MAX_COUNT} for _count)")
            setattr(q, name[1:], int(raw))
        elif name == "_sort":
            if raw not in ("date", "-date", "_lastUpdated", "-_lastUpdated"):
                raise QueryError("_sort: date or -date")
            q.newest_first = raw.startswith("-")
        elif name.partition(":")[0] in QUERY_PARAMS:
            _parameter(q, name, [v for v in raw.split(",") if v])
        elif name not in ("_format", "_pretty") and not lenient:
            raise QueryError(f"unknown AuditEvent search parameter {name[:64]!r}; known: date, _id, _count, _offset,"
                             f" _sort, {', '.join(QUERY_PARAMS)}")
    return q


def _agent_of(value: str, modifier: str) -> tuple[str, str]:
    """(which agent, name) of an `agent` value: Type/id (or a URL ending so), an id alone (either
    kind), or with :identifier system|name; an agent the hub never records matches none."""
    if modifier == "identifier":
        system, bar, code = value.rpartition("|")
        return ("any" if not bar or not system else AGENT_SYSTEMS.get(system, "none")), code
    if modifier:  # agent:Device=name
        value = f"{modifier}/{value}"
    ref = reference_of(value)
    rtype, slash, rid = ref.rpartition("/")
    return (AGENT_TYPES.get(rtype, "none"), rid) if slash else ("any", ref)


def _parameter(q: AuditQuery, key: str, values: list[str]) -> None:
    """Adds one search parameter's values (ORed) to the query."""
    name, _, modifier = key.partition(":")
    if name in STRING_PARAMS:
        if modifier not in ("", "exact", "contains"):
            raise QueryError(f"{name}: a string parameter takes :exact or :contains, not :{modifier[:20]}")
        getattr(q, QUERY_PARAMS[name]).extend((modifier, v) for v in values)
        return
    if name == "agent":
        if modifier and modifier != "identifier" and not (modifier.isalpha() and modifier[:1].isupper()):
            raise QueryError(f"agent: modifier :{modifier[:20]} is not supported (:identifier or a type)")
        q.agent_refs.extend(_agent_of(v, modifier) for v in values)
        return
    if modifier:
        raise QueryError(f"{name}: modifier :{modifier[:20]} is not supported")
    if name == "subtype":
        values = [v.split("|")[-1] for v in values]
    elif name in ("patient", "entity"):
        values = [reference_of(v) for v in values]
        if name == "patient":
            values = [v if "/" in v else f"Patient/{v}" for v in values]
    getattr(q, QUERY_PARAMS[name]).extend(values)

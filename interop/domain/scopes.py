"""SMART scopes: what a machine client may do, as the hub reads `scope` strings.

SMART App Launch 2 syntax, `system/Patient.rs`, `system/*.cruds` (create, read, update, delete,
search), and SMART 1's `.read` (= rs), `.write` (= cud) and `.*` (= cruds). Backend clients act as
themselves, so only `system/` scopes grant FHIR access here; `patient/` and `user/` need a launch
context the hub does not offer. Granular scopes (`?category=...`) narrow a grant in ways the hub
does not enforce, so they are refused rather than granted whole.

Beside FHIR, three scopes name the hub's own endpoints: `hub:admin` (outbox, HL7 messages),
`hub:analytics` (the de-identified dashboard API and exports) and `hub:metrics` (/metrics).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

HUB_SCOPES = ("hub:admin", "hub:analytics", "hub:metrics")
LETTERS = "cruds"
V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"(?P<context>system|user|patient)/(?P<type>\*|[A-Z][A-Za-z]{1,63})\.(?P<perm>[a-z*]{1,5})")

# FHIR interaction -> the SMART 2 letter it needs
INTERACTION_LETTER = {
    "read": "r", "vread": "r", "history-instance": "r", "history-type": "r",
    "search-type": "s", "create": "c", "update": "u", "patch": "u", "delete": "d", "operation": "u",
}


class ScopeError(ValueError):
    """A scope string the hub cannot grant (the message says which and why)."""


def _letters(perm: str) -> str:
    if perm in V1:
        return V1[perm]
    if not perm or any(c not in LETTERS for c in perm) or list(perm) != sorted(perm, key=LETTERS.index) \
            or len(set(perm)) != len(perm):
        raise ScopeError(f"permissions {perm!r} are not SMART's (c, r, u, d, s in that order, or read/write/*)")
    return perm


def parse(scope: str) -> tuple[str, str] | None:
    """(resource type or '*', letters) of a `system/` FHIR scope; None for the hub's own scopes.

    Raises ScopeError for anything else: malformed, granular, or a patient/user context."""
    if scope in HUB_SCOPES:
        return None
    if "?" in scope:
        raise ScopeError(f"{scope}: granular scopes (with ?) are not supported")
    match = _SCOPE.fullmatch(scope)
    if match is None:
        raise ScopeError(f"{scope}: not a SMART scope (system/Type.cruds) nor one of {', '.join(HUB_SCOPES)}")
    if match["context"] != "system":
        raise ScopeError(f"{scope}: {match['context']}/ scopes need a launch context; backend clients use system/")
    return match["type"], _letters(match["perm"])


def split(scopes: str) -> list[str]:
    return [s for s in scopes.split() if s]


def check(scopes: str) -> list[str]:
    """Every scope of a space-separated list, each checked (ScopeError on the first bad one)."""
    out = split(scopes)
    for scope in out:
        parse(scope)
    return out


def narrow(requested: str, registered: str) -> list[str]:
    """The requested scopes a client's registration covers (SMART: grant a subset, never more).

    A requested scope that the registration only partly covers is granted in that part
    (`system/Patient.cruds` asked, `system/*.rs` registered: `system/Patient.rs`)."""
    have = Grant.of(registered)
    granted: list[str] = []
    for scope in check(requested):
        parsed = parse(scope)
        if parsed is None:
            if scope in have.hub:
                granted.append(scope)
            continue
        rtype, letters = parsed
        if rtype == "*":
            kept = "".join(c for c in letters if c in have.types.get("*", ""))
        else:
            kept = "".join(c for c in letters if have.allows(rtype, c))
        if kept:
            granted.append(f"system/{rtype}.{kept}")
    return granted


@dataclass(frozen=True)
class Grant:
    """What a token allows: letters per resource type ('*' for every type) and hub scopes."""

    types: dict[str, str]
    hub: frozenset[str]
    scope: str

    @classmethod
    def of(cls, scopes: str) -> Grant:
        types: dict[str, str] = {}
        hub: set[str] = set()
        for scope in split(scopes):
            try:
                parsed = parse(scope)
            except ScopeError:
                continue  # a token's scope was checked when it was issued; an odd one grants nothing
            if parsed is None:
                hub.add(scope)
                continue
            rtype, letters = parsed
            types[rtype] = "".join(c for c in LETTERS if c in types.get(rtype, "") + letters)
        return cls(types, frozenset(hub), scopes)

    def allows(self, rtype: str, letter: str) -> bool:
        return letter in self.types.get(rtype, "") or letter in self.types.get("*", "")

    def allows_interaction(self, rtype: str, interaction: str) -> bool:
        return self.allows(rtype, INTERACTION_LETTER[interaction])


def supported(resource_types: list[str]) -> list[str]:
    """`scopes_supported` for the SMART configuration: per type, and the wildcards."""
    return ["system/*.rs", "system/*.cruds", "system/*.read", "system/*.write",
            *(f"system/{t}.cruds" for t in resource_types), *(f"system/{t}.rs" for t in resource_types),
            *HUB_SCOPES]

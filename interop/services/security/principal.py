"""Who is calling: a machine client with a token, or a person logged in to the pages."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...domain.scopes import Grant

ROLES = ("radiologist", "clinician", "analyst", "admin")


@dataclass(frozen=True)
class Principal:
    kind: str                      # client | person
    name: str                      # the client_id, or the person's account name
    grant: Grant = field(default_factory=lambda: Grant.of(""))
    role: str | None = None        # people: radiologist | clinician | analyst | admin
    site: str | None = None        # a clinician's facility code
    issuer: str | None = None      # clients: who issued the token (the hub, or a trusted provider)
    via: str | None = None         # people: local | oidc
    csrf: str | None = field(default=None, repr=False)  # people: the login's CSRF token

    @property
    def is_person(self) -> bool:
        return self.kind == "person"

"""The URLs the hub may call on a client's word: Subscription endpoints and Endpoint addresses.

Anything a client names must fall under an allowed prefix: INTEROP_URL_ALLOW, DICOMWEB_URL, and
the sites file's PACS, FHIR servers and `allow_urls`. A prefix matches by scheme, host and port
exactly and by whole path segments, so `https://his.example.vn/hooks` allows
`https://his.example.vn/hooks/dr` but neither `https://his.example.vn.evil.net/hooks` nor
`https://his.example.vn/hooks-evil`. A prefix may say `:*` for any port of its host
(`http://127.0.0.1:*`, for peers on loopback with ports chosen at start).
"""
from __future__ import annotations

from urllib.parse import urlsplit

from ..context import Context

ANY_PORT = -1


def _parts(url: str) -> tuple[str, str, int | None, str] | None:
    any_port = False
    if ":*" in url:
        url, any_port = url.replace(":*", "", 1), True
    try:
        split = urlsplit(url)
        port = ANY_PORT if any_port else split.port
    except ValueError:
        return None
    if split.scheme not in ("http", "https") or not split.hostname or split.username or split.password:
        return None
    default = 443 if split.scheme == "https" else 80
    return split.scheme, split.hostname.lower(), port or default, split.path.rstrip("/")


def under(url: str, prefix: str) -> bool:
    got, allowed = _parts(url), _parts(prefix)
    if got is None or allowed is None or got[:2] != allowed[:2] or got[2] == ANY_PORT:
        return False
    if allowed[2] != ANY_PORT and got[2] != allowed[2]:
        return False
    return got[3] == allowed[3] or got[3].startswith(allowed[3] + "/")


def prefixes(ctx: Context) -> tuple[str, ...]:
    settings = ctx.settings
    return (*settings.allowed_url_prefixes(), *((settings.dicomweb_url,) if settings.dicomweb_url else ()),
            *ctx.sites.allowed_urls())


def allowed(ctx: Context, url: str) -> bool:
    return any(under(url, p) for p in prefixes(ctx))

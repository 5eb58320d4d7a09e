"""Who may read what geste serves over HTTP: the bearer token and, without one, which Hosts are answered.

Shared by the ASGI app (``geste.http``) and the metrics-only server of ``geste worker --metrics-port``,
so that both take the same token from the same place and refuse the same requests.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from .errors import ConfigurationError

TOKEN_ENV = "GESTE_HTTP_TOKEN"


def resolve_token(token: str | None) -> bytes | None:
    """The token to require (default ``$GESTE_HTTP_TOKEN``; None: none), checked once at start: a token
    that cannot travel in an ``Authorization`` header would lock everyone out."""
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is None:
        return None
    if (
        not isinstance(token, str)
        or not token
        or not token.isascii()
        or not token.isprintable()
        or " " in token
    ):
        raise ConfigurationError("token must be a non-empty string of printable ASCII without spaces")
    return token.encode("ascii")


def bearer_matches(authorization: bytes, token: bytes) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (compared in constant time)."""
    scheme, _, credentials = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token)


def is_address_or_localhost(host: str) -> bool:
    """Whether a ``Host`` names an IP address or localhost: without a token, nothing else is answered
    (a DNS name pointing at a private server is how a browser is turned against it: DNS rebinding)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name in ("localhost", "localhost."):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True

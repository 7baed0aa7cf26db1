"""API keys to (tenant, application). Keys are held only as SHA-256 digests."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config.schema import TenantConfig
from gateway.core.errors import ApiError


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    app: str


def digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored in config.toml."""
    return hashlib.sha256(key.encode()).hexdigest()


ADMIN = Principal("", "admin")
# Authorization headers that matched a key, with their digests: most requests repeat one of a
# few headers, and hashing one costs more than the rest of the lookup. Only matches are kept,
# so the bound holds against clients that send fresh keys; past it the table starts over.
KNOWN_HEADERS = 1024


class KeyRing:
    def __init__(
        self, tenants: Mapping[str, TenantConfig], admin_digests: frozenset[str] = frozenset()
    ) -> None:
        self._entries = [
            (bytes.fromhex(d), Principal(t.name, app))
            for t in tenants.values()
            for d, app in t.key_digests.items()
        ]
        self._admin = [(bytes.fromhex(d), ADMIN) for d in sorted(admin_digests)]
        self._known: dict[str, bytes] = {}
        self._known_admin: dict[str, bytes] = {}

    def authenticate_admin(self, authorization: str | None) -> None:
        """Admin endpoints take only admin keys; raises a 401 ApiError otherwise."""
        self._lookup(self._admin, self._known_admin, authorization)

    def authenticate(self, authorization: str | None) -> Principal:
        """Resolve an `Authorization: Bearer <key>` header; raises a 401 ApiError."""
        return self._lookup(self._entries, self._known, authorization)

    @staticmethod
    def _lookup(
        entries: list[tuple[bytes, Principal]], known: dict[str, bytes], authorization: str | None
    ) -> Principal:
        presented = known.get(authorization) if authorization else None
        fresh = presented is None
        if presented is None:
            presented = _presented(authorization)
        found: Principal | None = None
        # Compare against every digest without stopping early, so timing does not tell
        # how many keys precede the match. A remembered header is compared like a new one.
        for stored, principal in entries:
            if hmac.compare_digest(stored, presented):
                found = principal
        if found is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        if fresh and authorization:
            if len(known) >= KNOWN_HEADERS:
                known.clear()
            known[authorization] = presented
        return found


def _presented(authorization: str | None) -> bytes:
    """The SHA-256 digest of the key an `Authorization: Bearer <key>` header carries; raises
    a 401 ApiError when it carries none."""
    if not authorization:
        raise ApiError(
            401,
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(
            401,
            "Malformed Authorization header: expected 'Bearer <key>'.",
            code="invalid_api_key",
        )
    # Header bytes that are not UTF-8 arrive as surrogates; hash them as the raw bytes.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()

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

    def authenticate_admin(self, authorization: str | None) -> None:
        """Admin endpoints take only admin keys; raises a 401 ApiError otherwise."""
        self._lookup(self._admin, authorization)

    def authenticate(self, authorization: str | None) -> Principal:
        """Resolve an `Authorization: Bearer <key>` header; raises a 401 ApiError."""
        return self._lookup(self._entries, authorization)

    @staticmethod
    def _lookup(entries: list[tuple[bytes, Principal]], authorization: str | None) -> Principal:
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
        presented = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: Principal | None = None
        # Compare against every digest without stopping early, so timing does not tell
        # how many keys precede the match.
        for stored, principal in entries:
            if hmac.compare_digest(stored, presented):
                found = principal
        if found is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return found

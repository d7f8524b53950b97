"""Resolve a request's tenant id from a header, a bearer JWT claim or route metadata.

The JWT payload is base64url-decoded WITHOUT verifying the signature: the id is
only used for sampling rates and telemetry labels, and should be verified by
Envoy (jwt_authn) when it matters. The token is never logged nor kept; any
malformed input resolves to None. Ids are capped in length and charset because
they become metric labels; `TenantSettings.allowed` bounds their number.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from ext_proc.config.sampling import TenantSettings


class TenantResolver:
    """Pure and thread-safe; build once from settings and share."""

    ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]+")
    BEARER_PATTERN: Final = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9_=.-]+) *")
    MAX_TOKEN_LEN: Final = 16384
    MAX_CLAIM_DEPTH: Final = 8

    def __init__(self, settings: TenantSettings) -> None:
        self._settings = settings
        self._allowed = frozenset(settings.allowed)
        claim = settings.jwt_claim
        self._claim_path = tuple(claim.split(".")) if claim else None
        if self._claim_path is not None and len(self._claim_path) > self.MAX_CLAIM_DEPTH:
            self._claim_path = self._claim_path[: self.MAX_CLAIM_DEPTH]

    @property
    def enabled(self) -> bool:
        s = self._settings
        return bool(s.header or s.jwt_claim or s.route_metadata_key)

    def resolve(
        self, headers: Mapping[str, list[str]], route_metadata: Mapping[str, Any],
    ) -> str | None:
        """The tenant id, or None when no configured source yields a valid one. Never raises."""
        for source in self._settings.order:
            raw = self._from_source(source, headers, route_metadata)
            tenant = self._clean(raw)
            if tenant is not None:
                return tenant
        return None

    def _from_source(
        self, source: str, headers: Mapping[str, list[str]], route_metadata: Mapping[str, Any],
    ) -> str | None:
        s = self._settings
        if source == "header" and s.header:
            return _first(headers, s.header)
        if source == "jwt" and self._claim_path is not None:
            return self._from_jwt(_first(headers, s.jwt_header))
        if source == "route_metadata" and s.route_metadata_key:
            return _scalar(route_metadata.get(s.route_metadata_key))
        return None

    def _from_jwt(self, authorization: str | None) -> str | None:
        if authorization is None or len(authorization) > self.MAX_TOKEN_LEN:
            return None
        match = self.BEARER_PATTERN.fullmatch(authorization)
        if match is None:
            return None
        payload = jwt_payload(match.group(1))
        if payload is None or self._claim_path is None:
            return None
        value: Any = payload
        for key in self._claim_path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return _scalar(value)

    def _clean(self, raw: str | None) -> str | None:
        if raw is None:
            return None
        raw = raw.strip()
        if len(raw) > self._settings.max_length or self.ID_PATTERN.fullmatch(raw) is None:
            return None
        if self._allowed and raw not in self._allowed:
            return self._settings.unlisted
        return raw


def jwt_payload(token: str) -> dict[str, Any] | None:
    """The decoded (unverified) payload of a compact JWS, or None when malformed."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    segment = parts[1].rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        payload = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def _first(headers: Mapping[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # protobuf Struct numbers arrive as doubles
    return None

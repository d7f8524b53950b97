"""Auth annotation: which scheme a request used, and a keyed hash of who.

The JWT is decoded, not verified: ``enduser.id`` identifies the claimed
subject for correlation only. Only the HMAC of ``sub`` leaves this module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Final

# Authorization schemes we name; anything else is "other" (bounded cardinality:
# auth.scheme may become a metric label, and the scheme is client-controlled).
_SCHEME_NAMES: Final = {
    "bearer": "bearer",
    "basic": "basic",
    "digest": "digest",
    "negotiate": "negotiate",
    "dpop": "dpop",
    "apikey": "api-key",
    "api-key": "api-key",
    "aws4-hmac-sha256": "aws4-hmac-sha256",
}
OTHER_SCHEME: Final = "other"
_B64URL_SEGMENT: Final = re.compile(r"[A-Za-z0-9_\-]+")


def scheme_name(authorization: str) -> str:
    """The normalised scheme of an Authorization value (first word, case-insensitive)."""
    words = authorization.split(None, 1)
    return _SCHEME_NAMES.get(words[0].lower(), OTHER_SCHEME) if words else OTHER_SCHEME


def bearer_credential(authorization: str) -> str | None:
    words = authorization.split(None, 1)
    if len(words) != 2 or words[0].lower() != "bearer":
        return None
    return words[1].strip() or None


def jwt_subject(token: str) -> str | None:
    """The ``sub`` claim of a compact JWS, or None for anything that is not one."""
    parts = token.split(".")
    if len(parts) != 3 or not _B64URL_SEGMENT.fullmatch(parts[1]):
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError included
        return None
    if not isinstance(claims, dict):
        return None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        return None
    return subject


class SubjectHasher:
    """``HMAC-SHA256(secret, subject)`` as lower-case hex, cut to `length` characters."""

    __slots__ = ("_length", "_mac")

    def __init__(self, secret: bytes, length: int) -> None:
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)
        self._length = length

    def __repr__(self) -> str:
        return f"SubjectHasher(length={self._length})"

    def digest(self, subject: str) -> str:
        mac = self._mac.copy()
        # surrogatepass: a JSON "\ud800" decodes to a lone surrogate that plain UTF-8 rejects.
        mac.update(subject.encode("utf-8", "surrogatepass"))
        return mac.hexdigest()[: self._length]

"""W3C Baggage pass-through (https://www.w3.org/TR/baggage/).

Members travel unchanged, properties included, as the raw (OWS-trimmed) text of
each ``list-member``. Every member is propagated while the combined value has at
most `max_members` members and `max_bytes` bytes (§3.3.2 Limits: at least 64 and
8192); beyond that whole members are dropped, never truncated. A member that does
not match the grammar is dropped and counted; the others still pass (§4: the
behaviour for a malformed baggage-string is up to the implementation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote, unquote

from ext_proc.policy.propagation._base import Carrier
from ext_proc.policy.propagation.rejections import Rejections

NAME: Final = "baggage"
HEADER_KEY: Final = "baggage"
MIN_MEMBERS: Final = 64
MIN_BYTES: Final = 8192

_TOKEN: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_OCTETS: Final = r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
_OWS: Final = r"[ \t]*"
_PROPERTY: Final = rf"{_TOKEN}(?:{_OWS}={_OWS}{_OCTETS})?"
_MEMBER: Final = re.compile(
    rf"({_TOKEN}){_OWS}={_OWS}({_OCTETS})((?:{_OWS};{_OWS}{_PROPERTY})*)"
)
TOKEN: Final = re.compile(_TOKEN)
# baggage-octet minus "%" (which must itself be encoded): left as is by `quote`.
_VALUE_SAFE: Final = "!#$&'()*+-./:<=>?@[]^_`{|}~"


class Baggage:
    """Parses, limits and serialises baggage members for one configuration."""

    def __init__(self, max_members: int = MIN_MEMBERS, max_bytes: int = MIN_BYTES) -> None:
        self._max_members = max_members
        self._max_bytes = max_bytes

    def extract(self, carrier: Carrier, rejections: Rejections) -> list[str]:
        """The valid members of every ``baggage`` header, in order, before limits."""
        members: list[str] = []
        for header in carrier.get(HEADER_KEY, ()):
            for raw in header.split(","):
                member = raw.strip(" \t")
                if not member:
                    continue
                if len(member) > self._max_bytes:
                    rejections.reject(NAME, "baggage over limits: member dropped", member)
                    continue
                if _MEMBER.fullmatch(member) is None:
                    rejections.reject(NAME, "malformed baggage member", member)
                    continue
                members.append(member)
        return members

    def limit(self, members: Iterable[str], rejections: Rejections) -> tuple[str, ...]:
        """Keep members in order while both limits hold; drop the rest whole."""
        kept: list[str] = []
        size = 0
        for member in members:
            added = len(member) + (1 if kept else 0)  # members are ASCII: chars == bytes
            if len(kept) >= self._max_members or size + added > self._max_bytes:
                rejections.reject(NAME, "baggage over limits: member dropped", member)
                continue
            kept.append(member)
            size += added
        return tuple(kept)


def member_key(member: str) -> str | None:
    match = _MEMBER.fullmatch(member)
    return None if match is None else match.group(1)


def member_value(member: str) -> str | None:
    """The decoded value (properties excluded); invalid UTF-8 becomes U+FFFD."""
    match = _MEMBER.fullmatch(member)
    return None if match is None else unquote(match.group(2), errors="replace")


def member_from_text(key: str, value: str) -> str | None:
    """A baggage member for `key` and a plain-text `value`, or None when `key` is not a token."""
    if TOKEN.fullmatch(key) is None:
        return None
    return f"{key}={quote(value, safe=_VALUE_SAFE)}"


def serialise(members: tuple[str, ...]) -> str:
    return ",".join(members)

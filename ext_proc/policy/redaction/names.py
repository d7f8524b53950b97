"""Sensitive-name matching shared by headers, query parameters and log text."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import unquote_plus

BUILTIN_DENIED_HEADERS: Final = frozenset({
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
    "x-amz-security-token",
})

BUILTIN_SENSITIVE_PARAMS: Final = frozenset(name.lower() for name in (
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "key",
    "sig",
    "signature",
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "AWSAccessKeyId",
    "X-Goog-Signature",
    "X-Goog-Credential",
))


class NameMatcher:
    """Case-insensitive match of a name against fixed names and regex patterns.

    Names are percent-decoded (``+`` is a space) and lower-cased first, and a
    trailing ``[]`` (``token[]=``) is ignored, so ``API%5FKey`` matches ``api_key``.
    """

    __slots__ = ("_names", "_patterns")

    def __init__(self, names: Iterable[str], patterns: Iterable[str] = ()) -> None:
        self._names: frozenset[str] = frozenset(name.lower() for name in names)
        self._patterns: tuple[re.Pattern[str], ...] = tuple(
            re.compile(pattern, re.IGNORECASE) for pattern in patterns
        )

    @property
    def names(self) -> frozenset[str]:
        return self._names

    def union(self, other: NameMatcher) -> NameMatcher:
        """A matcher for the names and patterns of both."""
        merged = NameMatcher(self._names | other._names)
        merged._patterns = self._patterns + other._patterns
        return merged

    def matches(self, raw_name: str) -> bool:
        name = raw_name
        if "%" in name or "+" in name:
            name = unquote_plus(name, errors="replace")
        name = name.lower()
        if name.endswith("[]"):
            name = name[:-2]
        if name in self._names:
            return True
        for pattern in self._patterns:
            if pattern.search(name) is not None:
                return True
        return False

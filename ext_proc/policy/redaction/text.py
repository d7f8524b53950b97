"""Scrubbing credentials out of free text (log values, header values)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import unquote_plus

from ext_proc.policy.redaction.limits import REDACTED
from ext_proc.policy.redaction.names import NameMatcher

# Auth schemes whose credential follows after whitespace (RFC 9110 section 11.4).
_SCHEMES: Final = ("bearer", "basic", "digest", "negotiate", "dpop", "apikey", "api-key")
# Shortest run of token68 characters taken for a credential after a scheme word
# (keeps "basic auth" readable; real credentials are longer).
_MIN_CREDENTIAL: Final = 8
_NAME_CHARS: Final = r"A-Za-z0-9_.%\-\[\]+"
# Percent-decoding rounds tried on a value that may nest a URL (double-encoded redirects).
_DECODE_ROUNDS: Final = 3
_FLAGS: Final = re.ASCII  # \s is [ \t\n\r\f\v], matching the cheap pre-checks below

# Anchored on the literal "://" so the regex engine can skip ahead quickly.
_USERINFO: Final = re.compile(r"://[^/?#\s]*@", _FLAGS)
_SCHEME_CREDENTIAL: Final = re.compile(
    r"((?<![A-Za-z0-9_\-])(?:" + "|".join(_SCHEMES) + r")\s+)"
    # token68 is padded with "=" only at its end; anything past that (DPoP password=x)
    # is masked too, so a credential-looking "name=" never leaves the value after it.
    r"[A-Za-z0-9\-._~+/]{" + str(_MIN_CREDENTIAL) + r",}[A-Za-z0-9\-._~+/=]*",
    _FLAGS | re.IGNORECASE,
)
_JWT: Final = re.compile(r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-.]*", _FLAGS)
# "name": value (JSON or Python repr); string values may be unterminated (cut input).
_QUOTED_KEY: Final = re.compile(
    r"([\"']([^\"'\\\s]{1,64})[\"']\s*:\s*)"
    r"(\"(?:[^\"\\]|\\.)*\"?|'(?:[^'\\]|\\.)*'?|[^,}\]\s\"']+)",
    _FLAGS,
)
# name=value; the look-behind keeps the scan linear (no retry inside a name).
_KEY_VALUE: Final = re.compile(
    rf"((?<![{_NAME_CHARS}])([{_NAME_CHARS}]+)=)(\"[^\"]*\"?|'[^']*'?|[^&\s;#,\"'=]*)",
    _FLAGS,
)


def _contains_any(lower: str, words: Iterable[str]) -> bool:
    for word in words:
        if word in lower:
            return True
    return False


def _mask_after_prefix(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


class TextScrubber:
    """Masks credentials wherever they appear in a string.

    In order: ``<denied header>: value`` (or ``=``) masked to the end of the
    line; URL userinfo removed; ``Bearer``/``Basic``/... credentials masked;
    anything shaped like a JWT masked; the value of ``name=value`` and
    ``"name": value`` masked when the name is sensitive (a query parameter or
    denied header name). Quoted values of other names are scrubbed
    recursively; a quoted region cannot contain its own quote, so nesting is
    shallow and each level is shorter. Each pass runs only when a cheap
    substring test says it could match.
    """

    __slots__ = ("_denied_line", "_denied_names", "_sensitive")

    def __init__(self, params: NameMatcher, denied: NameMatcher) -> None:
        self._sensitive = params.union(denied)
        self._denied_names = tuple(sorted(denied.names, key=len, reverse=True))
        self._denied_line = re.compile(
            r"((?<![A-Za-z0-9_\-])(?:" + "|".join(map(re.escape, self._denied_names))
            + r")[\"']?\s*[:=]\s*)[^\r\n]*",
            _FLAGS | re.IGNORECASE,
        )

    def scrub(self, value: str) -> str:
        has_eq = "=" in value
        has_colon = ":" in value
        has_space = (
            " " in value or "\t" in value or "\n" in value or "\r" in value
            or "\f" in value or "\v" in value
        )
        if has_eq or has_colon or has_space:
            lower = value.lower()
            if (has_eq or has_colon) and _contains_any(lower, self._denied_names):
                value = self._denied_line.sub(_mask_after_prefix, value)
            if has_colon and "://" in value:
                value = _USERINFO.sub("://", value)
            if has_space and _contains_any(lower, _SCHEMES):
                value = _SCHEME_CREDENTIAL.sub(_mask_after_prefix, value)
        if "eyJ" in value:
            value = _JWT.sub(REDACTED, value)
        if has_colon and ('"' in value or "'" in value):
            value = _QUOTED_KEY.sub(self._key_value, value)
        if has_eq:
            value = _KEY_VALUE.sub(self._key_value, value)
        return value

    def _key_value(self, match: re.Match[str]) -> str:
        prefix, name, value = match.group(1, 2, 3)
        if not value:
            return prefix
        quote = value[0] if value[0] in "\"'" else ""
        if self._sensitive.matches(name):
            return prefix + quote + REDACTED + quote
        if quote:
            return prefix + self.scrub(value)
        return prefix + REDACTED if self.hides_credential(value) else match.group(0)

    def hides_credential(self, value: str) -> bool:
        """Whether `value`, percent-decoded up to three times, carries a credential
        (a nested URL with userinfo or a token parameter, a JWT, a bearer value).
        Each decoded form is shorter than `value` (it lacks the ``name=`` around
        it), so the recursion through `scrub` terminates."""
        if not ("%" in value or "@" in value or "+" in value or "eyJ" in value):
            return False  # the common case: nothing encoded, nothing nested
        decoded = value
        for _ in range(_DECODE_ROUNDS):
            decoded = unquote_plus(decoded, errors="replace")
            if self.scrub(decoded) != decoded:
                return True
            if "%" not in decoded:
                return False
        return False

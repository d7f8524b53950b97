"""URL and query-string redaction. Never raises: nothing here decodes strictly."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, NamedTuple

from ext_proc.policy.redaction.limits import REDACTED
from ext_proc.policy.redaction.names import NameMatcher

# RFC 3986 appendix B; every part optional, so it matches any string. The
# authority ends only at / ? # (not at WHATWG's backslash) so that a stray
# backslash in a password still leaves the whole userinfo before the '@'.
_URI: Final = re.compile(
    r"(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):)?"
    r"(?://(?P<authority>[^/?#]*))?"
    r"(?P<path>[^?#]*)"
    r"(?:\?(?P<query>[^#]*))?"
    r"(?:#(?P<fragment>.*))?",
    re.DOTALL,
)
_PAIR_SEPARATOR: Final = re.compile(r"([&;])")


class UrlParts(NamedTuple):
    scheme: str | None
    authority: str | None
    path: str
    query: str | None
    fragment: str | None


def split_url(url: str) -> UrlParts:
    match = _URI.fullmatch(url)
    if match is None:  # unreachable: the pattern accepts every string
        return UrlParts(None, None, url, None, None)
    return UrlParts(*match.group("scheme", "authority", "path", "query", "fragment"))


def without_userinfo(authority: str) -> str:
    """``user:pw@[::1]:8080`` -> ``[::1]:8080``; the last ``@`` ends the userinfo."""
    return authority.rpartition("@")[2]


class PairRedactor:
    """Masks the values of sensitive ``name=value`` pairs, keeping all else byte for byte.

    Pairs are separated by ``&`` or ``;`` (some servers split on both). A value
    is masked when its name is sensitive, or when, percent-decoded, it carries
    a credential the text scrubber recognises (a nested URL with userinfo or a
    token parameter, a JWT, a bearer credential).
    """

    __slots__ = ("_hides_credential", "_names", "_scrub")

    def __init__(
        self,
        names: NameMatcher,
        scrub: Callable[[str], str],
        hides_credential: Callable[[str], bool],
    ) -> None:
        self._names = names
        self._scrub = scrub
        self._hides_credential = hides_credential

    def redact(self, pairs: str) -> str:
        if ";" in pairs:
            parts = _PAIR_SEPARATOR.split(pairs)  # separators at the odd indices
            for index in range(0, len(parts), 2):
                parts[index] = self._pair(parts[index])
            return "".join(parts)
        return "&".join([self._pair(part) for part in pairs.split("&")])

    def _pair(self, pair: str) -> str:
        name, eq, value = pair.partition("=")
        if not eq or not value:
            return pair
        if self._names.matches(name) or self._hides_credential(value):
            return name + "=" + REDACTED
        return pair

    def redact_path(self, path: str) -> str:
        """Matrix parameters (``/app;jsessionid=...``) get the same treatment as a
        query; a JWT in a path segment (magic links) is masked."""
        if "eyJ" in path:
            path = self._scrub(path)
        if ";" not in path:
            return path
        segments = path.split("/")
        for index, segment in enumerate(segments):
            if ";" in segment:
                head, _, params = segment.partition(";")
                segments[index] = head + ";" + self.redact(params)
        return "/".join(segments)

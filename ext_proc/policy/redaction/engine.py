"""`Redactor`: the one engine every span attribute, log value and metric label passes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

from ext_proc.config.redaction import RedactionSettings
from ext_proc.policy.redaction.auth import (
    SubjectHasher,
    bearer_credential,
    jwt_subject,
    scheme_name,
)
from ext_proc.policy.redaction.limits import REDACTED, TRUNCATED, cut, truncate
from ext_proc.policy.redaction.names import (
    BUILTIN_DENIED_HEADERS,
    BUILTIN_SENSITIVE_PARAMS,
    NameMatcher,
)
from ext_proc.policy.redaction.text import TextScrubber
from ext_proc.policy.redaction.urls import PairRedactor, split_url, without_userinfo

AUTH_SCHEME: Final = "auth.scheme"
ENDUSER_ID: Final = "enduser.id"
REQUEST_HEADER_PREFIX: Final = "http.request.header."
RESPONSE_HEADER_PREFIX: Final = "http.response.header."
AUTHORIZATION: Final = "authorization"
SCHEME_API_KEY: Final = "api-key"
SCHEME_MTLS: Final = "mtls"
# Keeps a certificate's hash apart from an enduser.id of the same text (same key).
CERTIFICATE_DOMAIN: Final = "x509-identity\x00"

Direction = Literal["request", "response"]
# (header name, attribute key, denied?) for each allowlisted header.
_CapturePlan = tuple[tuple[str, str, bool], ...]


class Redactor:
    """Masks credentials in paths, URLs, headers and free text; annotates auth.

    Built once from `RedactionSettings` (all regexes compiled here, no I/O) and
    shared by every stream: it holds no per-request state. No method raises on
    any string input, and every emitted value is at most ``max_value_length``.
    """

    def __init__(self, settings: RedactionSettings) -> None:
        self._max_value = settings.max_value_length
        self._max_examined = settings.max_header_bytes
        self._max_values = settings.max_header_values
        self._params = NameMatcher(
            BUILTIN_SENSITIVE_PARAMS | set(settings.sensitive_query_params),
            settings.sensitive_query_param_patterns,
        )
        self._denied = NameMatcher(
            BUILTIN_DENIED_HEADERS | set(settings.denied_headers) | set(settings.api_key_headers),
            settings.denied_header_patterns,
        )
        self._scrubber = TextScrubber(self._params, self._denied)
        self._pairs = PairRedactor(
            self._params, self._scrubber.scrub, self._scrubber.hides_credential
        )
        self._capture: dict[str, _CapturePlan] = {
            "request": self._plan(REQUEST_HEADER_PREFIX, settings.capture_request_headers),
            "response": self._plan(RESPONSE_HEADER_PREFIX, settings.capture_response_headers),
        }
        self._api_key_headers = settings.api_key_headers
        self.captures_response = bool(settings.capture_response_headers)
        secret = settings.hmac_secret
        self._hasher = (
            SubjectHasher(secret.get_secret_value().encode("utf-8"), settings.enduser_id_length)
            if secret is not None
            else None
        )
        self._hashes_certificates = settings.client_certificate_hash

    def _plan(self, prefix: str, names: tuple[str, ...]) -> _CapturePlan:
        return tuple((name, prefix + name, self._denied.matches(name)) for name in names)

    def is_denied(self, header_name: str) -> bool:
        """Whether a header's value must never be recorded (built-in or configured)."""
        return self._denied.matches(header_name)

    def path_and_query(self, raw_path: str) -> tuple[str, str | None]:
        """Envoy ``:path`` -> (``url.path``, redacted ``url.query`` or None when no ``?``).

        A fragment is dropped. An absolute-form target (``http://u:p@h/x?q``)
        yields its path. Everything but sensitive values is kept byte for byte.
        """
        raw, was_cut = cut(raw_path, self._max_examined)
        if not raw.startswith("/") and "://" in raw:  # absolute-form (forward proxy)
            parts = split_url(raw)
            path = parts.path or "/"
            query_or_none = parts.query
        else:  # origin-form, "*", or anything else taken literally
            path, question, query = raw.partition("#")[0].partition("?")
            query_or_none = query if question else None
        path = self._pairs.redact_path(path)
        if query_or_none is not None:
            query_or_none = self._pairs.redact(query_or_none)
        if was_cut:
            if query_or_none is not None:
                query_or_none += TRUNCATED
            else:
                path += TRUNCATED
        if query_or_none is not None:
            query_or_none = truncate(query_or_none, self._max_value)
        return truncate(path, self._max_value), query_or_none

    def url(self, url: str) -> str:
        """A full URL fit to record: userinfo removed, query and fragment pairs redacted."""
        raw, was_cut = cut(url, self._max_examined)
        scheme, authority, path, query, fragment = split_url(raw)
        pieces: list[str] = []
        if scheme is not None:
            pieces += (scheme, ":")
        if authority is not None:
            pieces += ("//", without_userinfo(authority))
        pieces.append(self._pairs.redact_path(path))
        if query is not None:
            pieces += ("?", self._pairs.redact(query))
        if fragment is not None:  # OAuth implicit flow puts tokens here
            pieces += ("#", self._pairs.redact(fragment))
        if was_cut:
            pieces.append(TRUNCATED)
        return truncate("".join(pieces), self._max_value)

    def text(self, value: str) -> str:
        """A free-text value (log field, header value) with credentials masked."""
        raw, was_cut = cut(value, self._max_examined)
        scrubbed = self._scrubber.scrub(raw)
        return truncate(scrubbed + TRUNCATED if was_cut else scrubbed, self._max_value)

    def header_attributes(
        self, headers: Mapping[str, list[str]], direction: Direction
    ) -> dict[str, list[str]]:
        """Allowlisted headers as ``http.<direction>.header.<name>`` -> values.

        Denylisted headers are recorded with every value ``REDACTED`` (never
        dropped); others are scrubbed like `text`. All values of one call share
        a ``max_header_bytes`` budget; a header with more than
        ``max_header_values`` values, or met after the budget is spent, ends in
        a ``[TRUNCATED]`` element.
        """
        attributes: dict[str, list[str]] = {}
        budget = self._max_examined
        for name, key, denied in self._capture.get(direction, ()):
            values = headers.get(name)
            if not values:
                continue
            overflow = len(values) > self._max_values
            if overflow:
                values = values[: self._max_values]
            if denied:
                recorded = [REDACTED] * len(values)
            else:
                recorded = []
                for value in values:
                    if budget <= 0:
                        overflow = True
                        break
                    examined, was_cut = cut(value, budget)
                    budget -= len(value)
                    scrubbed = self._scrubber.scrub(examined)
                    recorded.append(
                        truncate(scrubbed + TRUNCATED if was_cut else scrubbed, self._max_value)
                    )
            if overflow:
                recorded.append(TRUNCATED)
            attributes[key] = recorded
        return attributes

    def auth_attributes(self, headers: Mapping[str, list[str]], mtls: bool) -> dict[str, str]:
        """``auth.scheme`` and, for a bearer JWT with a ``sub``, a keyed-hash ``enduser.id``.

        Precedence: the Authorization header, then an API-key header, then the
        mTLS connection. No attribute at all for an anonymous request.
        """
        authorizations = headers.get(AUTHORIZATION)
        if authorizations:
            authorization = authorizations[0]
            attributes = {AUTH_SCHEME: scheme_name(authorization[:64])}
            if self._hasher is not None and len(authorization) <= self._max_examined:
                token = bearer_credential(authorization)
                subject = jwt_subject(token) if token is not None else None
                if subject is not None:
                    attributes[ENDUSER_ID] = self._hasher.digest(subject)
            return attributes
        if any(headers.get(name) for name in self._api_key_headers):
            return {AUTH_SCHEME: SCHEME_API_KEY}
        if mtls:
            return {AUTH_SCHEME: SCHEME_MTLS}
        return {}

    def certificate_hash(self, identity: str) -> str | None:
        """A keyed hash of a client certificate's `identity` (its subject, issuer and SANs),
        or None unless ``client_certificate_hash`` is on. Never the identity itself."""
        if not self._hashes_certificates or self._hasher is None:
            return None
        return self._hasher.digest(CERTIFICATE_DOMAIN + identity)

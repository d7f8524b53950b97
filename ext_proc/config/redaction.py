"""Settings for the redaction engine (`ext_proc.policy.redaction.Redactor`).

Every name list here *adds* to a built-in list that cannot be switched off:
the built-in header denylist and sensitive query parameters always apply.
Regex patterns are Python regexes searched (``re.search``, case-insensitive)
in the lower-cased, percent-decoded name; anchor them with ``^``/``$`` to
match whole names.
"""

from __future__ import annotations

import re
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_FROZEN = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)
# RFC 9110 section 5.6.2 token, plus the leading ':' of HTTP/2 pseudo-headers.
_HEADER_NAME: Final = re.compile(r":?[!#$%&'*+.^_`|~0-9a-z-]+")
MIN_SECRET_CHARS: Final = 16


def _normalise_names(values: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(value.strip().lower() for value in values))
    if "" in names:
        raise ValueError("names must not be empty")
    return names


def _check_patterns(values: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in values:
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
    return values


class RedactionSettings(BaseModel):
    """What we capture, what we mask, and how much hostile input we look at."""

    model_config = _FROZEN

    capture_request_headers: tuple[str, ...] = Field(
        default=(),
        description=(
            "Request headers recorded as http.request.header.<name> span attributes "
            "(allowlist; empty records none). Denylisted ones are recorded as REDACTED."
        ),
    )
    capture_response_headers: tuple[str, ...] = Field(
        default=(),
        description=(
            "Response headers recorded as http.response.header.<name> span attributes "
            "(allowlist; empty records none). Denylisted ones are recorded as REDACTED."
        ),
    )
    denied_headers: tuple[str, ...] = Field(
        default=(),
        description=(
            "Header names whose values are always replaced with REDACTED, in addition to "
            "the built-in authorization, proxy-authorization, cookie, set-cookie, x-api-key, "
            "x-auth-token, x-amz-security-token."
        ),
    )
    denied_header_patterns: tuple[str, ...] = Field(
        default=(),
        description="Regexes (re.search, case-insensitive) over header names to deny as well.",
    )
    sensitive_query_params: tuple[str, ...] = Field(
        default=(),
        description=(
            "Query parameter names whose values become REDACTED, in addition to the built-in "
            "token, access_token, id_token, password, secret, api_key, apikey, key, sig, "
            "signature, X-Amz-Signature, X-Amz-Credential, AWSAccessKeyId, X-Goog-Signature "
            "and a few more. Case-insensitive; percent-encoded names are decoded first."
        ),
    )
    sensitive_query_param_patterns: tuple[str, ...] = Field(
        default=(),
        description="Regexes (re.search, case-insensitive) over decoded query parameter names.",
    )
    api_key_headers: tuple[str, ...] = Field(
        default=("x-api-key", "api-key"),
        description=(
            "Headers whose presence means auth.scheme=api-key (when there is no "
            "Authorization header). They are denylisted too."
        ),
    )
    hmac_secret: SecretStr | None = Field(
        default=None,
        description=(
            "Key for enduser.id = HMAC-SHA256(key, JWT sub), hex, truncated. Unset: no "
            f"enduser.id is recorded. At least {MIN_SECRET_CHARS} characters."
        ),
    )
    enduser_id_length: int = Field(
        default=32, ge=16, le=64, description="Hex characters of the HMAC kept in enduser.id.",
    )
    client_certificate_hash: bool = Field(
        default=False,
        description=(
            "Record envoy.tls.peer_certificate_hash on the SERVER span: HMAC-SHA256(hmac_secret, "
            "the client certificate's subject, issuer and SANs as Envoy's access log reports "
            "them), hex, enduser_id_length characters. Needs hmac_secret and Envoy's gRPC "
            "access log. The certificate's fields themselves are never recorded."
        ),
    )
    max_value_length: int = Field(
        default=1024, ge=64, le=65_536,
        description="Longest attribute or log value emitted; longer ones end in [TRUNCATED].",
    )
    max_header_bytes: int = Field(
        default=16_384, ge=256, le=1_048_576,
        description=(
            "Characters of input examined per call (a path, URL, text, Authorization value, "
            "or all captured header values together); the rest is cut, never parsed."
        ),
    )
    max_header_values: int = Field(
        default=16, ge=1, le=1024, description="Values of one repeated header recorded at most.",
    )

    @field_validator(
        "capture_request_headers", "capture_response_headers", "denied_headers",
        "api_key_headers",
    )
    @classmethod
    def _check_header_names(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        names = _normalise_names(values)
        for name in names:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"not an HTTP header name: {name!r}")
        return names

    @field_validator("sensitive_query_params")
    @classmethod
    def _check_param_names(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _normalise_names(values)

    @field_validator("denied_header_patterns", "sensitive_query_param_patterns")
    @classmethod
    def _check_regexes(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _check_patterns(values)

    @field_validator("hmac_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(f"hmac_secret must be at least {MIN_SECRET_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _check_certificate_hash(self) -> RedactionSettings:
        if self.client_certificate_hash and self.hmac_secret is None:
            raise ValueError("client_certificate_hash needs hmac_secret (the hash is keyed)")
        return self

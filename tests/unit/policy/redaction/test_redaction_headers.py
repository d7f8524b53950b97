"""Redactor.header_attributes, is_denied and auth_attributes (issue #7 items 1 and 3)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest

from ext_proc.config.redaction import RedactionSettings
from ext_proc.policy.redaction import AUTH_SCHEME, ENDUSER_ID, REDACTED, TRUNCATED, Redactor

CANARY = "CANARY7d02be91c4"
SECRET = "unit-test-hmac-secret-0123456789"


def make(**fields: Any) -> Redactor:
    return Redactor(RedactionSettings(**fields))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def jwt(claims: object, header: object = None) -> str:
    head = b64url(json.dumps(header or {"alg": "RS256", "typ": "JWT"}).encode())
    return f"{head}.{b64url(json.dumps(claims).encode())}.c2lnbmF0dXJl"


def expected_id(subject: str, secret: str = SECRET, length: int = 32) -> str:
    mac = hmac.new(secret.encode(), subject.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return mac.hexdigest()[:length]


# ---- is_denied ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["authorization", "Authorization", "PROXY-AUTHORIZATION", "cookie", "Set-Cookie",
             "x-api-key", "api-key"],
)
def test_builtin_denylist(name: str) -> None:
    assert make().is_denied(name)


def test_configured_names_and_patterns_are_denied() -> None:
    redactor = make(denied_headers=("X-Internal-Secret",), denied_header_patterns=(r"-token$",))
    assert redactor.is_denied("x-internal-secret")
    assert redactor.is_denied("X-Session-Token")
    assert not redactor.is_denied("x-token-count")
    assert not redactor.is_denied("content-type")


# ---- header_attributes -------------------------------------------------------


def test_allowlisted_headers_follow_semconv_names_and_keep_all_values() -> None:
    redactor = make(capture_request_headers=("Content-Type", "x-forwarded-for"),
                    capture_response_headers=("content-type",))
    headers = {"content-type": ["application/json"], "x-forwarded-for": ["1.2.3.4", "5.6.7.8"],
               "user-agent": ["curl/8"]}
    assert redactor.header_attributes(headers, "request") == {
        "http.request.header.content-type": ["application/json"],
        "http.request.header.x-forwarded-for": ["1.2.3.4", "5.6.7.8"],
    }
    assert redactor.header_attributes(headers, "response") == {
        "http.response.header.content-type": ["application/json"],
    }


def test_nothing_is_captured_by_default() -> None:
    assert make().header_attributes({"content-type": ["text/plain"]}, "request") == {}


def test_denylist_wins_value_replaced_never_dropped() -> None:
    redactor = make(
        capture_request_headers=("authorization", "cookie", "x-api-key", "x-corp-sso",
                                 "x-session-token"),
        capture_response_headers=("set-cookie",),
        denied_headers=("x-corp-sso",), denied_header_patterns=("token",),
    )
    headers = {
        "authorization": [f"Bearer {CANARY}"], "cookie": [f"s={CANARY}", f"t={CANARY}"],
        "x-api-key": [CANARY], "x-corp-sso": [CANARY], "x-session-token": [CANARY],
    }
    attributes = redactor.header_attributes(headers, "request")
    assert attributes == {
        "http.request.header.authorization": [REDACTED],
        "http.request.header.cookie": [REDACTED, REDACTED],
        "http.request.header.x-api-key": [REDACTED],
        "http.request.header.x-corp-sso": [REDACTED],
        "http.request.header.x-session-token": [REDACTED],
    }
    response = redactor.header_attributes({"set-cookie": [f"id={CANARY}"]}, "response")
    assert response == {"http.response.header.set-cookie": [REDACTED]}


def test_allowlisted_values_are_scrubbed_like_text() -> None:
    redactor = make(capture_request_headers=("referer", "x-debug"))
    headers = {"referer": [f"https://u:{CANARY}@h/p?token={CANARY}&a=1"],
               "x-debug": [f"auth=Bearer {CANARY}"]}
    assert redactor.header_attributes(headers, "request") == {
        "http.request.header.referer": [f"https://h/p?token={REDACTED}&a=1"],
        "http.request.header.x-debug": [f"auth=Bearer {REDACTED}"],
    }


def test_too_many_values_end_in_a_marker() -> None:
    redactor = make(capture_request_headers=("x-forwarded-for", "cookie"), max_header_values=3)
    headers = {"x-forwarded-for": [str(i) for i in range(10)], "cookie": ["a"] * 10}
    attributes = redactor.header_attributes(headers, "request")
    assert attributes["http.request.header.x-forwarded-for"] == ["0", "1", "2", TRUNCATED]
    assert attributes["http.request.header.cookie"] == [REDACTED] * 3 + [TRUNCATED]


def test_byte_budget_is_shared_by_all_values_of_a_call() -> None:
    redactor = make(capture_request_headers=("a", "b"), max_header_bytes=256,
                    max_value_length=4096)
    headers = {"a": ["x" * 200, "y" * 100], "b": ["z"]}
    attributes = redactor.header_attributes(headers, "request")
    first, second = attributes["http.request.header.a"]
    assert first == "x" * 200
    assert second == TRUNCATED  # 56 chars left, no delimiter to back off to
    assert attributes["http.request.header.b"] == [TRUNCATED]


def test_long_values_are_truncated_to_max_value_length() -> None:
    redactor = make(capture_request_headers=("user-agent",), max_value_length=64)
    value = redactor.header_attributes({"user-agent": ["u" * 500]}, "request")
    assert value == {"http.request.header.user-agent": ["u" * (64 - len(TRUNCATED)) + TRUNCATED]}


# ---- auth_attributes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "scheme"),
    [("Bearer abc", "bearer"), ("bearer abc", "bearer"), ("BASIC dXNlcjpwYXNz", "basic"),
     ("Digest username=x", "digest"), ("ApiKey k", "api-key"), ("Negotiate YII", "negotiate"),
     ("AWS4-HMAC-SHA256 Credential=x", "aws4-hmac-sha256"), (f"{CANARY} x", "other"),
     ("", "other"), ("   ", "other")],
)
def test_scheme_from_authorization(authorization: str, scheme: str) -> None:
    assert make().auth_attributes({"authorization": [authorization]}, False) == {
        AUTH_SCHEME: scheme,
    }


def test_scheme_precedence_and_anonymous() -> None:
    redactor = make()
    assert redactor.auth_attributes({"x-api-key": ["k"]}, True) == {AUTH_SCHEME: "api-key"}
    assert redactor.auth_attributes({"api-key": ["k"]}, False) == {AUTH_SCHEME: "api-key"}
    assert redactor.auth_attributes({}, True) == {AUTH_SCHEME: "mtls"}
    assert redactor.auth_attributes({"authorization": ["Basic eDp5"]}, True) == {
        AUTH_SCHEME: "basic",
    }
    assert redactor.auth_attributes({"cookie": ["s=1"]}, False) == {}


def test_enduser_id_is_truncated_hmac_of_sub() -> None:
    token = jwt({"sub": CANARY, "iss": "x"})
    attributes = make(hmac_secret=SECRET).auth_attributes(
        {"authorization": [f"Bearer {token}"]}, False,
    )
    assert attributes == {AUTH_SCHEME: "bearer", ENDUSER_ID: expected_id(CANARY)}
    rendered = repr(attributes)
    for secret in (CANARY, token, SECRET):
        assert secret not in rendered


def test_enduser_id_is_stable_across_instances_and_keyed() -> None:
    headers = {"authorization": [f"Bearer {jwt({'sub': 'alice'})}"]}
    one = make(hmac_secret=SECRET).auth_attributes(headers, False)[ENDUSER_ID]
    two = make(hmac_secret=SECRET).auth_attributes(headers, False)[ENDUSER_ID]
    other = make(hmac_secret=SECRET + "x").auth_attributes(headers, False)[ENDUSER_ID]
    bob = make(hmac_secret=SECRET).auth_attributes(
        {"authorization": [f"Bearer {jwt({'sub': 'bob'})}"]}, False)[ENDUSER_ID]
    assert one == two
    assert len({one, other, bob}) == 3


@pytest.mark.parametrize("length", [16, 20, 64])
def test_enduser_id_length(length: int) -> None:
    redactor = make(hmac_secret=SECRET, enduser_id_length=length)
    value = redactor.auth_attributes(
        {"authorization": [f"Bearer {jwt({'sub': 'alice'})}"]}, False)[ENDUSER_ID]
    assert len(value) == length
    assert value == expected_id("alice", length=length)
    assert int(value, 16) >= 0


def test_no_enduser_id_without_secret() -> None:
    headers = {"authorization": [f"Bearer {jwt({'sub': 'alice'})}"]}
    assert make().auth_attributes(headers, False) == {AUTH_SCHEME: "bearer"}


def test_lone_surrogate_subject_is_hashed_not_raised() -> None:
    payload = b64url(b'{"sub": "a\\ud800b"}')
    token = f"eyJhbGciOiJub25lIn0.{payload}.sig"
    attributes = make(hmac_secret=SECRET).auth_attributes(
        {"authorization": [f"Bearer {token}"]}, False)
    assert attributes[ENDUSER_ID] == expected_id("a\ud800b")


MALFORMED = [
    "not-a-jwt",
    "a.b",
    "a.b.c.d.e",                                  # JWE: five parts, nothing readable
    "eyJhbGciOiJub25lIn0..sig",                   # empty payload
    "eyJhbGciOiJub25lIn0.!!!!.sig",               # not base64url
    "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0x.sig",   # length % 4 == 1
    f"h.{b64url(b'not json')}.s",
    f"h.{b64url(bytes([0xff, 0xfe, 0x00]))}.s",   # not UTF-8
    f"h.{b64url(b'[1, 2]')}.s",                   # JSON but not an object
    "h." + b64url(b'{"sub": 42}') + ".s",         # sub not a string
    "h." + b64url(b'{"sub": ""}') + ".s",         # empty sub
    "h." + b64url(b'{"iss": "x"}') + ".s",        # no sub
    f"h.{b64url(b'[' * 5000 + b']' * 5000)}.s",   # deep nesting
]


@pytest.mark.parametrize("token", MALFORMED)
def test_malformed_jwt_gives_scheme_only(token: str) -> None:
    redactor = make(hmac_secret=SECRET, max_header_bytes=65_536)
    assert redactor.auth_attributes({"authorization": [f"Bearer {token}"]}, False) == {
        AUTH_SCHEME: "bearer",
    }


def test_bearer_separators_and_missing_token() -> None:
    redactor = make(hmac_secret=SECRET)
    token = jwt({"sub": "alice"})
    for value in (f"Bearer\t{token}", f"bearer   {token}  ", f" Bearer {token}"):
        assert redactor.auth_attributes({"authorization": [value]}, False)[ENDUSER_ID] == (
            expected_id("alice")
        )
    assert redactor.auth_attributes({"authorization": ["Bearer"]}, False) == {
        AUTH_SCHEME: "bearer",
    }
    assert redactor.auth_attributes({"authorization": [f"Basic {token}"]}, False) == {
        AUTH_SCHEME: "basic",
    }


def test_oversized_authorization_is_not_decoded() -> None:
    redactor = make(hmac_secret=SECRET, max_header_bytes=256)
    token = jwt({"sub": "alice", "pad": "x" * 400})
    assert redactor.auth_attributes({"authorization": [f"Bearer {token}"]}, False) == {
        AUTH_SCHEME: "bearer",
    }

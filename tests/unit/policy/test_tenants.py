"""TenantResolver: header, JWT claim (unverified) and route metadata; never raises."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger
from pydantic import ValidationError

from ext_proc.config.sampling import TenantSettings
from ext_proc.policy.tenants import TenantResolver, jwt_payload


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(payload: Any, header: Any = None) -> str:
    head = b64(json.dumps(header or {"alg": "RS256", "typ": "JWT"}).encode())
    return f"{head}.{b64(json.dumps(payload).encode())}.c2lnbmF0dXJl"


def resolver(**kw: Any) -> TenantResolver:
    return TenantResolver(TenantSettings.model_validate(kw))


JWT_ONLY = resolver(jwt_claim="tenant")


def test_from_header() -> None:
    r = resolver(header="X-Tenant-ID")
    assert r.resolve({"x-tenant-id": ["acme", "evil"]}, {}) == "acme"
    assert r.resolve({}, {}) is None
    assert r.enabled


def test_from_route_metadata() -> None:
    r = resolver(route_metadata_key="tenant")
    assert r.resolve({}, {"tenant": "acme"}) == "acme"
    assert r.resolve({}, {"tenant": 42.0}) == "42"  # Struct numbers are doubles
    assert r.resolve({}, {"tenant": 4.5}) is None
    assert r.resolve({}, {"tenant": True}) is None
    assert r.resolve({}, {"tenant": {"nested": "x"}}) is None


def test_from_jwt_claim() -> None:
    token = jwt({"sub": "u1", "tenant": "acme"})
    assert JWT_ONLY.resolve({"authorization": [f"Bearer {token}"]}, {}) == "acme"
    assert JWT_ONLY.resolve({"authorization": [f"bearer  {token}"]}, {}) == "acme"
    assert JWT_ONLY.resolve({"authorization": [f"Basic {token}"]}, {}) is None


def test_jwt_nested_claim_and_numeric_value() -> None:
    r = resolver(jwt_claim="org.id", jwt_header="X-Auth")
    assert r.resolve({"x-auth": ["Bearer " + jwt({"org": {"id": 7}})]}, {}) == "7"
    assert r.resolve({"x-auth": ["Bearer " + jwt({"org": "flat"})]}, {}) is None


def test_jwt_padded_payload_accepted() -> None:
    payload = base64.urlsafe_b64encode(json.dumps({"tenant": "ab"}).encode()).decode()
    assert "=" in payload or len(payload) % 4 == 0
    token = f"e30.{payload}.sig"
    assert JWT_ONLY.resolve({"authorization": [f"Bearer {token}"]}, {}) == "ab"


@pytest.mark.parametrize(
    "value",
    [
        "Bearer",
        "Bearer ",
        "Bearer a.b",
        "Bearer a.b.c.d.e",  # JWE: not decoded
        "Bearer e30..sig",
        "Bearer e30.!!!.sig",
        "Bearer e30.a.sig",  # one base64 char
        "Bearer e30." + b64(b"\xff\xfe") + ".sig",  # not UTF-8
        "Bearer e30." + b64(b"not json") + ".sig",
        "Bearer e30." + b64(b"[1, 2]") + ".sig",  # not an object
        "Bearer e30." + b64(b"[" * 100_000) + ".sig",  # too long
        "Bearer e30." + b64(b'{"tenant": ' + b"[" * 5000 + b"]" * 5000 + b"}") + ".sig",
        "Bearer e30." + b64(b'{"tenant": ' + b"9" * 5000 + b"}") + ".sig",  # int limit
        "Bearer " + jwt({"tenant": None}),
        "Bearer " + jwt({"tenant": ["acme"]}),
        "Bearer " + jwt({"other": "acme"}),
        "Bearer " + jwt({"tenant": "has space"}),
        "Bearer " + jwt({"tenant": "x" * 65}),
        "Bearer " + jwt({"tenant": ""}),
        "Bearer " + jwt({"tenant": "acme\n{\"injected\": 1}"}),
    ],
)
def test_malformed_tokens_resolve_to_none(value: str) -> None:
    assert JWT_ONLY.resolve({"authorization": [value]}, {}) is None


@given(st.text(max_size=300))
def test_any_authorization_text_never_raises(value: str) -> None:
    result = JWT_ONLY.resolve({"authorization": [value]}, {})
    assert result is None or JWT_ONLY.ID_PATTERN.fullmatch(result)


@given(st.binary(max_size=300), st.text(max_size=20))
def test_any_payload_bytes_never_raise(payload: bytes, sig: str) -> None:
    token = f"e30.{b64(payload)}.{sig}"
    result = JWT_ONLY.resolve({"authorization": [f"Bearer {token}"]}, {})
    assert result is None or JWT_ONLY.ID_PATTERN.fullmatch(result)
    decoded = jwt_payload(token)
    assert decoded is None or isinstance(decoded, dict)


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children,
                                                                         max_size=3),
    max_leaves=10,
))
def test_any_claim_value_never_raises(value: Any) -> None:
    r = resolver(jwt_claim="tenant", route_metadata_key="tenant")
    result = r.resolve({"authorization": ["Bearer " + jwt({"tenant": value})]}, {"tenant": value})
    assert result is None or (len(result) <= 64 and r.ID_PATTERN.fullmatch(result))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("acme", "acme"),
        ("  acme  ", "acme"),
        ("team-1.prod_eu", "team-1.prod_eu"),
        ("x" * 64, "x" * 64),
        ("x" * 65, None),
        ("ac me", None),
        ("acme;drop", None),
        ('acme"', None),
        ("ümlaut", None),
        ("", None),
    ],
)
def test_id_charset_and_length(value: str, expected: str | None) -> None:
    assert resolver(header="x-tenant").resolve({"x-tenant": [value]}, {}) == expected


def test_order_and_fallthrough() -> None:
    r = resolver(header="x-tenant", jwt_claim="tenant", route_metadata_key="tenant",
                 order=["jwt", "header", "route_metadata"])
    auth = {"authorization": ["Bearer " + jwt({"tenant": "from-jwt"})]}
    assert r.resolve({**auth, "x-tenant": ["from-header"]}, {"tenant": "from-meta"}) == "from-jwt"
    assert r.resolve({"x-tenant": ["from-header"]}, {"tenant": "from-meta"}) == "from-header"
    assert r.resolve({"x-tenant": ["bad id"]}, {"tenant": "from-meta"}) == "from-meta"
    default_order = resolver(header="x-tenant", route_metadata_key="tenant")
    assert default_order.resolve({"x-tenant": ["h"]}, {"tenant": "m"}) == "m"


def test_allowed_list_bounds_cardinality() -> None:
    r = resolver(header="x-tenant", allowed=["acme", "beta"], unlisted="other")
    assert r.resolve({"x-tenant": ["acme"]}, {}) == "acme"
    assert r.resolve({"x-tenant": ["random-123"]}, {}) == "other"
    assert r.resolve({"x-tenant": ["bad id"]}, {}) is None


def test_no_source_configured() -> None:
    r = resolver()
    assert not r.enabled
    assert r.resolve({"x-tenant": ["acme"], "authorization": ["Bearer x.y.z"]}, {"t": "a"}) is None


def test_settings_validation() -> None:
    with pytest.raises(ValidationError):
        TenantSettings.model_validate({"order": ["cookie"]})
    with pytest.raises(ValidationError):
        TenantSettings.model_validate({"unlisted": "bad value"})
    with pytest.raises(ValidationError):
        TenantSettings.model_validate({"max_length": 0})


@pytest.fixture
def all_logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink_id = logger.add(lambda m: lines.append(str(m)), level="TRACE", serialize=True)
    yield lines
    logger.remove(sink_id)


def test_token_never_logged_nor_kept(all_logs: list[str]) -> None:
    secret_sig = "c2VjcmV0LXNpZ25hdHVyZQ"
    token = jwt({"tenant": "acme", "email": "x@example.com"}).rsplit(".", 1)[0] + "." + secret_sig
    r = resolver(jwt_claim="tenant")
    assert r.resolve({"authorization": [f"Bearer {token}"]}, {}) == "acme"
    assert r.resolve({"authorization": [f"Bearer {token}x.y"]}, {}) is None
    assert not any(secret_sig in line or "example.com" in line for line in all_logs)
    assert all(token not in repr(v) for v in vars(r).values())

"""Property tests: the Redactor never raises, and a canary in a sensitive position never
comes out of any of its functions, whatever surrounds it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from ext_proc.config.redaction import RedactionSettings
from ext_proc.policy.redaction import AUTH_SCHEME, ENDUSER_ID, TRUNCATED, Redactor

SECRET = "fuzz-test-hmac-secret-00112233"
MAX_VALUE = 1024
REDACTOR = Redactor(RedactionSettings(
    capture_request_headers=("authorization", "cookie", "x-api-key", "x-corp-sso", "referer",
                             "x-forwarded-for", "user-agent"),
    capture_response_headers=("set-cookie", "location"),
    denied_headers=("x-corp-sso",),
    hmac_secret=SecretStr(SECRET),
    max_value_length=MAX_VALUE,
))
SENSITIVE = ("token", "access_token", "id_token", "password", "secret", "api_key", "apikey",
             "key", "sig", "signature", "X-Amz-Signature", "X-Amz-Credential",
             "AWSAccessKeyId", "X-Goog-Signature")

# A canary is upper-case; the surrounding query material below has none, so it cannot
# reproduce one by accident.
canaries = st.text("0123456789abcdef", min_size=12, max_size=12).map(lambda h: f"CANARY{h}")
query_text = st.text("abcdefghijklmnopqrstuvwxyz0123456789%+._-~!$'()*,:@/?", max_size=12)
path_text = st.text("abcdefghijklmnopqrstuvwxyz0123456789%+._-~!$'()*,:@/;", max_size=20)


def outputs(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


@st.composite
def sensitive_names(draw: st.DrawFn) -> str:
    """A default sensitive name in random case, some characters percent-encoded."""
    name = draw(st.sampled_from(SENSITIVE))
    chars = []
    for char in name:
        char = char.upper() if draw(st.booleans()) else char.lower()
        if draw(st.integers(0, 4)) == 0:
            char = "%" + (f"{ord(char):02X}" if draw(st.booleans()) else f"{ord(char):02x}")
        chars.append(char)
    return "".join(chars)


# ---- never raises, always bounded --------------------------------------------


@settings(max_examples=300)
@given(st.text())
def test_path_url_text_never_raise_and_are_bounded(value: str) -> None:
    path, query = REDACTOR.path_and_query(value)
    assert len(path) <= MAX_VALUE
    assert query is None or len(query) <= MAX_VALUE
    assert len(REDACTOR.url(value)) <= MAX_VALUE
    assert len(REDACTOR.text(value)) <= MAX_VALUE
    assert isinstance(REDACTOR.is_denied(value), bool)


@given(st.dictionaries(st.sampled_from(["authorization", "cookie", "referer", "user-agent",
                                        "x-forwarded-for", "set-cookie", "location", "x-api-key"])
                       | st.text(max_size=10),
                       st.lists(st.text(max_size=200), max_size=5)),
       st.booleans())
def test_header_and_auth_attributes_never_raise(headers: dict[str, list[str]], mtls: bool) -> None:
    for direction in ("request", "response"):
        for values in REDACTOR.header_attributes(headers, direction).values():
            assert all(len(value) <= MAX_VALUE for value in values)
    auth = REDACTOR.auth_attributes(headers, mtls)
    assert set(auth) <= {AUTH_SCHEME, ENDUSER_ID}


@given(st.text(), st.binary(max_size=300))
def test_auth_never_raises_on_garbage_tokens(head: str, payload: bytes) -> None:
    token = f"{head}.{base64.urlsafe_b64encode(payload).decode().rstrip('=')}.sig"
    auth = REDACTOR.auth_attributes({"authorization": [f"Bearer {token}"]}, False)
    assert auth[AUTH_SCHEME] == "bearer"


# ---- canaries in sensitive positions never come out ---------------------------


NESTED = (  # a credential inside the (percent-encoded) value of an ordinary parameter
    "next=https%3A%2F%2Fuser%3A{c}%40host%2F", "back=https%3A%2F%2Fh%2F%3Ftoken%3D{c}",
    "r=https://{c}@host/", "assertion=eyJ{c}.eyJ{c}.{c}", "h=Bearer+{c}",
)


@st.composite
def sensitive_pairs(draw: st.DrawFn, canary: str) -> str:
    if draw(st.booleans()):
        return f"{draw(sensitive_names())}={canary}"
    return draw(st.sampled_from(NESTED)).format(c=canary)


@settings(max_examples=300)
@given(canaries, st.data(), path_text,
       st.lists(st.tuples(query_text, st.sampled_from(["=", ""]), query_text), max_size=6),
       st.integers(0, 6), st.sampled_from(["&", ";"]), st.sampled_from(["", "#frag"]))
def test_query_canary_never_leaks(
    canary: str, data: st.DataObject, path: str, pairs: list[tuple[str, str, str]], at: int,
    sep: str, fragment: str,
) -> None:
    rendered = [a + eq + b for a, eq, b in pairs]
    rendered.insert(min(at, len(rendered)), data.draw(sensitive_pairs(canary)))
    raw = "/" + path + "?" + sep.join(rendered) + fragment
    out_path, out_query = REDACTOR.path_and_query(raw)
    assert canary not in outputs([out_path, out_query])
    assert out_query is not None and not out_query.endswith(TRUNCATED)
    # Nothing but values changes: the pair count is kept.
    assert len(out_query.replace(";", "&").split("&")) == len(rendered)
    assert canary not in REDACTOR.url("https://h" + raw)
    assert canary not in REDACTOR.text("GET " + raw)


@settings(max_examples=300)
@given(canaries, st.text("abcdefghijklmnopqrstuvwxyz0123456789.-_~!$&'()*+,;=%@", max_size=10),
       st.sampled_from(["example.com", "[::1]", "[2001:db8::1]:8443", "10.0.0.1:80", ""]),
       path_text, st.booleans(), sensitive_names())
def test_url_userinfo_and_fragment_canaries_never_leak(
    canary: str, user: str, host: str, path: str, canary_is_password: bool, name: str,
) -> None:
    userinfo = f"{user}:{canary}" if canary_is_password else canary
    url = f"https://{userinfo}@{host}/{path}?{name}={canary}#{name}={canary}"
    result = REDACTOR.url(url)
    assert canary not in result
    assert host in result
    assert canary not in REDACTOR.text(f"fetching {url} failed")


POSITIONS = (
    "Authorization: Bearer {c}", "authorization: Basic {c}", "Proxy-Authorization: {c}",
    "Cookie: session={c}", "set-cookie: id={c}; Path=/", "x-api-key: {c}", "X-Corp-SSO: {c}",
    "Bearer {c}", "password={c}", "api%5Fkey={c}", "TOKEN={c}", 'secret="{c}"',
    '"access_token": "{c}"', "'password': '{c}'", "https://user:{c}@host/", "ftp://{c}@[::1]/",
    "/cb?x=1&sig={c}", "eyJ{c}.eyJ{c}.{c}", "http://u:p@ss{c}@host/",
)


@settings(max_examples=400)
@given(canaries, st.sampled_from(POSITIONS), st.text(max_size=80), st.text(max_size=80))
def test_text_canary_never_leaks(canary: str, position: str, prefix: str, suffix: str) -> None:
    value = prefix + " " + position.format(c=canary) + " " + suffix
    assert canary not in REDACTOR.text(value)


@given(canaries, st.text(max_size=60), st.text(max_size=60))
@example("CANARY000000000000", "DPOP", "")  # found by this test: "DPOP password=<secret>"
def test_header_canaries_never_leak(canary: str, before: str, after: str) -> None:
    headers = {
        "authorization": [f"Bearer {canary}"], "cookie": [f"a={canary}", canary],
        "x-api-key": [canary], "x-corp-sso": [canary],
        "referer": [f"{before} https://u:{canary}@h/?token={canary} {after}"],
        "x-forwarded-for": [f"{before} password={canary}"],
        "user-agent": [f"{after} Bearer {canary}"],
    }
    request = REDACTOR.header_attributes(headers, "request")
    response = REDACTOR.header_attributes(
        {"set-cookie": [f"s={canary}"], "location": [f"https://{canary}@h/"]}, "response")
    assert canary not in outputs([request, response])
    assert len(request["http.request.header.cookie"]) == 2


@given(st.text(min_size=1, max_size=100), canaries)
def test_jwt_subject_token_and_secret_never_leak(subject: str, canary: str) -> None:
    claims = base64.urlsafe_b64encode(
        json.dumps({"sub": canary + subject}).encode()).decode().rstrip("=")
    token = f"eyJhbGciOiJSUzI1NiJ9.{claims}.{canary}"
    auth = REDACTOR.auth_attributes({"authorization": [f"Bearer {token}"]}, True)
    expected = hmac.new(SECRET.encode(), (canary + subject).encode("utf-8", "surrogatepass"),
                        hashlib.sha256).hexdigest()[:32]
    assert auth == {AUTH_SCHEME: "bearer", ENDUSER_ID: expected}
    rendered = outputs(auth)
    for secret in (canary, token, SECRET, claims):
        assert secret not in rendered

"""Redactor.path_and_query and Redactor.url (issue #7 item 2)."""

from __future__ import annotations

from typing import Any

import pytest

from ext_proc.config.redaction import RedactionSettings
from ext_proc.policy.redaction import BUILTIN_SENSITIVE_PARAMS, REDACTED, TRUNCATED, Redactor

CANARY = "CANARYf3a9c1e07b"


def make(**fields: Any) -> Redactor:
    return Redactor(RedactionSettings(**fields))


@pytest.fixture
def redactor() -> Redactor:
    return make()


DEFAULT_NAMES = (
    "token", "access_token", "id_token", "password", "secret", "api_key", "apikey", "key",
    "sig", "signature", "X-Amz-Signature", "X-Amz-Credential", "AWSAccessKeyId",
    "X-Goog-Signature",
)


@pytest.mark.parametrize("name", DEFAULT_NAMES)
def test_every_default_param_is_redacted(redactor: Redactor, name: str) -> None:
    assert name.lower() in BUILTIN_SENSITIVE_PARAMS
    path, query = redactor.path_and_query(f"/p?a=1&{name}={CANARY}&b=2")
    assert path == "/p"
    assert query == f"a=1&{name}={REDACTED}&b=2"


@pytest.mark.parametrize("name", ["TOKEN", "Access_Token", "x-amz-signature", "aWsAcCeSsKeYiD"])
def test_names_are_case_insensitive_and_spelling_is_kept(redactor: Redactor, name: str) -> None:
    assert redactor.path_and_query(f"/?{name}={CANARY}") == ("/", f"{name}={REDACTED}")


@pytest.mark.parametrize(
    "encoded", ["api%5Fkey", "api%5fkey", "%61pi_key", "to%6Ben", "pass%77ord", "token%5B%5D",
                "token[]"],
)
def test_percent_encoded_names_are_decoded(redactor: Redactor, encoded: str) -> None:
    assert redactor.path_and_query(f"/x?{encoded}={CANARY}") == ("/x", f"{encoded}={REDACTED}")


def test_everything_else_is_kept_byte_for_byte(redactor: Redactor) -> None:
    raw = "/a%20b/c?q=hello%20world&empty=&flag&x=1=2&%ZZ=%E0%A4&page=2"
    assert redactor.path_and_query(raw) == (
        "/a%20b/c", "q=hello%20world&empty=&flag&x=1=2&%ZZ=%E0%A4&page=2",
    )


def test_repeated_params_are_all_redacted_in_order(redactor: Redactor) -> None:
    _, query = redactor.path_and_query(f"/?token={CANARY}1&a=1&token={CANARY}2&TOKEN={CANARY}3")
    assert query == f"token={REDACTED}&a=1&token={REDACTED}&TOKEN={REDACTED}"


def test_param_without_equals_and_empty_value_are_kept(redactor: Redactor) -> None:
    assert redactor.path_and_query("/?token&password=&debug") == ("/", "token&password=&debug")


def test_semicolon_separated_pairs_are_redacted(redactor: Redactor) -> None:
    assert redactor.path_and_query(f"/?a=1;token={CANARY}&b=2") == (
        "/", f"a=1;token={REDACTED}&b=2",
    )


def test_value_keeps_its_own_equals_signs_but_is_masked_whole(redactor: Redactor) -> None:
    assert redactor.path_and_query(f"/?sig={CANARY}==&x=a=b") == ("/", f"sig={REDACTED}&x=a=b")


def test_fragment_is_dropped_and_not_parsed_as_query(redactor: Redactor) -> None:
    assert redactor.path_and_query(f"/p?a=1#token={CANARY}") == ("/p", "a=1")
    assert redactor.path_and_query(f"/p#frag?token={CANARY}") == ("/p", None)


def test_query_is_none_without_question_mark_and_empty_with_one(redactor: Redactor) -> None:
    assert redactor.path_and_query("/p") == ("/p", None)
    assert redactor.path_and_query("/p?") == ("/p", "")
    assert redactor.path_and_query("") == ("", None)


def test_malformed_percent_encoding_never_raises(redactor: Redactor) -> None:
    raw = f"/%?%=%&%%%=1&api%5=2&%FF%FE=3&tok%65n={CANARY}&%E2%82=x"
    path, query = redactor.path_and_query(raw)
    assert path == "/%"
    assert query == f"%=%&%%%=1&api%5=2&%FF%FE=3&tok%65n={REDACTED}&%E2%82=x"


def test_nested_url_with_credentials_in_value_is_masked(redactor: Redactor) -> None:
    nested = f"https%3A%2F%2Fuser%3A{CANARY}%40host%2F"
    token_inside = f"https%3A%2F%2Fh%2F%3Ftoken%3D{CANARY}"
    _, query = redactor.path_and_query(f"/?next={nested}&back={token_inside}&plain=a%20b")
    assert query == f"next={REDACTED}&back={REDACTED}&plain=a%20b"


def test_double_encoded_nested_url_is_masked(redactor: Redactor) -> None:
    nested = f"https%253A%252F%252Fuser%253A{CANARY}%2540host%252F"
    assert redactor.path_and_query(f"/?next={nested}") == ("/", f"next={REDACTED}")
    assert redactor.text(f"redirect next={nested}") == f"redirect next={REDACTED}"


def test_jwt_as_value_of_any_name_is_masked(redactor: Redactor) -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    assert redactor.path_and_query(f"/?assertion={jwt}") == ("/", f"assertion={REDACTED}")
    assert redactor.path_and_query(f"/magic/{jwt}/go") == (f"/magic/{REDACTED}/go", None)


def test_matrix_params_in_path_are_redacted() -> None:
    redactor = make(sensitive_query_params=("jsessionid",))
    assert redactor.path_and_query(f"/app;jsessionid={CANARY}/x?a=1") == (
        f"/app;jsessionid={REDACTED}/x", "a=1",
    )


def test_configured_names_and_patterns() -> None:
    redactor = make(
        sensitive_query_params=("Session",), sensitive_query_param_patterns=(r"^x-.*-auth$",),
    )
    _, query = redactor.path_and_query(f"/?session={CANARY}&X-My-Auth={CANARY}&x-auth=1")
    assert query == f"session={REDACTED}&X-My-Auth={REDACTED}&x-auth=1"


def test_pattern_is_searched_not_anchored() -> None:
    redactor = make(sensitive_query_param_patterns=("secret",))
    _, query = redactor.path_and_query(f"/?client_secret_v2={CANARY}&mysecretx={CANARY}")
    assert query == f"client_secret_v2={REDACTED}&mysecretx={REDACTED}"


def test_absolute_form_target_drops_userinfo_and_authority(redactor: Redactor) -> None:
    assert redactor.path_and_query(f"http://user:{CANARY}@[::1]:8080/x?sig={CANARY}") == (
        "/x", f"sig={REDACTED}",
    )
    assert redactor.path_and_query(f"https://{CANARY}@host") == ("/", None)


def test_asterisk_and_authority_form_are_taken_literally(redactor: Redactor) -> None:
    assert redactor.path_and_query("*") == ("*", None)
    assert redactor.path_and_query("example.com:443") == ("example.com:443", None)


def test_oversized_path_is_cut_before_parsing_and_marked() -> None:
    redactor = make(max_header_bytes=256, max_value_length=4096)
    raw = "/p?" + "a=1&" * 60 + f"token={CANARY}" + "&b=2" * 100
    path, query = redactor.path_and_query(raw)
    assert path == "/p"
    assert query is not None and query.endswith(TRUNCATED)
    assert CANARY not in query
    assert len(query) <= 256 + len(TRUNCATED)


def test_long_value_is_truncated_to_max_value_length() -> None:
    redactor = make(max_value_length=64)
    path, query = redactor.path_and_query("/" + "p" * 100 + "?q=" + "v" * 100)
    assert len(path) == 64 and path.endswith(TRUNCATED)
    assert query is not None and len(query) == 64 and query.endswith(TRUNCATED)


# ---- url() -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (f"https://user:{CANARY}@example.com/p?a=1", "https://example.com/p?a=1"),
        (f"https://{CANARY}@example.com", "https://example.com"),
        (f"http://user:{CANARY}@[2001:db8::1]:8443/x", "http://[2001:db8::1]:8443/x"),
        (f"http://u:{CANARY}@[::1]/", "http://[::1]/"),
        (f"http://u:p@ss{CANARY}@host:1/", "http://host:1/"),
        (f"http://u:p\\{CANARY}@host/", "http://host/"),
        (f"https://h/p?token={CANARY}#x", f"https://h/p?token={REDACTED}#x"),
        (f"https://h/cb#access_token={CANARY}&state=s", f"https://h/cb#access_token={REDACTED}&state=s"),
        ("/relative?password=" + CANARY, f"/relative?password={REDACTED}"),
        ("https://example.com/@alice", "https://example.com/@alice"),
        ("mailto:someone@example.com", "mailto:someone@example.com"),
        ("http://[::1", "http://[::1"),
        ("", ""),
    ],
)
def test_url(redactor: Redactor, raw: str, expected: str) -> None:
    assert redactor.url(raw) == expected


def test_url_is_cut_without_leaving_half_a_userinfo() -> None:
    redactor = make(max_header_bytes=256)
    raw = "https://user:" + CANARY * 30 + "@host/"
    result = redactor.url(raw)
    assert "CANARY" not in result
    assert result.endswith(TRUNCATED)

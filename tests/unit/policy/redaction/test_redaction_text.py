"""Redactor.text (log values) and RedactionSettings validation."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from ext_proc.config.redaction import RedactionSettings
from ext_proc.policy.redaction import REDACTED, TRUNCATED, Redactor

CANARY = "CANARY5e8d0a4f21"
SECRET = "text-test-hmac-secret-abcdefgh"


def make(**fields: Any) -> Redactor:
    return Redactor(RedactionSettings(**fields))


@pytest.fixture
def redactor() -> Redactor:
    return make()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (f"Authorization: Bearer {CANARY}", f"Authorization: {REDACTED}"),
        (f"authorization=Basic {CANARY}", f"authorization={REDACTED}"),
        (f"Cookie: a={CANARY}; b=2\nnext line", f"Cookie: {REDACTED}\nnext line"),
        (f"got Bearer {CANARY} from client", f"got Bearer {REDACTED} from client"),
        (f"BASIC {CANARY}==", f"BASIC {REDACTED}"),
        ("basic auth failed", "basic auth failed"),
        (f"password={CANARY} user=bob", f"password={REDACTED} user=bob"),
        (f'PASSWORD="{CANARY} two words"', f'PASSWORD="{REDACTED}"'),
        (f"api%5Fkey={CANARY}", f"api%5Fkey={REDACTED}"),
        (f"https://u:{CANARY}@host/p", "https://host/p"),
        (f"see http://{CANARY}@[::1]:8080/ now", "see http://[::1]:8080/ now"),
        (f"GET /p?a=1&token={CANARY}&b=2", f"GET /p?a=1&token={REDACTED}&b=2"),
        (f'{{"secret": "{CANARY}", "n": 1}}', f'{{"secret": "{REDACTED}", "n": 1}}'),
        (f"{{'password': '{CANARY}'}}", f"{{'password': '{REDACTED}'}}"),
        (f'{{"pin": 1, "key": 1234{CANARY}}}', f'{{"pin": 1, "key": {REDACTED}}}'),
        (f'msg="retry with token={CANARY}"', f'msg="retry with token={REDACTED}"'),
        (f'{{"detail": "Bearer {CANARY}"}}', f'{{"detail": "Bearer {REDACTED}"}}'),
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig here", f"{REDACTED} here"),
        (f"x-api-key: {CANARY}", f"x-api-key: {REDACTED}"),
        ("nothing to see: here = fine", "nothing to see: here = fine"),
        ("", ""),
    ],
)
def test_text(redactor: Redactor, raw: str, expected: str) -> None:
    assert redactor.text(raw) == expected


def test_configured_names_reach_text() -> None:
    redactor = make(denied_headers=("x-corp-sso",), sensitive_query_params=("otp",),
                    sensitive_query_param_patterns=("^session",))
    raw = f"x-corp-sso: {CANARY}"
    assert redactor.text(raw) == f"x-corp-sso: {REDACTED}"
    assert redactor.text(f"otp={CANARY} sessionid={CANARY}") == (
        f"otp={REDACTED} sessionid={REDACTED}"
    )


def test_text_is_cut_and_truncated() -> None:
    redactor = make(max_header_bytes=256, max_value_length=128)
    result = redactor.text("word " * 200 + f"password={CANARY}")
    assert len(result) == 128
    assert result.endswith(TRUNCATED)
    cut_only = make(max_header_bytes=256, max_value_length=4096).text("x " * 200)
    assert cut_only.endswith(TRUNCATED)
    assert len(cut_only) <= 256 + len(TRUNCATED)


def test_cut_never_leaves_half_a_secret_behind() -> None:
    redactor = make(max_header_bytes=256)
    # The cut lands inside the userinfo; backing off to a delimiter removes it.
    raw = "x" * 200 + " https://user:" + CANARY * 10 + "@host/"
    assert "CANARY" not in redactor.text(raw)


# ---- settings ----------------------------------------------------------------


def test_every_field_has_a_description() -> None:
    for name, field in RedactionSettings.model_fields.items():
        assert field.description, name


def test_settings_are_frozen_and_forbid_extra() -> None:
    settings = RedactionSettings()
    with pytest.raises(ValidationError):
        setattr(settings, "max_value_length", 10)  # noqa: B010 (frozen: must raise)
    with pytest.raises(ValidationError):
        RedactionSettings(unknown=1)  # type: ignore[call-arg]


def test_names_are_normalised() -> None:
    settings = RedactionSettings(capture_request_headers=(" Content-Type", "content-type"),
                                 sensitive_query_params=("OTP",))
    assert settings.capture_request_headers == ("content-type",)
    assert settings.sensitive_query_params == ("otp",)


@pytest.mark.parametrize(
    "fields",
    [
        {"denied_header_patterns": ("(unclosed",)},
        {"sensitive_query_param_patterns": ("*bad",)},
        {"capture_request_headers": ("bad header",)},
        {"denied_headers": ("",)},
        {"hmac_secret": "short"},
        {"enduser_id_length": 8},
        {"max_value_length": 10},
    ],
)
def test_invalid_settings_are_rejected(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RedactionSettings(**fields)


def test_secret_never_shows_in_repr_or_errors() -> None:
    settings = RedactionSettings(hmac_secret=SecretStr(SECRET))
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())
    assert SECRET not in repr(vars(Redactor(settings)))
    with pytest.raises(ValidationError) as caught:
        RedactionSettings(hmac_secret=SecretStr(CANARY[:10]))
    assert CANARY[:10] not in str(caught.value)

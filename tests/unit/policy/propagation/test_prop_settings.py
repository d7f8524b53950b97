"""PropagationSettings: validated format names, header names and limits."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ext_proc.config.propagation import PropagationSettings


def test_defaults() -> None:
    settings = PropagationSettings()
    assert settings.extract == (
        "tracecontext", "grpc-trace-bin", "b3", "b3multi", "jaeger", "baggage",
    )
    assert settings.inject == ("tracecontext", "baggage")
    assert (settings.clear, settings.response, settings.response_header) == ((), (), None)


def test_every_field_is_described() -> None:
    assert all(field.description for field in PropagationSettings.model_fields.values())


def test_comma_separated_strings_are_accepted() -> None:
    settings = PropagationSettings.model_validate(
        {"extract": "b3, tracecontext", "clear": "X-Old,grpc-trace-bin",
         "response": "server-timing"}
    )
    assert settings.extract == ("b3", "tracecontext")
    assert settings.clear == ("x-old", "grpc-trace-bin")
    assert settings.response == ("server-timing",)


@pytest.mark.parametrize("bad", [
    {"extract": ("zipkin",)},
    {"inject": ("b3", "b3")},
    {"clear": ("bad header",)},
    {"clear": (":path",)},
    {"response": ("traceparent",)},
    {"response_header": "x trace"},
    {"baggage_max_members": 63},
    {"baggage_max_bytes": 8191},
    {"unknown": 1},
])
def test_invalid_settings_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        PropagationSettings.model_validate(bad)


def test_frozen_and_hashable() -> None:
    settings = PropagationSettings(inject=("grpc-trace-bin",))
    with pytest.raises(ValidationError):
        settings.inject = ("b3",)
    assert hash(settings) == hash(PropagationSettings(inject=("grpc-trace-bin",)))


def test_root_settings_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    from ext_proc.config import load_settings

    monkeypatch.setenv("EXTPROC_PROPAGATION__INJECT", '["tracecontext", "grpc-trace-bin"]')
    assert load_settings().propagation.inject == ("tracecontext", "grpc-trace-bin")

"""The README's configuration reference is generated from the settings models."""

from __future__ import annotations

from pathlib import Path

from ext_proc.config.reference import markdown_reference, settings_fields, update_readme

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_current() -> None:
    text = README.read_text()
    assert update_readme(text) == text, (
        "README's configuration reference is stale: run "
        "`.venv/bin/python -m ext_proc.config.reference README.md`")


def test_every_setting_is_described() -> None:
    for path, field in settings_fields():
        assert field.description, ".".join(path)
    assert "`server.listen`" in markdown_reference()


def test_readme_shows_the_two_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text

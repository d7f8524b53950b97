"""The README fits on a screen and keeps its two commands; the configuration reference
(docs/configuration.md) is generated from the settings models; every local link in the
project's Markdown resolves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import pytest

from ext_proc.config.reference import markdown_reference, settings_fields, update_reference
from ext_proc.dev.devstack import ROOT

README: Final = ROOT / "README.md"
REFERENCE: Final = ROOT / "docs" / "configuration.md"
MARKDOWN: Final = sorted([README, ROOT / "ARCHITECTURE.md", ROOT / "CHANGELOG.md",
                          ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])


def test_reference_is_current() -> None:
    text = REFERENCE.read_text()
    assert update_reference(text) == text, (
        "docs/configuration.md is stale: run "
        "`.venv/bin/python -m ext_proc.config.reference docs/configuration.md`")


def test_every_setting_is_described() -> None:
    for path, field in settings_fields():
        assert field.description, ".".join(path)
    assert "`server.listen`" in markdown_reference()


def test_readme_shows_the_two_commands_first_and_fits_on_a_screen() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    first_section = text.split("\n## ")[1]
    assert first_section.startswith("The two commands")
    assert "make demo" in first_section and "make test" in first_section


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_resolve(path: Path) -> None:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text):
        assert (path.parent / target).exists(), f"{path.name}: broken link {target}"

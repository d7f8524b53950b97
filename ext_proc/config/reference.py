"""The configuration reference (docs/configuration.md), generated from the settings models."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ext_proc.config import ENV_PREFIX, Settings


def _model_of(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def settings_fields(
    model: type[BaseModel] = Settings, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Every leaf setting as (path, field), in declaration order."""
    for name, field in model.model_fields.items():
        nested = _model_of(field)
        if nested is not None:
            yield from settings_fields(nested, (*path, name))
        else:
            yield (*path, name), field


# Variables with our prefix that are not settings.
OTHER_VARIABLES = frozenset({"EXTPROC_CONFIG_FILE", "EXTPROC_HEALTH_TARGET"})


def unknown_env_vars(env: Mapping[str, str]) -> list[str]:
    """``EXTPROC_*`` variables that name no setting (typos are otherwise silent)."""
    known = {ENV_PREFIX + "__".join(part.upper() for part in path)
             for path, _ in settings_fields()}
    return sorted(key for key in env if key.startswith(ENV_PREFIX)
                  and key not in known and key not in OTHER_VARIABLES
                  and not any(key.startswith(k + "__") for k in known))


def _default(field: FieldInfo) -> str:
    value: Any = field.get_default(call_default_factory=True)
    if isinstance(value, tuple):
        value = ", ".join(str(v) for v in value) or "(none)"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return "`" + str(value).replace("|", "\\|") + "`" if value not in (None, "") else "unset"


def markdown_reference() -> str:
    lines = ["| YAML key | environment variable | default | meaning |",
             "|---|---|---|---|"]
    for path, field in settings_fields():
        env = ENV_PREFIX + "__".join(part.upper() for part in path)
        text = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{'.'.join(path)}` | `{env}` | {_default(field)} | {text} |")
    return "\n".join(lines)


START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def update_reference(text: str) -> str:
    """`text` with the block between the reference markers regenerated."""
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{markdown_reference()}\n{END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/configuration.md")
    target.write_text(update_reference(target.read_text()))

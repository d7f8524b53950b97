"""Live reload of the sampling rules file.

The file is a YAML mapping with any `SamplingSettings` fields except
``rules_file`` and ``reload_interval_s``; it overlays the base settings from the
main config (fields it omits keep their base value). `RulesWatcher` polls the
file's content hash every ``interval_s`` on the event loop (reading off-loop)
and calls ``on_change`` with the new settings once two consecutive polls agree (so
a half-written file is not applied; rename-into-place is still the safest way to
update it); a missing, unreadable or invalid
file keeps the previous rules, is logged with the reason and reported to
``on_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from loguru import logger
from pydantic import ValidationError

from ext_proc.config.sampling import SamplingSettings

MAX_FILE_BYTES: Final = 1 << 20
_NOT_RELOADABLE: Final = frozenset({"rules_file", "reload_interval_s"})


class RulesFileError(Exception):
    """The rules file cannot be used; the message says why (never echoes secrets)."""


@dataclass(frozen=True, slots=True)
class LoadedRules:
    settings: SamplingSettings
    digest: str


def _read(path: Path) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise RulesFileError(f"larger than {MAX_FILE_BYTES} bytes")
    return data


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{key}: {err['msg']}")
    return "; ".join(parts)


def parse_rules(data: bytes, base: SamplingSettings) -> SamplingSettings:
    """Overlay the YAML document `data` on `base`; raise RulesFileError when invalid."""
    try:
        doc: Any = yaml.safe_load(data) if data.strip() else {}
    except yaml.YAMLError as exc:
        raise RulesFileError(f"invalid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise RulesFileError("top level must be a mapping")
    fixed = _NOT_RELOADABLE.intersection(doc)
    if fixed:
        raise RulesFileError(f"keys not allowed in the rules file: {sorted(fixed)}")
    merged = {**base.model_dump(exclude_unset=True), **doc}
    try:
        return SamplingSettings.model_validate(merged)
    except ValidationError as exc:
        raise RulesFileError(_validation_message(exc)) from None


def load_rules(path: Path, base: SamplingSettings) -> LoadedRules:
    """Read and validate the rules file once (startup and check-config)."""
    try:
        data = _read(path)
    except OSError as exc:
        raise RulesFileError(f"cannot read: {exc.strerror or exc}") from None
    return LoadedRules(parse_rules(data, base), hashlib.sha256(data).hexdigest())


class RulesWatcher:
    """Polls `path` and hands new valid settings to `on_change`."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[SamplingSettings], None],
        on_error: Callable[[str], None] | None = None,
        *,
        base: SamplingSettings,
        interval_s: float = 2.0,
        loaded_digest: str | None = None,
    ) -> None:
        self._path = path
        self._on_change = on_change
        self._on_error = on_error
        self._base = base
        self._interval = interval_s
        self._digest = loaded_digest
        self._pending: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        """Start polling on the running loop; the first check happens at once."""
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="rules-watcher")

    async def stop(self) -> None:
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    async def check(self) -> None:
        """One poll. A new content (or read error) is acted on once two polls in a row see
        it, so a file caught half-written is never applied."""
        try:
            data = await asyncio.to_thread(_read, self._path)
        except (OSError, RulesFileError) as exc:
            data, reason = None, f"cannot read: {getattr(exc, 'strerror', None) or exc}"
        key = hashlib.sha256(data).hexdigest() if data is not None else f"unreadable:{reason}"
        if key == self._digest:
            self._pending = None
            return
        if key != self._pending:
            self._pending = key
            return
        self._pending = None
        self._digest = key
        if data is None:
            self._fail(reason)
            return
        try:
            settings = parse_rules(data, self._base)
            self._on_change(settings)
        except RulesFileError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # a failing callback must not kill the watcher
            logger.opt(exception=True).error("sampling rules callback failed", path=str(self._path))
            self._report(f"apply failed: {type(exc).__name__}")
            return
        logger.info("sampling rules reloaded", path=str(self._path), sha256=key[:12])

    def _fail(self, reason: str) -> None:
        logger.warning("sampling rules rejected, keeping previous rules",
                       path=str(self._path), reason=reason)
        self._report(reason)

    def _report(self, reason: str) -> None:
        if self._on_error is not None:
            self._on_error(reason)

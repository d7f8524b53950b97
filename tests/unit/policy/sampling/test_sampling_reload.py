"""Live reload of the rules file: valid changes apply, bad files keep the previous rules."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from ext_proc.config.sampling import SamplingSettings
from ext_proc.policy.sampling import (
    RequestFacts,
    RulesFileError,
    RulesWatcher,
    build_sampling,
    load_rules,
    parse_rules,
)

TIMEOUT = 5.0
VALID_A = b"rules:\n  - {name: health, path_prefix: /health, ratio: 0.01}\n"
VALID_B = b"rules:\n  - {name: health, path_prefix: /health, ratio: 0.5}\nratio: 0.2\n"
HEALTH = RequestFacts(None, "/health", "GET", {}, None, None)


@pytest.fixture
def warnings() -> Iterator[list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    sink_id = logger.add(
        lambda m: records.append(dict(m.record)), level="WARNING", format="{message}",
    )
    yield records
    logger.remove(sink_id)


class Events:
    """Callbacks that signal an asyncio.Event per call, to wait on without sleeping."""

    def __init__(self) -> None:
        self.changes: list[SamplingSettings] = []
        self.errors: list[str] = []
        self.changed = asyncio.Event()
        self.failed = asyncio.Event()

    def on_change(self, settings: SamplingSettings) -> None:
        self.changes.append(settings)
        self.changed.set()

    def on_error(self, reason: str) -> None:
        self.errors.append(reason)
        self.failed.set()

    async def next_change(self) -> SamplingSettings:
        await asyncio.wait_for(self.changed.wait(), TIMEOUT)
        self.changed.clear()
        return self.changes[-1]

    async def next_error(self) -> str:
        await asyncio.wait_for(self.failed.wait(), TIMEOUT)
        self.failed.clear()
        return self.errors[-1]


async def test_watcher_applies_valid_and_rejects_invalid(
    tmp_path: Path, warnings: list[dict[str, Any]],
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(VALID_A)
    base = SamplingSettings.model_validate({"rules_file": str(path), "ratio": 0.9})
    loaded = load_rules(path, base)
    policy = build_sampling(loaded.settings, environ={})
    assert policy.directive(HEALTH).ratio == 0.01
    events = Events()

    def apply(settings: SamplingSettings) -> None:
        policy.reload(settings)
        events.on_change(settings)

    watcher = RulesWatcher(path, apply, events.on_error, base=base, interval_s=0.01,
                           loaded_digest=loaded.digest)
    watcher.start()
    try:
        path.write_bytes(VALID_B)
        new = await events.next_change()
        assert (new.ratio, new.rules[0].ratio, new.rules_file) == (0.2, 0.5, path)
        assert policy.directive(HEALTH).ratio == 0.5

        path.write_bytes(b"rules:\n  - {path_prefix: /health, ratio: 7}\n")
        reason = await events.next_error()
        assert "rules.0.ratio" in reason
        assert policy.directive(HEALTH).ratio == 0.5  # previous rules kept
        logged = [r for r in warnings if r["message"].startswith("sampling rules rejected")]
        assert logged and logged[-1]["extra"]["reason"] == reason
        assert logged[-1]["extra"]["path"] == str(path)

        path.write_bytes(b"rules: [unclosed\n")
        assert "invalid YAML" in await events.next_error()

        path.unlink()
        assert "cannot read" in await events.next_error()

        path.write_bytes(VALID_A)
        assert (await events.next_change()).rules[0].ratio == 0.01
        assert policy.directive(HEALTH).ratio == 0.01
        assert len(events.changes) == 2
    finally:
        await watcher.stop()


async def test_watcher_without_digest_applies_current_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(VALID_B)
    events = Events()
    watcher = RulesWatcher(path, events.on_change, events.on_error,
                           base=SamplingSettings.model_validate({}), interval_s=0.01)
    watcher.start()
    try:
        assert (await events.next_change()).ratio == 0.2
    finally:
        await watcher.stop()
    assert events.errors == []


async def test_callback_failure_is_reported_and_watcher_survives(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(VALID_A)
    events = Events()
    calls: list[SamplingSettings] = []

    def flaky(settings: SamplingSettings) -> None:
        calls.append(settings)
        if len(calls) == 1:
            raise RuntimeError("boom")
        events.on_change(settings)

    watcher = RulesWatcher(path, flaky, events.on_error,
                           base=SamplingSettings.model_validate({}), interval_s=0.01)
    watcher.start()
    try:
        assert "RuntimeError" in await events.next_error()
        path.write_bytes(VALID_B)
        assert (await events.next_change()).ratio == 0.2
    finally:
        await watcher.stop()


async def test_stop_is_prompt_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(VALID_A)
    events = Events()
    watcher = RulesWatcher(path, events.on_change, base=SamplingSettings.model_validate({}),
                           interval_s=3600)
    watcher.start()
    watcher.start()  # second start is a no-op
    await asyncio.wait_for(watcher.stop(), TIMEOUT)  # does not wait out the interval
    await watcher.stop()
    assert events.changes == []  # at most one poll ran: new content needs two to apply


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"- a\n- b\n", "top level must be a mapping"),
        (b"rules_file: other.yaml\n", "not allowed"),
        (b"reload_interval_s: 1\n", "not allowed"),
        (b"ratio: [\n", "invalid YAML"),
        (b"bogus: 1\n", "bogus"),
    ],
)
def test_parse_rules_rejects(data: bytes, message: str) -> None:
    with pytest.raises(RulesFileError, match=message):
        parse_rules(data, SamplingSettings.model_validate({}))


def test_parse_rules_overlays_base() -> None:
    base = SamplingSettings.model_validate(
        {"ratio": 0.3, "global_budget": {"traces_per_second": 10}, "reload_interval_s": 9},
    )
    merged = parse_rules(b"rules: [{ratio: 0.1, method: GET}]\n", base)
    assert (merged.ratio, merged.reload_interval_s, len(merged.rules)) == (0.3, 9, 1)
    assert merged.global_budget is not None and merged.global_budget.traces_per_second == 10
    assert parse_rules(b"", base) == base


def test_load_rules_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RulesFileError, match="cannot read"):
        load_rules(tmp_path / "absent.yaml", SamplingSettings.model_validate({}))

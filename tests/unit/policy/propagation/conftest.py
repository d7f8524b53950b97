from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger

from ext_proc.policy.propagation import Rejections


@pytest.fixture
def rejections() -> Rejections:
    return Rejections()


@pytest.fixture
def debug_records() -> Iterator[list[Any]]:
    """Loguru records at DEBUG and above emitted during the test."""
    records: list[Any] = []
    sink_id = logger.add(lambda message: records.append(message.record), level="DEBUG")
    yield records
    logger.remove(sink_id)

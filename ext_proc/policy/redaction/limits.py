"""Bounds on hostile input: how much we read, how much we emit."""

from __future__ import annotations

import re
from typing import Final

REDACTED: Final = "REDACTED"
TRUNCATED: Final = "[TRUNCATED]"

# Greedy: everything up to and including the last delimiter of the string.
_UP_TO_LAST_DELIMITER: Final = re.compile(r".*[\s&;/?#,@]", re.DOTALL)


def cut(value: str, limit: int) -> tuple[str, bool]:
    """At most `limit` characters of `value`, and whether anything was cut.

    The cut backs off to the last delimiter so that no partial token (half a
    password, a URL authority without its ``@``) survives to be misparsed.
    """
    if len(value) <= limit:
        return value, False
    head = value[:limit]
    match = _UP_TO_LAST_DELIMITER.match(head)
    return (head[: match.end()] if match else ""), True


def truncate(value: str, limit: int) -> str:
    """`value` shortened to `limit` characters, ending in `TRUNCATED` when shortened."""
    if len(value) <= limit:
        return value
    return value[: max(limit - len(TRUNCATED), 0)] + TRUNCATED

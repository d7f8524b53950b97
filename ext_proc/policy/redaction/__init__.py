"""The redaction engine: one code path and one config for spans, logs and metric labels.

Build one `Redactor` from `RedactionSettings` at startup and inject it.
"""

from __future__ import annotations

from ext_proc.policy.redaction.engine import (
    AUTH_SCHEME,
    ENDUSER_ID,
    REQUEST_HEADER_PREFIX,
    RESPONSE_HEADER_PREFIX,
    Direction,
    Redactor,
)
from ext_proc.policy.redaction.limits import REDACTED, TRUNCATED
from ext_proc.policy.redaction.names import BUILTIN_DENIED_HEADERS, BUILTIN_SENSITIVE_PARAMS

__all__ = [
    "AUTH_SCHEME",
    "BUILTIN_DENIED_HEADERS",
    "BUILTIN_SENSITIVE_PARAMS",
    "ENDUSER_ID",
    "REDACTED",
    "REQUEST_HEADER_PREFIX",
    "RESPONSE_HEADER_PREFIX",
    "TRUNCATED",
    "Direction",
    "Redactor",
]

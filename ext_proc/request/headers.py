"""Envoy `HeaderMap` <-> OpenTelemetry carriers.

Incoming headers become a `Carrier`: lower-case name -> every value in arrival
order, so propagators can see duplicates (two ``traceparent`` headers make the
context invalid; several ``tracestate`` headers are joined). Envoy sends values
in ``raw_value`` (bytes) and leaves ``value`` empty; we read ``raw_value`` and
fall back to ``value``. Outgoing headers are a plain ``dict[str, str]`` that
`header_mutation` turns into a replace-never-append mutation in ``raw_value``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from loguru import logger
from opentelemetry.propagators.textmap import Getter, Setter

from ext_proc._gen.envoy.config.core.v3 import base_pb2
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb

Carrier = dict[str, list[str]]

_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND: Final = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


# Most of one header map we examine: well above Envoy's own defaults (100 headers,
# 60 KiB), so only a hostile or misconfigured client reaches them; the rest is ignored.
MAX_HEADERS: Final = 1024
MAX_HEADER_BYTES: Final = 1024 * 1024


def carrier_from_headers(header_map: base_pb2.HeaderMap, max_headers: int = MAX_HEADERS,
                         max_bytes: int = MAX_HEADER_BYTES) -> Carrier:
    """Collect Envoy's headers into a `Carrier`. Never raises on odd bytes.

    Headers past `max_headers`, or past `max_bytes` of names and values, are not
    examined (counted and logged at DEBUG)."""
    carrier: Carrier = {}
    budget = max_bytes
    headers = header_map.headers
    for index, header in enumerate(headers):
        raw = header.raw_value
        budget -= len(header.key) + (len(raw) if raw else len(header.value))
        if index >= max_headers or budget < 0:
            logger.debug("header map cut", ignored=len(headers) - index,
                         max_headers=max_headers, max_bytes=max_bytes)
            break
        value = raw.decode("utf-8", "replace") if raw else header.value
        key = header.key.lower()
        values = carrier.get(key)
        if values is None:
            carrier[key] = [value]
        else:
            values.append(value)
    return carrier


def first(carrier: Mapping[str, list[str]], name: str) -> str | None:
    values = carrier.get(name)
    return values[0] if values else None


class CarrierGetter(Getter[Mapping[str, list[str]]]):
    """OTel getter over a `Carrier`; `get` returns every value of a header."""

    def get(self, carrier: Mapping[str, list[str]], key: str) -> list[str] | None:
        return carrier.get(key.lower())

    def keys(self, carrier: Mapping[str, list[str]]) -> list[str]:
        return list(carrier)


class DictSetter(Setter[dict[str, str]]):
    """OTel setter into the dict of headers to set upstream (replace semantics)."""

    def set(self, carrier: dict[str, str], key: str, value: str) -> None:
        carrier[key.lower()] = value


CARRIER_GETTER: Final = CarrierGetter()
DICT_SETTER: Final = DictSetter()


def header_mutation(
    set_headers: Mapping[str, str], remove: Iterable[str] = (),
    append: frozenset[str] = frozenset(), into: pb.HeaderMutation | None = None,
) -> pb.HeaderMutation:
    """Set each header in ``raw_value``, replacing any value (or appending, for names in
    `append`), and remove the `remove` names; written `into` a mutation inside the
    answer when given (with upb, a message passed to a constructor is copied)."""
    mutation = pb.HeaderMutation() if into is None else into
    mutation.remove_headers.extend(remove)
    for key, value in set_headers.items():
        option = mutation.set_headers.add()
        option.header.key = key
        option.header.raw_value = value.encode("utf-8")
        option.append_action = _APPEND if key in append else _OVERWRITE
    return mutation

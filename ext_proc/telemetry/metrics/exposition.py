"""Prometheus text (0.0.4) and OpenMetrics (1.0.0) exposition of SDK `MetricsData`.

Names follow the OpenTelemetry-to-Prometheus compatibility rules: invalid
characters become ``_``, the unit is appended as a suffix (``s`` -> ``seconds``,
``By`` -> ``bytes``, ``{...}`` annotations dropped), monotonic sums get
``_total``. Only OpenMetrics carries exemplars (trace_id/span_id on histogram
buckets and counter totals); the format is chosen from the ``Accept`` header.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    Sum,
)

TEXT_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE: Final = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_INVALID: Final = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL: Final = re.compile(r"[^a-zA-Z0-9_]")
_REPEATED: Final = re.compile(r"__+")
_ANNOTATION: Final = re.compile(r"\{[^}]*\}")
_UNITS: Final = {
    "s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds",
    "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "min": "minutes", "h": "hours",
    "%": "percent",
}


def wants_openmetrics(accept: str | None) -> bool:
    """True when the client accepts OpenMetrics (Prometheus does when it scrapes)."""
    return bool(accept) and "application/openmetrics-text" in (accept or "")


def metric_name(name: str, unit: str, *, counter: bool) -> str:
    base = _REPEATED.sub("_", _INVALID.sub("_", name)).strip("_") or "_"
    if base[0].isdigit():
        base = "_" + base
    suffix = _UNITS.get(_ANNOTATION.sub("", unit or "").strip(), "")
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    if counter and base.endswith("_total"):
        base = base.removesuffix("_total")
    return base


def label_name(key: str) -> str:
    name = _REPEATED.sub("_", _INVALID_LABEL.sub("_", key)) or "_"
    return "key_" + name if name[0].isdigit() else name


def _escape(value: Any) -> str:
    text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) \
        else str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value) if isinstance(value, float) else str(int(value))


def _labels(attrs: Mapping[str, Any], extra: Sequence[tuple[str, str]] = ()) -> str:
    pairs = [f'{label_name(k)}="{_escape(v)}"' for k, v in attrs.items()]
    pairs.extend(f'{k}="{v}"' for k, v in extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _exemplar(ex: Exemplar | None) -> str:
    if ex is None or not ex.trace_id:
        return ""
    labels = f'trace_id="{ex.trace_id:032x}",span_id="{ex.span_id or 0:016x}"'
    return f" # {{{labels}}} {_number(ex.value)} {ex.time_unix_nano / 1e9:.3f}"


@dataclass
class _Family:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    unit: str
    lines: list[str] = field(default_factory=list)


def _bucket_exemplars(point: HistogramDataPoint) -> dict[int, Exemplar]:
    """The newest exemplar of each bucket (index into bucket_counts)."""
    out: dict[int, Exemplar] = {}
    for ex in point.exemplars or ():
        index = bisect_left(point.explicit_bounds, ex.value)
        seen = out.get(index)
        if seen is None or ex.time_unix_nano >= seen.time_unix_nano:
            out[index] = ex
    return out


def _histogram_lines(fam: _Family, point: HistogramDataPoint, om: bool) -> None:
    attrs = dict(point.attributes or {})
    exemplars = _bucket_exemplars(point) if om else {}
    cumulative = 0
    bounds = [*point.explicit_bounds, math.inf]
    for index, (bound, count) in enumerate(zip(bounds, point.bucket_counts, strict=False)):
        cumulative += count
        le = (("le", _number(float(bound))),)
        fam.lines.append(f"{fam.name}_bucket{_labels(attrs, le)} {cumulative}"
                         + _exemplar(exemplars.get(index)))
    fam.lines.append(f"{fam.name}_sum{_labels(attrs)} {_number(point.sum)}")
    fam.lines.append(f"{fam.name}_count{_labels(attrs)} {point.count}")


def _number_lines(fam: _Family, point: NumberDataPoint, om: bool) -> None:
    attrs = dict(point.attributes or {})
    if fam.kind == "counter":
        newest = max(point.exemplars or (), key=lambda e: e.time_unix_nano, default=None)
        fam.lines.append(f"{fam.name}_total{_labels(attrs)} {_number(point.value)}"
                         + (_exemplar(newest) if om else ""))
    else:
        fam.lines.append(f"{fam.name}{_labels(attrs)} {_number(point.value)}")


def _family_of(metric: Metric) -> _Family | None:
    data = metric.data
    if isinstance(data, Histogram):
        kind = "histogram"
    elif isinstance(data, Sum):
        kind = "counter" if data.is_monotonic else "gauge"
    elif isinstance(data, Gauge):
        kind = "gauge"
    else:
        return None  # exponential histograms are not exposed
    name = metric_name(metric.name, metric.unit or "", counter=kind == "counter")
    return _Family(name, kind, metric.description or "", _UNITS.get(metric.unit or "", ""))


def _families(data: MetricsData | None, om: bool) -> Iterable[_Family]:
    by_name: dict[str, _Family] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                fam = _family_of(metric)
                if fam is None:
                    continue
                fam = by_name.setdefault(fam.name, fam)
                for point in metric.data.data_points:
                    if isinstance(point, HistogramDataPoint):
                        _histogram_lines(fam, point, om)
                    elif isinstance(point, NumberDataPoint):
                        _number_lines(fam, point, om)
    return by_name.values()


def _target_info(data: MetricsData | None, om: bool) -> list[str]:
    if not data or not data.resource_metrics:
        return []
    attrs = dict(data.resource_metrics[0].resource.attributes)
    family = "target" if om else "target_info"  # an OpenMetrics info family adds _info
    return [f"# HELP {family} Target metadata", f"# TYPE {family} {'info' if om else 'gauge'}",
            f"target_info{_labels(attrs)} 1"]


def render(data: MetricsData | None, openmetrics: bool) -> bytes:
    """One scrape body in the chosen format."""
    lines = _target_info(data, openmetrics)
    for fam in _families(data, openmetrics):
        help_text = fam.help.replace("\\", "\\\\").replace("\n", "\\n")
        # text 0.0.4 names a counter family by its sample name (with _total)
        name = fam.name + "_total" if not openmetrics and fam.kind == "counter" else fam.name
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {fam.kind}")
        if openmetrics and fam.unit and fam.name.endswith("_" + fam.unit):
            lines.append(f"# UNIT {name} {fam.unit}")
        lines.extend(fam.lines)
    if openmetrics:
        lines.append("# EOF")
    return ("\n".join(lines) + "\n").encode()

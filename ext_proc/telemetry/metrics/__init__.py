"""Metrics: RED instruments, self-telemetry, the Prometheus exposition and their wiring.

Modules: `red` (instruments, created once), `spans` (span pipeline counters),
`pipeline` (meter provider and readers from OTEL_METRICS_*), `exposition`
(Prometheus text / OpenMetrics), `wiring` (what `app` builds and starts).
"""

"""extproc-otel: an Envoy ext_proc sidecar that traces every request with OpenTelemetry."""

__version__ = "0.1.0"

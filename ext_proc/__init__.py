"""extproc-otel: an Envoy ext_proc sidecar that traces every request with OpenTelemetry."""

# The one place the version is written: pyproject reads it (dynamic version), and it is
# the default `service.version` resource attribute and `extproc-otel --version`.
__version__ = "0.2.0"

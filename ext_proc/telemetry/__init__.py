"""What the sidecar records and sends, after Envoy has its answer.

- `provider`: the tracer provider and span export, from the standard OTEL_* variables;
- `lean_span`: gateway spans recorded into plain objects, handed to the SDK at end;
- `otlp_encode`, `otlp_export`: spans written as OTLP protobuf bytes;
- `logs`, `otlp_logs`, `access_lines`: loguru sinks, OTLP log records, one access line
  per exchange;
- `metrics/`: RED metrics, the span pipeline's own metrics, Prometheus exposition;
- `semconv`: attribute keys and span names; `throttle`: rate-limited debug logging.
"""

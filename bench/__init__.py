"""`make bench`: Envoy alone vs Envoy's native tracer vs Envoy + the sidecar, side by side."""

"""What a request is made of, shared by every wing below the composition root.

- `headers`: Envoy's header map as an OpenTelemetry carrier;
- `envoy_attrs`: Envoy's request and response attributes, decoded;
- `route_options`: the per-route options Envoy's filter config sends as metadata;
- `seams`: the finished-exchange record and the interfaces the exchange depends on
  (observers, propagators), so telemetry and policy plug in without knowing the stream.

It imports nothing from the other wings: the exchange, policy and telemetry all read
these types, none of them owns them.
"""

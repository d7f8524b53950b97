"""One request through one ext_proc stream, from Envoy's first message to the span's end.

- `servicer`: the ExternalProcessor service; one `session` per stream;
- `session`: `StreamSession`, which answers each message (`answers`) and starts the span;
- `request_info`: what the request headers and attributes say, as span attributes;
- `outcome`: how the exchange ended (status, flags, error type);
- `als`, `join`, `finalizer`: Envoy's gRPC access log, matched to its exchange, ends
  the span at the request's real end;
- `deps`: what every session shares, built once by the app.
"""

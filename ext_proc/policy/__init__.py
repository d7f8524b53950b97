"""What to do with a request, decided before the exchange records anything.

- `propagation/`: reading and writing trace context (W3C, B3, Jaeger, grpc-trace-bin);
- `sampling/`: head sampling, rules, budgets, keep-errors;
- `tenants`: who the request is for (header, JWT claim, route metadata);
- `redaction/`: what may be recorded of headers, URLs and free text;
- `request_policy`: `RequestPolicy`, the one object the exchange asks.

Reads `ext_proc.request` and `ext_proc.config`; never the exchange.
"""

#!/usr/bin/env bash
# Smoke test for the compose stack; run after `docker compose up --build -d`.
# Sends traffic through Envoy (with and without an incoming traceparent) and
# checks that the trace reached Jaeger and Tempo, the logs reached Loki and the
# RED metrics reached Prometheus. Exits non-zero on the first failure.
set -euo pipefail

GATEWAY=${GATEWAY:-http://localhost:10000}
JAEGER=${JAEGER:-http://localhost:16686}
TEMPO=${TEMPO:-http://localhost:3200}
LOKI=${LOKI:-http://localhost:3100}
PROMETHEUS=${PROMETHEUS:-http://localhost:9090}
TIMEOUT_S=${TIMEOUT_S:-90}

trace_id=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
parent_id=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
traceparent="00-${trace_id}-${parent_id}-01"

pass() { printf '  ok    %s\n' "$1"; }
fail() { printf '  FAIL  %s\n' "$1" >&2; exit 1; }

# eventually DESCRIPTION COMMAND...: retry COMMAND until it succeeds or TIMEOUT_S passes.
eventually() {
  local what=$1; shift
  local deadline=$((SECONDS + TIMEOUT_S))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || fail "$what (gave up after ${TIMEOUT_S}s)"
    sleep 2
  done
  pass "$what"
}

body_has() { curl -fsS "$1" | grep -q -- "$2"; }

echo "extproc-otel compose stack: trace id ${trace_id}"
eventually "Envoy answers on ${GATEWAY}" curl -fsS -o /dev/null "${GATEWAY}/api/users"

for i in 1 2 3 4 5; do
  curl -fsS -o /dev/null "${GATEWAY}/api/users" || fail "GET /api/users (${i})"
  curl -sS -o /dev/null "${GATEWAY}/status/500" || true
done
status=$(curl -sS -o /dev/null -w '%{http_code}' -H "traceparent: ${traceparent}" \
  "${GATEWAY}/api/users")
[[ "$status" == 200 ]] || fail "GET /api/users with traceparent answered ${status}"
pass "requests through Envoy"

eventually "trace ${trace_id} in Jaeger" body_has "${JAEGER}/api/traces/${trace_id}" '"serviceName":"extproc-otel"'
eventually "trace ${trace_id} in Tempo" body_has "${TEMPO}/api/traces/${trace_id}" 'extproc-otel'
eventually "sidecar logs in Loki carry the trace id" body_has \
  "${LOKI}/loki/api/v1/query_range?query=%7Bservice_name%3D%22extproc-otel%22%7D%20%7C%20trace_id%3D%22${trace_id}%22&since=15m" \
  "${trace_id}"
eventually "RED metrics in Prometheus" body_has \
  "${PROMETHEUS}/api/v1/query?query=sum(http_server_request_duration_seconds_count)" '"result":\[{'
eventually "exemplars in Prometheus" body_has \
  "${PROMETHEUS}/api/v1/query_exemplars?query=http_server_request_duration_seconds_bucket&start=$(( $(date +%s) - 900 ))&end=$(date +%s)" \
  'trace_id'

echo "all checks passed: open Grafana at http://localhost:3000 (dashboard 'extproc-otel gateway')"

#!/usr/bin/env bash
# Smoke test for the compose stack; run after `docker compose up --build -d`.
#
# Sends traffic through Envoy (HTTP and gRPC, three tenants, some 5xx, one request
# continuing a known trace id) and checks every backend the way Grafana uses it:
#   - Grafana: each provisioned data source passes its health check; the dashboard exists
#   - Jaeger and Tempo have the trace
#   - Loki has the logs of that trace from the sidecar, `users`, `grpc-demo` (whose
#     trace id we cannot choose: any of its logs) and Envoy's access log, and the
#     query behind Jaeger's "Logs for this span" link finds them
#   - Prometheus has the RED metrics with tenant_id, exemplars, the sidecar's own
#     metrics with a plausible export p95, and Tempo's service graph (remote write)
# Exits non-zero on the first failure. Needs bash, curl, od and sed only.
# tests/unit/deploy/test_deploy_compose.py runs it against canned answers.
set -euo pipefail

GATEWAY=${GATEWAY:-http://localhost:10000}
GRAFANA=${GRAFANA:-http://localhost:3000}
JAEGER=${JAEGER:-http://localhost:16686}
TEMPO=${TEMPO:-http://localhost:3200}
LOKI=${LOKI:-http://localhost:3100}
PROMETHEUS=${PROMETHEUS:-http://localhost:9090}
TIMEOUT_S=${TIMEOUT_S:-120}
TENANT_HEADER=${TENANT_HEADER:-x-tenant-id}  # EXTPROC_TENANTS__HEADER in docker-compose.yaml
TENANTS=(acme globex initech)                 # EXTPROC_TENANTS__ALLOWED
DASHBOARD_UID=extproc-otel
DATASOURCES=(prometheus tempo jaeger loki)
GRPC_CALL=${GRPC_CALL:-1}  # 0: no gRPC request (a client without HTTP/2)

trace_id=${TRACE_ID:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}
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

# body_has URL REGEX [curl args...]: the answer of a GET to URL matches REGEX (grep).
body_has() {
  local url=$1 needle=$2; shift 2
  curl -fsS -G "$@" "$url" | grep -q -- "$needle"
}
# promql_has_result PROMQL: the instant query returns at least one series.
promql_has_result() {
  body_has "${PROMETHEUS}/api/v1/query" '"result":\[{' --data-urlencode "query=$1"
}
# logql_has_result LOGQL: the query over the last 15 minutes returns at least one stream.
logql_has_result() {
  body_has "${LOKI}/loki/api/v1/query_range" '"result":\[{' --data-urlencode "query=$1" \
    --data-urlencode "since=15m" --data-urlencode "limit=10"
}

# The LogQL of Jaeger's "Logs for this span" link, rendered as Grafana renders it:
# tracesToLogsV2.query from the provisioned data source, ${__trace.traceId} -> the
# trace id, ${__tags} -> service_name="..." only when Jaeger returns service.name
# among the process tags (Jaeger v2 does not).
jaeger_logs_query() {
  local query tags=""
  query=$(curl -fsS "${GRAFANA}/api/datasources/uid/jaeger" \
    | grep -oE '"query":"([^"\\]|\\.)*"' | head -n1 \
    | sed -e 's/^"query":"//' -e 's/"$//' -e 's/\\"/"/g' -e 's/\\\\/\\/g')
  [[ -n "$query" ]] || return 1
  if curl -fsS "${JAEGER}/api/traces/${trace_id}" | grep -q '"key":"service.name"'; then
    tags='service_name="extproc-otel"'
  fi
  query=${query//'${__trace.traceId}'/$trace_id}
  printf '%s' "${query//'${__tags}'/$tags}"
}
jaeger_link_finds_logs() {
  local query
  query=$(jaeger_logs_query) || return 1
  logql_has_result "$query"
}

echo "extproc-otel compose stack: trace id ${trace_id}"
eventually "Envoy answers on ${GATEWAY}" curl -fsS -o /dev/null "${GATEWAY}/api/users"

for tenant in "${TENANTS[@]}"; do
  for _ in 1 2 3; do
    curl -fsS -o /dev/null -H "${TENANT_HEADER}: ${tenant}" "${GATEWAY}/api/users" \
      || fail "GET /api/users as ${tenant}"
  done
  curl -sS -o /dev/null -H "${TENANT_HEADER}: ${tenant}" "${GATEWAY}/status/500" || true
done
status=$(curl -sS -o /dev/null -w '%{http_code}' -H "traceparent: ${traceparent}" \
  -H "${TENANT_HEADER}: ${TENANTS[0]}" "${GATEWAY}/api/users")
[[ "$status" == 200 ]] || fail "GET /api/users with traceparent answered ${status}"
# One gRPC call (demo.v1.Users/GetUser, id 1) over h2c, so grpc-demo logs something.
if [[ "$GRPC_CALL" == 1 ]]; then
  grpc_status=$(printf '\x00\x00\x00\x00\x02\x08\x01' | curl -sS --http2-prior-knowledge \
    -o /dev/null -w '%{http_code}' -H 'content-type: application/grpc' -H 'te: trailers' \
    -H "${TENANT_HEADER}: ${TENANTS[1]}" --data-binary @- "${GATEWAY}/demo.v1.Users/GetUser") \
    || fail "gRPC GetUser through Envoy"
  [[ "$grpc_status" == 200 ]] || fail "gRPC GetUser through Envoy answered HTTP ${grpc_status}"
fi
pass "requests through Envoy (tenants ${TENANTS[*]}$([[ "$GRPC_CALL" == 1 ]] && echo ', and gRPC'))"

for uid in "${DATASOURCES[@]}"; do
  eventually "Grafana data source ${uid} is healthy" \
    body_has "${GRAFANA}/api/datasources/uid/${uid}/health" '"status":"OK"'
done
eventually "Grafana has the dashboard ${DASHBOARD_UID}" \
  body_has "${GRAFANA}/api/dashboards/uid/${DASHBOARD_UID}" "\"uid\":\"${DASHBOARD_UID}\""

eventually "trace ${trace_id} in Jaeger" body_has "${JAEGER}/api/traces/${trace_id}" '"serviceName":"extproc-otel"'
eventually "trace ${trace_id} in Tempo" body_has "${TEMPO}/api/traces/${trace_id}" 'extproc-otel'

for service in extproc-otel users envoy; do
  eventually "${service} logs of trace ${trace_id} in Loki" \
    logql_has_result "{service_name=\"${service}\"} | trace_id=\"${trace_id}\""
done
if [[ "$GRPC_CALL" == 1 ]]; then
  eventually "grpc-demo logs with a trace id in Loki" \
    logql_has_result '{service_name="grpc-demo"} | trace_id=~"[0-9a-f]{32}"'
fi
eventually "Jaeger's \"Logs for this span\" query finds the trace's logs" jaeger_link_finds_logs

eventually "RED metrics in Prometheus" \
  promql_has_result 'sum(http_server_request_duration_seconds_count)'
eventually "RED metrics by tenant (tenant_id=\"${TENANTS[0]}\")" \
  promql_has_result "sum(http_server_request_duration_seconds_count{tenant_id=\"${TENANTS[0]}\"})"
eventually "exemplars in Prometheus" body_has "${PROMETHEUS}/api/v1/query_exemplars" 'trace_id' \
  --data-urlencode 'query=http_server_request_duration_seconds_bucket' \
  --data-urlencode "start=$(( $(date +%s) - 900 ))" --data-urlencode "end=$(date +%s)"
eventually "sidecar self-telemetry in Prometheus" \
  promql_has_result 'sum(otel_sdk_exporter_span_exported_total{error_type=""}) > 0'
eventually "span export p95 under 1 s (histogram bounds in seconds)" \
  promql_has_result 'histogram_quantile(0.95, sum by (le) (rate(otel_sdk_exporter_operation_duration_seconds_bucket[5m]))) < 1'
eventually "Tempo's service graph in Prometheus (remote write)" \
  promql_has_result 'sum(traces_service_graph_request_total)'
eventually "Tempo's span metrics in Prometheus (remote write)" \
  promql_has_result 'sum(traces_spanmetrics_calls_total{service="users"})'

echo "all checks passed: open Grafana at ${GRAFANA} (dashboard 'extproc-otel gateway')"

#!/usr/bin/env bash
# Fuzzes the HTTP API from its own OpenAPI document with schemathesis: starts the server on
# the tiny synthetic model (CPU), generates requests from /openapi.json, and fails on any
# 5xx (not_a_server_error) or any schema-valid request the server refuses
# (positive_data_acceptance). Run by .ci/run after the tests; needs `schemathesis` on PATH.
# The coverage phase is left out: schemathesis 4.32 crashed inside Hypothesis there (an AST
# recursion error under Python 3.11) on this document, which failed the run without a request.
#
#   scripts/api-fuzz.sh path/to/zopilot-gpu [max-examples per operation, default 40]
set -euo pipefail
bin=${1:?usage: api-fuzz.sh BINARY [MAX_EXAMPLES]}
examples=${2:-40}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
"$bin" serve --model synthetic:tiny --cpu --port "$port" --max-model-len 256 \
  --max-num-seqs 8 > "$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 300); do
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ping")" = 200 ]; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then cat "$log" >&2; echo "the server exited" >&2; exit 1; fi
  sleep 0.5
done
schemathesis run "http://127.0.0.1:$port/openapi.json" \
  --checks not_a_server_error,positive_data_acceptance \
  --phases examples,fuzzing \
  --max-examples "$examples" \
  --workers 4 \
  --request-timeout 120 \
  --suppress-health-check all \
  --generation-deterministic \
  --max-failures 20

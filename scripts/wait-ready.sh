#!/usr/bin/env bash
# Waits for a local `serve` to be ready, for the GPU scripts that start servers
# (gpu-prefill-chunks.sh, gpu-prefill-knobs.sh). Source it, then:
#   wait_ready PORT [SECONDS]   (default 120)
# polls http://127.0.0.1:PORT/ping once a second (204 while loading, 200 once ready);
# returns 1 if it never answered 200.
wait_ready() {
  local port=$1 tries=${2:-120}
  for _ in $(seq 1 "$tries"); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ping")" = 200 ] && return 0
    sleep 1
  done
  return 1
}

#!/usr/bin/env bash
# The blog-post loop: the health-check loop from the blog posts (a baseline for bench/run).
#
#   blog.sh KEY VALUE URL
#
# Environment: ETCDCTL_ENDPOINTS, INTERVAL (0.2), TTL (3), PROBE_TIMEOUT (0.1).
# Every cycle after a successful probe: a new lease and a put on it. Nothing
# on failure or on SIGTERM: the key expires with its last lease.
export ETCDCTL_API=3
KEY=$1 VALUE=$2 URL=$3

while true; do
  if curl -fs -m "${PROBE_TIMEOUT:-0.1}" "$URL" >/dev/null; then
    LEASE=$(etcdctl lease grant "${TTL:-3}" | awk '{print $2}')
    etcdctl put --lease="$LEASE" "$KEY" "$VALUE" >/dev/null
  fi
  sleep "${INTERVAL:-0.2}"
done

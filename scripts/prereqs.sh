# Sourced by scripts/demo and scripts/test: makes sure the build and test
# prerequisites are on the machine, installing them with apt when root.
#   protoc     etcd-client's build needs it (package protobuf-compiler)
#   etcd       the real etcd server the tests and the demo start (etcd-server)
#   etcdctl    the demo shows the keys with it (etcd-client)
#   haproxy    the end-to-end test puts a real load balancer in front (haproxy)
#   systemd-analyze   the tests verify the unit templates (systemd)
#   ip         the discovery test builds network namespaces (iproute2)

ensure_prereqs() {
  local missing=()
  command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
  command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
  command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
  if [ "${PREREQS_FOR:-test}" = test ]; then
    command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  fi
  command -v cargo >/dev/null 2>&1 || {
    echo "cargo is not installed: install the Rust toolchain first (https://rustup.rs)" >&2
    return 1
  }
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
    return 1
  fi
  echo "installing ${missing[*]} ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's etcd-server package may start a system etcd on 127.0.0.1:2379;
  # the tests and the demo bring their own on free ports and do not need it.
}

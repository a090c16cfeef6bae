"""The system under test: network namespaces, a 3-member etcd cluster, the
instances and their sidekicks, an agent, render and HAProxy, all real
processes. Every process is started by the campaign's main thread with
PR_SET_PDEATHSIG, so none outlives the campaign, and stopped by its PID.

Layout: the campaign itself and everything but etcd run in the namespace
APP, on its loopback; each etcd member runs in a namespace of its own,
joined to APP's bridge by a veth pair, so a member can be cut off (its
link down), frozen or killed alone.
"""

import base64
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time

NET = "198.18.5."
APP_ADDR = NET + "100"
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setpgrp()


def sh(*argv, check=True):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and r.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(argv), r.stdout.strip()))
    return r.stdout


# --- namespaces (made by the outer process, in the root namespace) --------

def ns_names(tag):
    return tag + "a", [tag + "m%d" % i for i in (1, 2, 3)]


def make_namespaces(tag):
    app, members = ns_names(tag)
    sh("ip", "netns", "add", app)
    sh("ip", "-n", app, "link", "set", "lo", "up")
    sh("ip", "-n", app, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", app, "addr", "add", APP_ADDR + "/24", "dev", "br0")
    sh("ip", "-n", app, "link", "set", "br0", "up")
    for i, m in enumerate(members, 1):
        sh("ip", "netns", "add", m)
        sh("ip", "-n", m, "link", "set", "lo", "up")
        sh("ip", "-n", app, "link", "add", "p%d" % i, "type", "veth", "peer", "name", "e%d" % i, "netns", m)
        sh("ip", "-n", app, "link", "set", "p%d" % i, "master", "br0")
        sh("ip", "-n", app, "link", "set", "p%d" % i, "up")
        sh("ip", "-n", m, "addr", "add", NET + "%d/24" % i, "dev", "e%d" % i)
        sh("ip", "-n", m, "link", "set", "e%d" % i, "up")


def remove_namespaces(tag):
    """Kills what still runs in our namespaces (only our processes can be
    there) and deletes them."""
    app, members = ns_names(tag)
    for ns in members + [app]:
        pids = subprocess.run(["ip", "netns", "pids", ns], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True).stdout.split()
        for p in pids:
            if int(p) != os.getpid():
                try:
                    os.kill(int(p), signal.SIGKILL)
                except OSError:
                    pass
    for ns in members + [app]:
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def stale_namespaces():
    """Namespaces a campaign killed before its clean-up left behind."""
    out = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, text=True).stdout
    tags = set()
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith("skc") and name[-1] == "a" and name[3:-1].isdigit():
            pid = int(name[3:-1])
            if not os.path.exists("/proc/%d" % pid):
                tags.add(name[:-1])
    return sorted(tags)


# --- processes -------------------------------------------------------------

class Proc:
    """One long-running process of the system under test."""

    def __init__(self, name, argv, log_path, env=None, cwd=None):
        self.name, self.argv, self.log_path, self.env, self.cwd = name, argv, log_path, env, cwd
        self.popen = None
        self.want = "dead"       # what the campaign last asked: running, stopped, dead
        self.reported = False    # its exit was recorded

    @property
    def pid(self):
        return self.popen.pid if self.popen else None

    def start(self):
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      env=self.env, cwd=self.cwd, preexec_fn=_die_with_parent)
        log.close()
        self.want = "running"
        self.reported = False

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig):
        if self.alive():
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self):
        self.want = "dead"
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        if self.popen:
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def term(self, wait=None):
        """SIGTERM; with `wait`, waits that long for the exit."""
        self.want = "dead"
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        if wait and self.popen:
            try:
                self.popen.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass

    def stop(self):
        self.want = "stopped"
        self.signal(signal.SIGSTOP)

    def cont(self):
        self.want = "running"
        self.signal(signal.SIGCONT)


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SIDEKICK_", "ETCDCTL_", "NOTIFY_SOCKET", "RUST_LOG"))}
    env["SIDEKICK_ENV_FILE"] = "/nonexistent/etcd.environment"
    env["RUST_LOG"] = "info"
    env.update(extra or {})
    return env


# --- etcd over its JSON gateway ------------------------------------------

def b64(s):
    return base64.b64encode(s.encode()).decode()


def unb64(s):
    return base64.b64decode(s or "").decode(errors="replace")


def etcd_call(host, path, body, timeout=1.0):
    c = http.client.HTTPConnection(host, 2379, timeout=timeout)
    try:
        c.request("POST", path, json.dumps(body))
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError("etcd %s %s: %s %s" % (host, path, r.status, data[:200]))
        return json.loads(data)
    finally:
        c.close()


def etcd_health(host, timeout=0.4):
    c = http.client.HTTPConnection(host, 2379, timeout=timeout)
    try:
        c.request("GET", "/health")
        return json.loads(c.getresponse().read()).get("health") == "true"
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        c.close()


class Cluster:
    """Three etcd members, one per namespace."""

    def __init__(self, run_dir, member_ns):
        self.run_dir = run_dir
        self.ns = member_ns
        self.names = ["m1", "m2", "m3"]
        self.hosts = {n: NET + str(i) for i, n in enumerate(self.names, 1)}
        self.generation = 1
        self.procs = {}
        self.linked = {n: True for n in self.names}

    @property
    def endpoints(self):
        return ",".join("http://%s:2379" % self.hosts[n] for n in self.names)

    def _proc(self, name):
        i = self.names.index(name)
        host = self.hosts[name]
        cluster = ",".join("%s=http://%s:2380" % (n, self.hosts[n]) for n in self.names)
        argv = ["ip", "netns", "exec", self.ns[i], "etcd", "--name", name,
                "--data-dir", os.path.join(self.run_dir, "etcd", name),
                "--listen-client-urls", "http://%s:2379" % host,
                "--advertise-client-urls", "http://%s:2379" % host,
                "--listen-peer-urls", "http://%s:2380" % host,
                "--initial-advertise-peer-urls", "http://%s:2380" % host,
                "--initial-cluster", cluster,
                "--initial-cluster-token", "campaign-%d" % self.generation,
                "--initial-cluster-state", "new",
                "--logger", "zap", "--log-outputs", "stderr"]
        return Proc("etcd-" + name, argv, os.path.join(self.run_dir, "logs", "etcd-%s.log" % name))

    def start(self, name):
        p = self._proc(name)
        p.start()
        self.procs[name] = p
        return p

    def start_all(self):
        for n in self.names:
            self.start(n)

    def wait_healthy(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(etcd_health(self.hosts[n]) for n in self.names):
                return True
            time.sleep(0.2)
        return False

    def wipe(self):
        for p in self.procs.values():
            p.kill()
        shutil.rmtree(os.path.join(self.run_dir, "etcd"), ignore_errors=True)
        self.generation += 1

    def link(self, name, up):
        i = self.names.index(name)
        sh("ip", "-n", self.ns[i], "link", "set", "e%d" % (i + 1), "up" if up else "down")
        self.linked[name] = up

    def leader(self):
        """The member that leads, asked of every member that answers."""
        ids = {}
        leader = None
        for n in self.names:
            try:
                st = etcd_call(self.hosts[n], "/v3/maintenance/status", {}, timeout=0.5)
            except (OSError, RuntimeError, ValueError, http.client.HTTPException):
                continue
            ids[st["header"]["member_id"]] = n
            leader = leader or st.get("leader")
        return ids.get(leader)


def free_port_file_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def master_cli(sock_path, cmd, timeout=1.0):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(cmd.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            out += c
        return out.decode(errors="replace")
    finally:
        s.close()

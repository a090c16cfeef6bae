"""Runs a campaign inside the namespace APP: sets the system up, records
its history while the schedule's faults are injected, and takes it down.

Threads: the etcd recorder (a watch over every key, every revision), the
member health monitor, the request client, the sampler (HAProxy's live
server set, the rendered file, render's /status, RSS and file descriptors,
unexpected exits) and the foreign writer. The main thread starts and
signals every process and injects the faults.
"""

import http.client
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import threading
import time

import schedule as sched
import world
from world import Proc, b64, unb64, etcd_call

HERE = os.path.dirname(os.path.abspath(__file__))

# The flags every instance runs with: fast, so that a minute sees many
# faults, yet within what a loaded 2-core machine keeps: with a 100 ms
# timeout (and --fall 1 or 2) the probes of healthy Python instances timed
# out together whenever the machine stalled for a few hundred ms (an
# HAProxy reload storm beside a compiler), withdrawing them all at once.
TIMING = ["--interval", "500ms", "--timeout", "250ms", "--ttl", "3s", "--fall", "2", "--rise", "1"]
ETCD_FLAGS = ["--dial-timeout", "1s"]
DRAIN = ["--drain", "500ms"]
SETTLE = "5s"
FRONTEND = ("127.0.0.1", 8080)
RUN_INSTANCES = ["web-1", "web-2", "web-3", "web-4"]
AGENT_WEB = ["web-5", "web-6"]
WEB_SHARED = {"/services/web/scheme": "http", "/services/web/host_port": "8080"}
API_KEY, API_VALUE = "/services/api/hosts/1", "127.0.0.1:9100"
API_SHARED = {"/services/api/scheme": "http"}
# Keys of a writer that is not us, next to ours (under an instance's key,
# sharing a prefix with an instance's or a shared key); nothing of ours may
# delete or rewrite them. The writer rewrites /foreign/counter now and then.
FOREIGN = {
    "/services/web/hosts/1/notes": "moved to rack 3 in March",
    "/services/web/hosts-old/2": "127.0.0.1:9902",
    "/services/web/schemes": "http,https",
    "/services/api/hosts/1x": "127.0.0.1:9101",
    "/foreign/counter": "0",
}


def port_of(name):
    return 9000 + int(name.split("-")[1])


def key_of(name):
    return "/services/web/hosts/" + name.split("-")[1]


class Campaign:
    def __init__(self, args, run_dir, member_ns, hist):
        self.args = args
        self.dir = run_dir
        self.h = hist
        self.stop_ev = threading.Event()
        self.cluster = world.Cluster(run_dir, member_ns)
        self.sidekick = args.sidekick
        self.procs = {}
        self.leader_of = {}
        self.req_n = 0
        for d in ("logs", "etcd", "state", "agent", "agent-off", "render", "haproxy"):
            os.makedirs(os.path.join(run_dir, d), exist_ok=True)

    # --- set-up ------------------------------------------------------------

    def explain(self, probe):
        argv = [self.sidekick, "explain", "--json"] + (probe + TIMING if probe else ["--ttl", "3s"]) \
            + ETCD_FLAGS + (DRAIN if probe else [])
        return json.loads(subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True,
                                         env=world.clean_env()).stdout)

    def meta(self, faults):
        probe = ["--http", "http://127.0.0.1:9001/"]
        instances = {}
        for n in RUN_INSTANCES + AGENT_WEB:
            instances[n] = {"key": key_of(n), "value": "127.0.0.1:%d" % port_of(n),
                            "by": "run" if n in RUN_INSTANCES else "agent",
                            "shared": WEB_SHARED, "probe": True}
        instances["api"] = {"key": API_KEY, "value": API_VALUE, "by": "agent", "shared": API_SHARED,
                            "probe": False}
        self.h.add("meta", t=0, wall=time.time(), seed=self.args.seed, duration=self.args.duration,
                   flags={"timing": TIMING, "etcd": ETCD_FLAGS, "drain": DRAIN, "settle": SETTLE,
                          "reload": "kill -USR2" if self.args.raw_reload else "haproxy-reload"},
                   explain={"probe": self.explain(probe), "no_probe": self.explain(None)},
                   settle_s=float(SETTLE.rstrip("s")), instances=instances, foreign=FOREIGN,
                   members=self.cluster.names,
                   member_endpoints={n: "http://%s:2379" % self.cluster.hosts[n] for n in self.cluster.names},
                   faults=faults, kinds=self.args.kinds)

    def backend(self, name):
        state = os.path.join(self.dir, "state", name)
        with open(state, "w") as f:
            f.write("up")
        return Proc(name, ["python3", os.path.join(HERE, "backend.py"), name, str(port_of(name)), state],
                    os.path.join(self.dir, "logs", "backend-%s.log" % name))

    def sidekick_proc(self, name, i):
        argv = [self.sidekick, "run", key_of(name), "127.0.0.1:%d" % port_of(name),
                "--http", "http://127.0.0.1:%d/" % port_of(name)]
        for k, v in WEB_SHARED.items():
            argv += ["--shared", "%s=%s" % (k, v)]
        argv += TIMING + ETCD_FLAGS + DRAIN + ["--endpoints", self.cluster.endpoints,
                                              "--status-addr", "127.0.0.1:%d" % (7100 + i)]
        return Proc("sk-" + name, argv, os.path.join(self.dir, "logs", "sidekick-%s.log" % name),
                    env=world.clean_env())

    def agent_files(self):
        t = dict(zip(TIMING[::2], TIMING[1::2]))
        for n in AGENT_WEB:
            shared = "".join('"%s" = "%s"\n' % kv for kv in WEB_SHARED.items())
            text = ('[services.%s]\nkey = "%s"\nvalue = "127.0.0.1:%d"\nhttp = "http://127.0.0.1:%d/"\n'
                    'interval = "%s"\ntimeout = "%s"\nrise = %s\nfall = %s\n[services.%s.shared]\n%s'
                    % (n, key_of(n), port_of(n), port_of(n), t["--interval"], t["--timeout"],
                       t["--rise"], t["--fall"], n, shared))
            world.free_port_file_text(os.path.join(self.dir, "agent", n + ".toml"), text)
        shared = "".join('"%s" = "%s"\n' % kv for kv in API_SHARED.items())
        world.free_port_file_text(os.path.join(self.dir, "agent", "api.toml"),
                                  '[services.api]\nkey = "%s"\nvalue = "%s"\n[services.api.shared]\n%s'
                                  % (API_KEY, API_VALUE, shared))

    def setup(self):
        c = self.cluster
        c.start_all()
        if not c.wait_healthy(40):
            raise RuntimeError("the etcd cluster did not become healthy within 40 s")
        self.h.add("cluster", state="up", generation=c.generation)
        for m in c.names:
            self.procs["etcd-" + m] = c.procs[m]
        self.threads = [threading.Thread(target=f, daemon=True, name=f.__name__)
                        for f in (self.recorder, self.health_monitor, self.foreign_writer)]
        for t in self.threads:
            t.start()
        time.sleep(0.5)
        for n in RUN_INSTANCES + AGENT_WEB:
            p = self.backend(n)
            p.start()
            self.procs[n] = p
            self.h.add("action", on="backend", target=n, do="start", fault=0)
        for n in RUN_INSTANCES + AGENT_WEB:
            self.wait_listening(n)
            self.h.add("action", on="backend", target=n, do="ready", fault=0)
        for i, n in enumerate(RUN_INSTANCES, 1):
            p = self.sidekick_proc(n, i)
            p.start()
            self.procs["sk-" + n] = p
            self.h.add("action", on="sidekick", target=n, do="start", fault=0)
        self.agent_files()
        agent = Proc("agent", [self.sidekick, "agent", "--config", os.path.join(self.dir, "agent"), "--ttl", "3s"]
                     + ETCD_FLAGS + ["--endpoints", c.endpoints, "--status-addr", "127.0.0.1:7200"],
                     os.path.join(self.dir, "logs", "agent.log"), env=world.clean_env())
        agent.start()
        self.procs["agent"] = agent
        for n in AGENT_WEB + ["api"]:
            self.h.add("action", on="agent", target=n, do="add", fault=0)
        self.setup_proxy()
        # Requests start once every instance is in the proxy (or after 30 s).
        want = sorted("web-" + n.split("-")[1] for n in RUN_INSTANCES + AGENT_WEB)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                out = world.master_cli(self.master_sock, "@1 show servers state web", timeout=0.5)
                if sorted(l.split()[3] for l in out.splitlines() if l and l[0].isdigit() and len(l.split()) > 4) == want:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        self.h.add("phase", name="ready")
        self.threads += [threading.Thread(target=f, daemon=True, name=f.__name__)
                         for f in (self.sampler, self.client)]
        for t in self.threads[3:]:
            t.start()

    def setup_proxy(self):
        rdir, hdir = os.path.join(self.dir, "render"), os.path.join(self.dir, "haproxy")
        shutil.copy(os.path.join(HERE, "haproxy.cfg.j2"), os.path.join(rdir, "haproxy.cfg.j2"))
        self.dest = os.path.join(hdir, "haproxy.cfg")
        self.master_sock = os.path.join(hdir, "master.sock")
        etcd = ["--endpoints", self.cluster.endpoints] + ETCD_FLAGS
        # The first configuration, before HAProxy runs: what render would write.
        out = subprocess.run([self.sidekick, "render", os.path.join(rdir, "haproxy.cfg.j2"), self.dest,
                              "--prefix", "/services/web/", "--dry-run"] + etcd,
                             stdout=subprocess.PIPE, env=world.clean_env(), check=True, text=True).stdout
        with open(self.dest, "w") as f:
            f.write(out)
        hap = Proc("haproxy", ["haproxy", "-W", "-S", self.master_sock, "-f", self.dest],
                   os.path.join(self.dir, "logs", "haproxy.log"))
        hap.start()
        self.procs["haproxy"] = hap
        time.sleep(0.5)
        with open(os.path.join(rdir, "render.toml"), "w") as f:
            f.write('[templates.haproxy]\nsrc = "%s"\ndest = "%s"\nprefixes = ["/services/web/"]\n'
                    'check_cmd = "haproxy -c -q -f {{src}}"\nreload_cmd = "%s"\n'
                    % (os.path.join(rdir, "haproxy.cfg.j2"), self.dest, self.reload_cmd(hap.pid)))
        self.render_proc = Proc("render", [self.sidekick, "render", "--config", os.path.join(rdir, "render.toml"),
                                           "--settle", SETTLE, "--status-addr", "127.0.0.1:7300"] + etcd,
                                os.path.join(self.dir, "logs", "render.log"), env=world.clean_env())
        self.render_proc.start()
        self.procs["render"] = self.render_proc
        self.h.add("action", on="render", target="render", do="start", fault=0)

    def reload_cmd(self, pid):
        """`kill -USR2 PID` with --raw-reload; by default the same signal
        through haproxy-reload, which waits for the reload to happen (a
        SIGUSR2 that lands while HAProxy still reloads is lost)."""
        if self.args.raw_reload:
            return "kill -USR2 %d" % pid
        return "%s %s %d" % (os.path.join(HERE, "haproxy-reload"), self.master_sock, pid)

    # --- faults --------------------------------------------------------------

    def do(self, a):
        # The time an action is recorded at is taken before it is done: a
        # request that meets its effect never seems to precede it.
        t_act = self.h.now()
        on, target, what = a["on"], a["target"], a["do"]
        c = self.cluster
        extra = {}
        if on == "backend":
            p = self.procs[target]
            if what in ("up", "down", "slow"):
                world.free_port_file_text(os.path.join(self.dir, "state", target), what)
            elif what == "kill":
                p.kill()
            elif what == "start":
                world.free_port_file_text(os.path.join(self.dir, "state", target), "up")
                p.start()
                self.h.add("action", t=t_act, on=on, target=target, do=what, fault=a["fault"], kind=a["kind"])
                self.wait_listening(target)
                what = "ready"
                t_act = self.h.now()
        elif on == "sidekick":
            p = self.procs["sk-" + target]
            {"kill": p.kill, "start": p.start, "stop": p.stop, "cont": p.cont, "term": p.term}[what]()
            extra["pid"] = p.pid
        elif on == "agent":
            src, dst = os.path.join(self.dir, "agent", target + ".toml"), os.path.join(self.dir, "agent-off", target + ".toml")
            if what == "remove":
                os.replace(src, dst)
            else:
                os.replace(dst, src)
            self.procs["agent"].signal(signal.SIGHUP)
        elif on == "member":
            if target == "leader":
                if what == "kill":
                    target = c.leader() or "m1"
                    self.leader_of[a["fault"]] = target
                else:
                    target = self.leader_of.get(a["fault"], "m1")
            p = c.procs[target]
            if what == "kill":
                p.kill()
            elif what == "start":
                self.procs["etcd-" + target] = c.start(target)
            elif what == "stop":
                p.stop()
            elif what == "cont":
                p.cont()
            elif what == "link_down":
                c.link(target, False)
            elif what == "link_up":
                c.link(target, True)
        elif on == "cluster":
            if what == "wipe":
                c.wipe()
            else:
                c.start_all()
                for m in c.names:
                    self.procs["etcd-" + m] = c.procs[m]
            extra["generation"] = c.generation
        elif on == "render":
            {"kill": self.render_proc.kill, "start": self.render_proc.start}[what]()
        elif on == "haproxy":
            self.procs["haproxy"].signal(signal.SIGUSR2)
        self.h.add("action", t=t_act, on=on, target=target, do=what, fault=a["fault"], kind=a["kind"], **extra)

    def wait_listening(self, name, timeout=5.0):
        """Until the instance accepts connections: it is healthy from then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port_of(name)), timeout=0.2).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def execute(self, faults):
        t_start = self.h.now()
        self.h.add("phase", name="faults")
        for a in sched.actions(faults):
            while not self.stop_ev.is_set():
                wait = t_start + a["t"] - self.h.now()
                if wait <= 0:
                    break
                time.sleep(min(wait, 0.2))
            if self.stop_ev.is_set():
                return
            self.do(a)
        end = t_start + self.args.duration
        while self.h.now() < end and not self.stop_ev.is_set():
            time.sleep(0.2)

    # --- recording threads -------------------------------------------------

    def recorder(self):
        """Every revision, through a watch from the revision after the last
        one seen; a new cluster (wiped) starts a new epoch with a snapshot."""
        c = self.cluster
        cluster_id, last, epoch = None, 0, 0
        hosts = [c.hosts[n] for n in c.names]
        i = 0
        while not self.stop_ev.is_set():
            host = hosts[i % len(hosts)]
            i += 1
            try:
                r = etcd_call(host, "/v3/kv/range", {"key": b64("\0"), "range_end": b64("\0")}, timeout=1.0)
                cid, rev = r["header"]["cluster_id"], int(r["header"]["revision"])
                if cid != cluster_id:
                    if cluster_id is not None:
                        epoch += 1
                    kvs = {unb64(kv["key"]): unb64(kv.get("value")) for kv in r.get("kvs", [])}
                    self.h.add("snapshot", rev=rev, epoch=epoch, cluster=cid, kvs=kvs)
                    cluster_id, last = cid, rev
                last = self._watch(host, cid, last, epoch)
            except (OSError, RuntimeError, ValueError, KeyError, http.client.HTTPException):
                pass
            if not self.stop_ev.is_set():
                time.sleep(0.1)

    def _watch(self, host, cid, last, epoch):
        s = socket.create_connection((host, 2379), timeout=1.0)
        try:
            body = json.dumps({"create_request": {"key": b64("\0"), "range_end": b64("\0"),
                                                  "start_revision": last + 1, "prev_kv": True}})
            s.sendall(("POST /v3/watch HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                       "Content-Length: %d\r\n\r\n%s" % (host, len(body), body)).encode())
            buf = b""
            head_done = False
            name = [n for n, h in self.cluster.hosts.items() if h == host][0]
            while not self.stop_ev.is_set():
                ready, _, _ = select.select([s], [], [], 0.3)
                if not ready:
                    if not self.healthy.get(name, True):
                        return last  # the member we watch lost its cluster: move on
                    continue
                data = s.recv(65536)
                if not data:
                    return last
                buf += data
                if not head_done:
                    if b"\r\n\r\n" not in buf:
                        continue
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    if b" 200 " not in head.split(b"\r\n")[0]:
                        return last
                    head_done = True
                # Chunked transfer: SIZE CRLF DATA CRLF; the messages are JSON lines.
                while True:
                    if b"\r\n" not in buf:
                        break
                    size_line, rest = buf.split(b"\r\n", 1)
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        return last
                    if len(rest) < size + 2:
                        break
                    chunk, buf = rest[:size], rest[size + 2:]
                    self._pending = getattr(self, "_pending", b"") + chunk
                    while b"\n" in self._pending:
                        line, self._pending = self._pending.split(b"\n", 1)
                        if line.strip():
                            last = self._on_watch(json.loads(line), cid, last, epoch)
            return last
        finally:
            self._pending = b""
            s.close()

    def _on_watch(self, msg, cid, last, epoch):
        res = msg.get("result") or {}
        if msg.get("error") or res.get("canceled"):
            raise RuntimeError("watch cancelled: %s" % msg)
        for e in res.get("events", []):
            kv = e["kv"]
            rev = int(kv["mod_revision"])
            self.h.add("kv", rev=rev, epoch=epoch, key=unb64(kv["key"]),
                       op="del" if e.get("type") == "DELETE" else "put",
                       value=unb64(kv.get("value")), lease=kv.get("lease", "0"),
                       prev=unb64((e.get("prev_kv") or {}).get("value")) if e.get("prev_kv") else None)
            last = max(last, rev)
        return last

    healthy = {}

    def health_monitor(self):
        c = self.cluster
        prev = None
        while not self.stop_ev.is_set():
            cur = {n: world.etcd_health(c.hosts[n], timeout=0.4) for n in c.names}
            self.healthy = cur
            if cur != prev:
                self.h.add("health", members=cur)
                prev = cur
            time.sleep(0.25)

    def foreign_writer(self):
        c = self.cluster
        cluster_id = None
        counter = 0
        last_bump = time.monotonic()
        hosts = [c.hosts[n] for n in c.names]
        i = 0
        while not self.stop_ev.is_set():
            host = hosts[i % 3]
            try:
                r = etcd_call(host, "/v3/kv/range", {"key": b64("/foreign/counter")}, timeout=1.0)
                cid = r["header"]["cluster_id"]
                todo = []
                if cid != cluster_id:
                    todo = list(FOREIGN.items())  # a new (or wiped) cluster: the writer puts its keys
                    todo[-1] = ("/foreign/counter", str(counter))
                elif time.monotonic() - last_bump > 4.0:
                    counter += 1
                    todo = [("/foreign/counter", str(counter))]
                for k, v in todo:
                    # Said before it is sent: a put that times out may still land.
                    self.h.add("foreign_intent", key=k, value=v)
                    w = etcd_call(host, "/v3/kv/put", {"key": b64(k), "value": b64(v)}, timeout=1.0)
                    self.h.add("foreign", key=k, value=v, rev=int(w["header"]["revision"]),
                               cluster=w["header"]["cluster_id"])
                    last_bump = time.monotonic()
                cluster_id = cid
            except (OSError, RuntimeError, ValueError, KeyError, http.client.HTTPException):
                i += 1
            time.sleep(0.5)

    def client(self):
        rng = random.Random(self.args.seed + 1)
        while not self.stop_ev.is_set():
            self.req_n += 1
            n = self.req_n
            t0 = self.h.now()
            status, srv, err = None, None, None
            c = http.client.HTTPConnection(*FRONTEND, timeout=2.5)
            try:
                c.request("GET", "/", headers={"X-Req": str(n), "Connection": "close"})
                r = c.getresponse()
                r.read()
                status, srv = r.status, r.getheader("X-Served-By")
            except ConnectionRefusedError:
                err = "proxy refused"
            except socket.timeout:
                err = "timeout"
            except (OSError, http.client.HTTPException) as e:
                err = type(e).__name__
            finally:
                c.close()
            self.h.add("req", t=t0, n=n, dt=round(self.h.now() - t0, 4), status=status, srv=srv, err=err)
            time.sleep(rng.uniform(0.010, 0.020))

    def sampler(self):
        last = {}
        tick = 0
        while not self.stop_ev.is_set():
            tick += 1
            try:
                out = world.master_cli(self.master_sock, "@1 show servers state web", timeout=0.5)
                lines = [l.split() for l in out.splitlines() if l and not l.startswith("#")]
                servers = sorted(l[3] for l in lines if len(l) > 4 and l[1] == "web")
                # A change counts once two samples in a row agree: mid-reload
                # the CLI can answer for a worker with no servers yet.
                if (out.strip().startswith("1") or lines) and servers == last.get("_hap_prev"):
                    self._changed(last, "haproxy", servers=servers)
                last["_hap_prev"] = servers
            except OSError:
                pass
            try:
                with open(self.dest) as f:
                    text = f.read()
                self._changed(last, "rendered", servers=sorted(
                    l.split()[1] for l in text.splitlines() if l.strip().startswith("server ")))
            except OSError:
                pass
            if tick % 5 == 0:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", 7300, timeout=0.5)
                    c.request("GET", "/status")
                    st = json.loads(c.getresponse().read())
                    c.close()
                    t = st["templates"][0]
                    figs = {k: t.get(k) for k in ("wait_max_s", "last_read_s", "last_render_s",
                                                   "last_check_s", "last_reload_s", "revision",
                                                   "reloads", "reload_failures", "render_errors", "endpoint")}
                    self._changed(last, "render_status", **figs)
                except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException):
                    pass
            if tick % 10 == 0:
                for name, p in list(self.procs.items()):
                    if (name.startswith("sk-") or name in ("agent", "render")) and p.alive() and p.want == "running":
                        rss = fds = None
                        try:
                            with open("/proc/%d/status" % p.pid) as f:
                                for l in f:
                                    if l.startswith("VmRSS:"):
                                        rss = int(l.split()[1])
                            fds = len(os.listdir("/proc/%d/fd" % p.pid))
                        except OSError:
                            continue
                        self.h.add("res", proc=name, pid=p.pid, rss_kb=rss, fds=fds)
            for name, p in list(self.procs.items()):
                if p.popen is not None and not p.reported and p.popen.poll() is not None:
                    p.reported = True
                    self.h.add("exit", proc=name, pid=p.pid, rc=p.popen.returncode, expected=p.want == "dead")
            time.sleep(0.1)

    def _changed(self, last, type_, **fields):
        if last.get(type_) != fields:
            last[type_] = fields
            self.h.add(type_, **fields)

    # --- tear-down -----------------------------------------------------------

    def teardown(self):
        self.h.add("phase", name="teardown")
        time.sleep(0.3)
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=5)
        for name, p in self.procs.items():
            if name.startswith("sk-") or name in ("agent", "render", "haproxy"):
                p.want = "dead"
                p.signal(signal.SIGCONT)
                p.signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for name, p in self.procs.items():
            if p.popen and p.want == "dead":
                try:
                    p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for name, p in self.procs.items():
            if p.popen is not None and not p.reported:
                rc = p.popen.poll()
                if rc is not None:
                    p.reported = True
                    self.h.add("exit", proc=name, pid=p.pid, rc=rc, expected=True, teardown=True)
        for p in self.procs.values():
            p.kill()
        for p in self.cluster.procs.values():
            p.kill()
        self.h.add("hlog", entries=self.haproxy_log())

    def haproxy_log(self):
        out = []
        try:
            with open(os.path.join(self.dir, "logs", "haproxy.log"), errors="replace") as f:
                for line in f:
                    if not line.startswith("req="):
                        continue
                    fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
                    try:
                        out.append([int(fields["req"]), fields.get("srv"), fields.get("ts"),
                                    fields.get("st"), fields.get("rc")])
                    except (KeyError, ValueError):
                        pass
        except OSError:
            pass
        return out

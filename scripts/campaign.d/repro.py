"""Reproductions of the bugs the campaign found, each a short scenario on
the campaign's cluster (scripts/campaign --repro NAME).

stale-withdraw: an agent's withdrawal that timed out on a cut-off member
is applied by etcd once the member is back, after the agent registered the
service again under the same lease: the transaction compares the key's
lease with the agent's, which still matches, so it deletes the new
registration, and the agent, believing the key is there, never puts it
back.
"""

import json
import os
import signal
import subprocess
import time

import world
from world import Proc, b64, etcd_call

TOML = ('[services.web-5]\nkey = "/services/web/hosts/5"\nvalue = "127.0.0.1:9005"\n'
        'http = "http://127.0.0.1:9005/"\ninterval = "500ms"\ntimeout = "250ms"\nrise = 1\nfall = 2\n')
KEY = "/services/web/hosts/5"


def present(c, name):
    r = etcd_call(c.hosts[name], "/v3/kv/range", {"key": b64(KEY)}, timeout=1.0)
    return bool(r.get("kvs"))


def until(pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except Exception:
            pass
        time.sleep(0.05)
    return False


def stale_withdraw(a, run_dir, members, attempts=5):
    for d in ("logs", "etcd", "state", "agent", "off"):
        os.makedirs(os.path.join(run_dir, d), exist_ok=True)
    c = world.Cluster(run_dir, members)
    c.start_all()
    procs = []
    try:
        if not c.wait_healthy(40):
            print("etcd did not start")
            return 3
        state = os.path.join(run_dir, "state", "web-5")
        open(state, "w").write("up")
        here = os.path.dirname(os.path.abspath(__file__))
        be = Proc("web-5", ["python3", os.path.join(here, "backend.py"), "web-5", "9005", state],
                  os.path.join(run_dir, "logs", "backend.log"))
        be.start()
        procs.append(be)
        conf = os.path.join(run_dir, "agent", "web-5.toml")
        off = os.path.join(run_dir, "off", "web-5.toml")
        open(conf, "w").write(TOML)
        # A follower first: the agent talks to it until it fails. (A cut-off
        # leader steps down when it is back and drops what it had not
        # committed; a follower forwards it to the leader.)
        leader = c.leader()
        cut = [n for n in c.names if n != leader][0]
        other = [n for n in c.names if n != cut][0]
        order = [cut] + [n for n in c.names if n != cut]
        print("leader %s; the agent talks to %s first, which is cut off" % (leader, cut), flush=True)
        agent = Proc("agent", [a.sidekick, "agent", "--config", os.path.join(run_dir, "agent"), "--ttl", "3s",
                               "--dial-timeout", "1s", "--endpoints",
                               ",".join("http://%s:2379" % c.hosts[n] for n in order)],
                     os.path.join(run_dir, "logs", "agent.log"), env=world.clean_env())
        agent.start()
        procs.append(agent)
        if not until(lambda: present(c, other), 15):
            print("the agent never registered web-5")
            return 3
        lost = 0
        for i in range(1, attempts + 1):
            # Back to the cut member first: restart the agent if it moved on.
            if i > 1:
                agent.kill()
                agent.start()
                until(lambda: present(c, other), 10)
                time.sleep(1.0)
            # Cut m1 off, then remove the service: the withdrawal goes to m1,
            # times out after the call bound, and is done again through m2.
            c.link(cut, False)
            t_cut = time.monotonic()
            time.sleep(0.3)
            os.replace(conf, off)
            agent.signal(signal.SIGHUP)
            gone = until(lambda: not present(c, other), 10)
            # Add it back: registered again, under the same lease, through m2.
            os.replace(off, conf)
            agent.signal(signal.SIGHUP)
            back = until(lambda: present(c, other), 10)
            # Cut off long enough (as in the campaign: 4.4 s) for TCP's
            # retransmission timer to back off, then back.
            time.sleep(max(0.0, 4.5 - (time.monotonic() - t_cut)))
            c.link(cut, True)
            # Back: TCP delivers what the agent had sent it before.
            deleted = until(lambda: not present(c, other), 20)
            still = not until(lambda: present(c, other), 10) if deleted else False
            print("attempt %d: withdrawn %s, registered again %s, deleted after the cut member came back %s%s"
                  % (i, gone, back, deleted, ", and not put back within 10 s (the agent still reports it registered)"
                     if still else ""), flush=True)
            if deleted and still:
                lost += 1
                break
            if deleted:
                until(lambda: present(c, other), 10)
        print("the registration was lost in %d of %d attempts" % (lost, i))
        return 1 if lost else 0
    finally:
        for p in procs:
            p.kill()
        for p in c.procs.values():
            p.kill()


def lost_reload(a, run_dir, members, trials=16):
    """HAProxy 2.6 in master-worker mode loses a SIGUSR2 that arrives while
    it still reloads for the previous one: two configurations written and
    signalled 20 ms apart leave it on the first. Then the same through
    haproxy-reload, which waits for each reload."""
    os.makedirs(run_dir, exist_ok=True)
    sock = os.path.join(run_dir, "master.sock")
    cfg = os.path.join(run_dir, "haproxy.cfg")

    def write(name):
        text = ("global\n    maxconn 100\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 1s\n"
                "    timeout server 1s\nfrontend f\n    bind 127.0.0.1:18080\n    default_backend b\n"
                "backend b\n    server %s 127.0.0.1:9\n" % name)
        world.free_port_file_text(cfg, text)

    def serving():
        out = world.master_cli(sock, "@1 show servers state b")
        return [l.split()[3] for l in out.splitlines() if l[:1].isdigit() and len(l.split()) > 4]

    write("s0")
    hap = Proc("haproxy", ["haproxy", "-W", "-S", sock, "-f", cfg], os.path.join(run_dir, "haproxy.log"))
    hap.start()
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        time.sleep(1.0)
        stale = {"kill -USR2": 0, "haproxy-reload": 0}
        for how in stale:
            for i in range(trials):
                for name in ("a%d" % i, "b%d" % i):
                    write(name)
                    if how == "kill -USR2":
                        os.kill(hap.pid, signal.SIGUSR2)
                        time.sleep(0.02)
                    else:
                        subprocess.run([os.path.join(here, "haproxy-reload"), sock, str(hap.pid)], check=False)
                time.sleep(1.5)
                try:
                    now = serving()
                except OSError:
                    now = ["(no answer)"]
                if now != ["b%d" % i]:
                    stale[how] += 1
            print("%-15s two reloads 20 ms apart: HAProxy stayed on the older configuration in %d of %d trials"
                  % (how, stale[how], trials), flush=True)
        return 1 if stale["kill -USR2"] else 0
    finally:
        hap.kill()

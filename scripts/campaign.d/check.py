"""The checker: a separate pass over a recorded history, with every bound
taken from the history itself (`sidekick explain --json` for the flags in
use, render's measured figures from /status), never from constants typed
here, except SLACK.

The invariants, from the Guarantees (docs/guarantees.md):
  served_after_bound   no request is answered by a failed instance later
                       than its failure + the withdraw bound + the render
                       bound, while etcd has quorum, outside a settle window
  registered           a healthy instance's key is present within its
                       register bound, while etcd has quorum
  rendered             HAProxy's live server set is the registered set as it
                       was at some moment within the render bound
  foreign              no key of the foreign writer is deleted or rewritten
  shared               shared keys are present while a declaring instance is
                       registered
  settle               the proxy never loses all its servers because etcd
                       lost its data
  exit                 no process exits unless told to; SIGTERM exits 0
  rss, fds             after a warm-up RSS grows by at most 5 %; file
                       descriptors come back to their level in quiet times
  quiet_revision       no etcd revision where nothing changed
  failed_request       every failed request falls in a window the
                       Guarantees allow
"""

import bisect

# The one allowance not derived from the flags: how late a loaded 2-core
# machine may be on top of every stated bound. It covers a process waiting
# for a CPU, the history's own timestamps (taken by Python threads that
# wait too), HAProxy loading a new worker after its reload command
# returned, the 0.1 s sampling of HAProxy's server set, and a Python
# instance taking its first request.
SLACK = 1.0
# Seconds of samples a process is given to warm up before its RSS counts.
WARMUP = 20.0
# RSS may grow by this fraction after the warm-up.
RSS_GROWTH = 0.05
# Grid step for the checks that hold "at every moment".
STEP = 0.05


class Step:
    """A step function of time, from (t, value) changes."""

    def __init__(self, default=None):
        self.ts, self.vs, self.default = [], [], default

    def set(self, t, v):
        # Two changes recorded at one time (two revisions in one watch
        # message) stay two states, a microsecond apart: the proxy may
        # have been rendered from the first.
        if self.ts and t <= self.ts[-1]:
            t = self.ts[-1] + 1e-6
        self.ts.append(t)
        self.vs.append(v)

    def at(self, t):
        i = bisect.bisect_right(self.ts, t) - 1
        return self.vs[i] if i >= 0 else self.default

    def changes(self, a, b):
        """The times of changes in (a, b]."""
        i, j = bisect.bisect_right(self.ts, a), bisect.bisect_right(self.ts, b)
        return self.ts[i:j]

    def values_in(self, a, b):
        """Every value the function takes in [a, b]."""
        out = [self.at(a)]
        i, j = bisect.bisect_right(self.ts, a), bisect.bisect_right(self.ts, b)
        out.extend(self.vs[i:j])
        return out


def windows(pred_times, end):
    """Merges [a, b] pairs into a sorted list of disjoint windows."""
    out = []
    for a, b in sorted(pred_times):
        b = min(b, end)
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def in_windows(ws, t):
    i = bisect.bisect_right([w[0] for w in ws], t) - 1
    return i >= 0 and ws[i][0] <= t <= ws[i][1]


def overlaps(ws, a, b):
    return any(w[0] <= b and a <= w[1] for w in ws)


class Model:
    """Timelines rebuilt from the history."""

    def __init__(self, recs):
        self.meta = next(r for r in recs if r["type"] == "meta")
        self.end = max(r["t"] for r in recs)
        self.t_faults = next((r["t"] for r in recs if r["type"] == "phase" and r["name"] == "faults"), 0.0)
        self.t_teardown = next((r["t"] for r in recs if r["type"] == "phase" and r["name"] == "teardown"), self.end)
        self.end = self.t_teardown
        m = self.meta
        ex, ex0 = m["explain"]["probe"], m["explain"]["no_probe"]
        self.ex = ex
        call = ex["etcd_call_bound_s"]
        self.call = call
        self.settle_s = m["settle_s"]
        # Guarantees (docs/guarantees.md): "F × I + T after the failure, then the
        # withdrawal's round trip, after at most one etcd call in flight
        # plus the keep-alive, each bounded by min(D, L/3)": the round trip
        # too is given up at that bound when it hangs on a lost member.
        self.withdraw = ex["withdraw_after_failure_s"] + 3 * call
        self.withdraw_term = ex["withdraw_after_sigterm_s"]
        self.stale = ex["stale_after_sigkill_s"]
        self.stale_leader = ex["stale_per_leader_change_s"]
        # "then the grant and the put": two round trips, each bounded.
        self.reg_start = ex["register_after_start_s"] + 2 * call
        self.reg_start_noprobe = (ex0["register_after_start_s"] or 0.0) + 2 * call
        self.reg_recovery = ex["register_after_recovery_s"] + 2 * call
        self.reg_back = ex["register_after_etcd_back_s"] + 2 * call
        # A resumed (SIGCONT) sidekick finds its lease gone at its next
        # keep-alive, then registers as after an outage.
        self.reg_resume = ex["keepalive_every_s"] + self.reg_back
        self.instances = m["instances"]
        self.foreign = m["foreign"]
        self.recs = recs
        self._render_bound(recs)
        self._etcd(recs)
        self._instances(recs)
        self._render_lost(recs)
        self._keys(recs)
        self._proxy(recs)

    # render's change-to-reload sum, from its measured figures
    def _render_bound(self, recs):
        worst = 0.0
        parts = None
        for r in recs:
            if r["type"] != "render_status":
                continue
            vals = [r.get(k) or 0.0 for k in ("wait_max_s", "last_read_s", "last_render_s",
                                                 "last_check_s", "last_reload_s")]
            if sum(vals) > worst:
                worst, parts = sum(vals), vals
        self.render_sum = worst
        self.render_parts = parts
        # The SPEC's sum counts one round trip: the watch event's arrival
        # is bounded by the etcd call bound like every other call.
        self.render = worst + self.call
        self.render_start = self.call + self.render  # a (re)started render reads afresh first

    def _etcd(self, recs):
        names = self.meta["members"]
        state = {n: "up" for n in names}
        self.quorum = Step(True)
        self.healthy_any = Step(False)
        self.wipes = []
        self.member_faults = []  # [start, end] of single-member trouble
        for r in recs:
            if r["type"] == "action" and r["on"] in ("member", "cluster"):
                if r["on"] == "cluster":
                    for n in names:
                        state[n] = "down" if r["do"] == "wipe" else "up"
                    if r["do"] == "wipe":
                        self.wipes.append([r["t"], None])
                    elif self.wipes and self.wipes[-1][1] is None:
                        self.wipes[-1][1] = r["t"]
                else:
                    state[r["target"]] = {"kill": "down", "start": "up", "stop": "frozen", "cont": "up",
                                          "link_down": "cut", "link_up": "up"}[r["do"]]
                self.quorum.set(r["t"], sum(1 for v in state.values() if v == "up") >= 2)
            elif r["type"] == "health":
                self.healthy_any.set(r["t"], sum(1 for v in r["members"].values() if v) >= 1)
        # etcd is unavailable when the faults took its quorum or no member
        # says it has a leader (an election); after it is back, a settle
        # window lets the sidekicks register again and render catch up.
        bad = []
        t_bad = None
        ts = sorted(set(self.quorum.ts + self.healthy_any.ts))
        for t in ts:
            ok = self.quorum.at(t) and self.healthy_any.at(t)
            if not ok and t_bad is None:
                t_bad = t
            elif ok and t_bad is not None:
                bad.append([t_bad, t])
                t_bad = None
        if t_bad is not None:
            bad.append([t_bad, self.end])
        self.unavailable = windows(bad, self.end)
        settle = self.reg_back + self.render + SLACK
        self.unsettled = windows([[a, b + settle] for a, b in bad], self.end)
        # After a wipe render waits --settle once it reads the new cluster.
        for a, b in self.wipes:
            back = b if b is not None else self.end
            later = [w[1] for w in self.unavailable if w[0] <= back + 0.01] or [back]
            self.unsettled = windows(self.unsettled + [[a, max(later) + self.settle_s + self.render_start + settle]],
                                     self.end)

    def _instances(self, recs):
        self.health = {}     # name -> Step of "up"/"down"/"slow"/"dead"
        self.registrar = {}  # name -> Step of "running"/"stopped"/"dead"/"term"
        self.trigger = {}    # name -> list of (t, bound) registration triggers
        for n, inst in self.instances.items():
            self.health[n] = Step("dead" if inst["probe"] else "up")
            self.registrar[n] = Step("dead")
            self.trigger[n] = []
        agent = Step("dead")
        self.agent = agent
        for r in recs:
            if r["type"] != "action":
                continue
            t, on, tg, do = r["t"], r["on"], r["target"], r["do"]
            if on == "backend" and tg in self.health:
                st = {"up": "up", "down": "down", "slow": "slow", "kill": "dead", "start": "dead", "ready": "up"}[do]
                prev = self.health[tg].at(t)
                self.health[tg].set(t, st)
                if st == "up" and prev != "up":
                    self.trigger[tg].append((t, self.reg_recovery))
            elif on == "sidekick" and tg in self.registrar:
                st = {"start": "running", "kill": "dead", "stop": "stopped", "cont": "running", "term": "term"}[do]
                self.registrar[tg].set(t, st)
                if do == "start":
                    self.trigger[tg].append((t, self.reg_start))
                elif do == "cont":
                    self.trigger[tg].append((t, self.reg_resume))
            elif on == "agent" and tg in self.registrar:
                self.registrar[tg].set(t, "running" if do == "add" else "term")
                bound = self.reg_start if self.instances[tg]["probe"] else self.reg_start_noprobe
                self.trigger[tg].append((t, bound))
        self.render_up = Step(False)
        down = []
        t_down = None
        for r in recs:
            if r["type"] == "action" and r["on"] == "render":
                self.render_up.set(r["t"], r["do"] == "start")
                if r["do"] == "kill":
                    t_down = r["t"]
                elif r["do"] == "start":
                    down.append([t_down if t_down is not None else 0.0, r["t"] + self.render_start + SLACK])
                    t_down = None
        if t_down is not None:
            down.append([t_down, self.end])
        self.render_down = windows(down, self.end)

    def _render_lost(self, recs):
        """Where render may lag because the member it follows froze or was
        cut off (docs/guarantees.md): its watch moves to another member
        within `watch_leaves_lost_member_s`, then it reads afresh. The
        member is the one render's /status last named; while unknown (just
        started, or a history without it) any member. A history whose
        explain lacks the figure gets no such window."""
        self.lost = self.ex.get("watch_leaves_lost_member_s")
        ws = []
        if self.lost is not None:
            by_endpoint = {e: n for n, e in (self.meta.get("member_endpoints") or {}).items()}
            follows = None
            for r in recs:
                if r["type"] == "render_status":
                    follows = by_endpoint.get(r.get("endpoint"))
                elif r["type"] == "action" and r["on"] == "render" and r["do"] == "start":
                    follows = None
                elif (r["type"] == "action" and r["on"] == "member" and r["do"] in ("stop", "link_down")
                      and follows in (None, r["target"])):
                    ws.append([r["t"], r["t"] + self.lost + self.render_start + SLACK])
        self.render_lost = windows(ws, self.end)
        # render killed, restarting, or on a lost member: behind by design.
        self.render_away = windows(self.render_down + self.render_lost, self.end)

    def _keys(self, recs):
        self.kv = {}  # key -> Step of value or None
        self.epoch_starts = []
        self.kv_events = []
        for r in recs:
            if r["type"] == "action" and r["on"] == "cluster" and r["do"] == "wipe":
                # The data is gone with the wipe, whenever the recorder sees it.
                for s in self.kv.values():
                    s.set(r["t"], None)
            elif r["type"] == "snapshot":
                for k, s in self.kv.items():
                    if k not in r["kvs"]:
                        s.set(r["t"], None)
                for k, v in r["kvs"].items():
                    self.kv.setdefault(k, Step(None)).set(r["t"], v)
                self.epoch_starts.append(r["t"])
            elif r["type"] == "kv":
                self.kv.setdefault(r["key"], Step(None)).set(r["t"], r["value"] if r["op"] == "put" else None)
                self.kv_events.append(r)
        self.web_set = Step(frozenset())
        cur = set()
        prefix = "/services/web/hosts/"
        for r in recs:
            if r["type"] == "action" and r["on"] == "cluster" and r["do"] == "wipe":
                cur = set()
                self.web_set.set(r["t"], frozenset())
            elif r["type"] == "snapshot":
                cur = {"web-" + k[len(prefix):] for k in r["kvs"] if k.startswith(prefix) and "/" not in k[len(prefix):]}
                self.web_set.set(r["t"], frozenset(cur))
            elif r["type"] == "kv" and r["key"].startswith(prefix) and "/" not in r["key"][len(prefix):]:
                name = "web-" + r["key"][len(prefix):]
                if r["op"] == "put":
                    cur.add(name)
                else:
                    cur.discard(name)
                self.web_set.set(r["t"], frozenset(cur))

    def _proxy(self, recs):
        self.haproxy = Step(None)
        for r in recs:
            if r["type"] == "haproxy":
                self.haproxy.set(r["t"], frozenset(r["servers"]))

    def present(self, key, t):
        s = self.kv.get(key)
        return s is not None and s.at(t) is not None

    def etcd_ok(self, a, b):
        """etcd had quorum and was settled over [a, b]."""
        return not overlaps(self.unsettled, a, b)

    def deadline(self, name, t):
        """The latest time `name`, unhealthy at t, may still be served, or
        None when nothing bounds it (etcd or render away meanwhile)."""
        h = self.health[name]
        if h.at(t) == "up":
            return None
        # The start of the unhealthy stretch holding t.
        i = bisect.bisect_right(h.ts, t) - 1
        while i > 0 and h.vs[i - 1] != "up":
            i -= 1
        tf = h.ts[i] if i >= 0 else 0.0
        reg = self.registrar[name]
        d = tf + self.withdraw
        # A registrar that was not running meanwhile: its key goes with its
        # lease (SIGKILL, SIGSTOP: TTL plus a leader change's extension) or
        # its SIGTERM (dial timeout).
        state = reg.at(tf)
        changes = [(tf, state)] + [(c, reg.at(c)) for c in reg.changes(tf, t)]
        for c, st in changes:
            if st in ("dead", "stopped"):
                d = max(d, c + self.stale + self.stale_leader)
            elif st == "term":
                d = max(d, c + self.withdraw_term)
        d += self.render + SLACK
        for w in self.unsettled + self.render_away:
            if w[0] <= d and w[1] >= tf:
                d = max(d, w[1] + self.withdraw + self.render + SLACK)
        return d


def check(recs):
    m = Model(recs)
    v = []

    def violation(kind, t, text, **kw):
        v.append(dict(kind=kind, t=round(t, 3), text=text, **kw))

    reqs = [r for r in recs if r["type"] == "req" and r["t"] < m.t_teardown]
    hlog = {}
    for r in recs:
        if r["type"] == "hlog":
            for n, srv, ts, st, rc in r["entries"]:
                hlog[n] = {"srv": srv, "ts": ts, "st": st, "rc": rc}

    # served_after_bound
    for r in reqs:
        srv = r.get("srv")
        if srv in m.health and r.get("status") is not None:
            d = m.deadline(srv, r["t"])
            if d is not None and r["t"] > d:
                violation("served_after_bound", r["t"],
                          "request %d answered by %s (%s), later than its failure + withdraw bound %.2fs + render bound %.2fs"
                          % (r["n"], srv, m.health[srv].at(r["t"]), m.withdraw, m.render), instance=srv)

    # failed requests, by cause
    failures = []
    for r in reqs:
        ok = r.get("status") == 200 and r.get("srv")
        if ok:
            continue
        hl = hlog.get(r["n"], {})
        t = r["t"]
        if r.get("srv"):
            cause, inst = "instance answered %s" % r["status"], r["srv"]
        elif r.get("err"):
            cause, inst = r["err"], hl.get("srv")
        elif hl.get("srv") == "<NOSRV>":
            cause, inst = "no server", None
        elif hl.get("ts", "").startswith("sH") or hl.get("ts", "").startswith("sC") or r.get("status") == 504:
            cause, inst = "server timeout", hl.get("srv")
        elif hl.get("ts", "").startswith("SC"):
            cause, inst = "connection refused", hl.get("srv")
        else:
            cause, inst = "status %s (%s)" % (r.get("status"), hl.get("ts")), hl.get("srv")
        why = allowed(m, t, inst, cause, t + (r.get("dt") or 0.0))
        failures.append({"t": t, "n": r["n"], "cause": cause, "srv": inst, "allowed": why})
        if why is None:
            violation("failed_request", t, "request %d failed (%s%s), in no window the Guarantees allow"
                      % (r["n"], cause, ", server " + inst if inst else ""))

    # registered: a healthy instance's key within its register bound
    for name, inst in m.instances.items():
        key = inst["key"]
        bad_from = None
        t = m.t_faults if m.t_faults else 0.0
        t = max(t, 2.0)
        while t <= m.end:
            due = registered_due(m, name, t)
            if due is not None and t >= due and not m.present(key, t):
                if bad_from is None:
                    bad_from = t
            else:
                if bad_from is not None:
                    violation("registered", bad_from, "%s healthy and its registrar running, but %s absent from %.2f to %.2f"
                              % (name, key, bad_from, t), instance=name)
                bad_from = None
            t += STEP
        if bad_from is not None:
            violation("registered", bad_from, "%s healthy, but %s absent from %.2f to the end" % (name, key, bad_from),
                      instance=name)

    # rendered: HAProxy's set is the registered set of some moment within the render bound
    bad_from = None
    t = max(m.t_faults, 2.0)
    while t <= m.end:
        judged = (m.etcd_ok(t - m.render - SLACK, t) and not overlaps(m.render_away, t - m.render - SLACK, t)
                  and m.haproxy.at(t) is not None)
        good = True
        if judged:
            # The recorder's watch is a sampler of etcd too: moving off a
            # frozen member it may stamp a revision after the proxy had it.
            want = set(m.web_set.values_in(t - m.render - SLACK, t + SLACK))
            good = m.haproxy.at(t) in want
        if not good:
            if bad_from is None:
                bad_from = t
        else:
            if bad_from is not None:
                violation("rendered", bad_from, "HAProxy served %s from %.2f to %.2f while etcd had %s"
                          % (sorted(m.haproxy.at(bad_from)), bad_from, t, sorted(m.web_set.at(bad_from))))
            bad_from = None
        t += STEP
    if bad_from is not None:
        violation("rendered", bad_from, "HAProxy served %s from %.2f to the end while etcd had %s"
                  % (sorted(m.haproxy.at(bad_from)), bad_from, sorted(m.web_set.at(bad_from))))

    # foreign keys: every event on them is the writer's own
    writes = {(r["key"], r["rev"], r["value"]) for r in recs if r["type"] == "foreign"}
    # A put the writer gave up on (timed out) may land all the same.
    intents = {(r["key"], r["value"]) for r in recs if r["type"] == "foreign_intent"}
    for e in m.kv_events:
        if e["key"] in m.foreign:
            if e["op"] == "del":
                violation("foreign", e["t"], "foreign key %s deleted at revision %d" % (e["key"], e["rev"]))
            elif (e["key"], e["rev"], e["value"]) not in writes and (e["key"], e["value"]) not in intents:
                violation("foreign", e["t"], "foreign key %s rewritten at revision %d to %r" % (e["key"], e["rev"], e["value"]))

    # shared keys: present while a declaring instance is registered
    services = {}
    for name, inst in m.instances.items():
        for k, val in inst["shared"].items():
            services.setdefault(k, []).append(inst["key"])
    for skey, owners in services.items():
        bad_from = None
        since = miss_since = None
        t = max(m.t_faults, 2.0)
        while t <= m.end:
            held = any(m.present(k, t) for k in owners) and m.etcd_ok(t - m.call - SLACK, t)
            if held and since is None:
                since = t
            if not held:
                since = None
            missing = held and not m.present(skey, t)
            if missing and miss_since is None:
                miss_since = t
            if not missing:
                miss_since = None
            # Put back within one round trip of the deletion, or of the
            # registration that needs it.
            if missing and t - max(miss_since, since) > m.call + SLACK and bad_from is None:
                bad_from = miss_since
            if not missing and bad_from is not None:
                violation("shared", bad_from, "shared key %s absent from %.2f to %.2f while an instance declaring it was registered"
                          % (skey, bad_from, t))
                bad_from = None
            t += STEP
        if bad_from is not None:
            violation("shared", bad_from, "shared key %s absent from %.2f to the end while an instance declaring it was registered"
                      % (skey, bad_from))

    # settle: the proxy never loses all its servers because etcd lost its data
    for a, b in m.wipes:
        before = m.haproxy.at(a)
        if not before:
            continue
        back = b if b is not None else m.end
        # Until the new cluster's keys are rendered: the first moment after
        # the wipe when etcd holds an instance again, plus --settle and a render.
        nonempty = [t for t, s in zip(m.web_set.ts, m.web_set.vs) if t > back and s]
        until = (nonempty[0] if nonempty else m.end) + m.settle_s + m.render_start + SLACK
        for t, s in zip(m.haproxy.ts, m.haproxy.vs):
            if a <= t <= min(until, m.end) and s is not None and len(s) == 0:
                alive = [n for n in m.instances if n.startswith("web-") and m.health[n].at(t) == "up"
                         and m.registrar[n].at(t) == "running"]
                if alive:
                    fresh = [x for x in m.render_up.ts if a < x <= t]
                    violation("settle", t, "HAProxy lost all its servers %.2fs after etcd was wiped, with %s healthy%s"
                              % (t - a, ", ".join(alive), " (render was started again after the wipe, with nothing to compare the new revision with)" if fresh else ""))
                    break

    # exits
    for r in recs:
        if r["type"] != "exit":
            continue
        if not r["expected"]:
            violation("exit", r["t"], "%s (pid %s) exited with %s, unasked" % (r["proc"], r["pid"], r["rc"]))
        elif (r["proc"].startswith("sk-") or r["proc"] in ("agent", "render")) and r.get("teardown") and r["rc"] != 0:
            violation("exit", r["t"], "%s (pid %s) exited with %s after SIGTERM" % (r["proc"], r["pid"], r["rc"]))
    for r in recs:
        if r["type"] == "action" and r["on"] == "sidekick" and r["do"] == "term":
            ex = [e for e in recs if e["type"] == "exit" and e["proc"] == "sk-" + r["target"] and e["pid"] == r.get("pid")]
            if ex and ex[0]["rc"] != 0:
                violation("exit", ex[0]["t"], "sk-%s exited with %s after SIGTERM" % (r["target"], ex[0]["rc"]))

    # quiet windows: no revision, file descriptors back to their level
    quiet = quiet_windows(m, recs)
    for a, b in quiet:
        for e in m.kv_events:
            if a <= e["t"] <= b and e["key"] not in m.foreign:
                violation("quiet_revision", e["t"], "revision %d (%s %s) while nothing changed (quiet from %.2f to %.2f)"
                          % (e["rev"], e["op"], e["key"], a, b))
    res = {}
    for r in recs:
        if r["type"] == "res":
            res.setdefault((r["proc"], r["pid"]), []).append(r)
    for (proc, pid), samples in res.items():
        t0 = samples[0]["t"]
        warm = [s for s in samples if t0 + WARMUP <= s["t"] <= t0 + WARMUP + 5]
        late = samples[-5:]
        if warm and samples[-1]["t"] - t0 >= WARMUP + 20 and late[0]["t"] > warm[-1]["t"]:
            base = sorted(s["rss_kb"] for s in warm)[len(warm) // 2]
            final = sorted(s["rss_kb"] for s in late)[len(late) // 2]
            if final > base * (1 + RSS_GROWTH):
                violation("rss", late[-1]["t"], "%s (pid %d) RSS grew from %d kB to %d kB after its warm-up (%+.1f %%)"
                          % (proc, pid, base, final, 100.0 * (final - base) / base))
        # The etcd client keeps a connection to each endpoint it has had
        # to use, so the level may rise by one per other endpoint, and
        # never more: a leak grows without bound.
        room = len(m.meta["members"]) - 1
        base_fds = None
        for a, b in quiet:
            inq = [s["fds"] for s in samples if a <= s["t"] <= b]
            if not inq or a < t0 + 2:
                continue
            if base_fds is None:
                base_fds = min(inq)
            elif min(inq) > base_fds + room:
                violation("fds", a, "%s (pid %d) holds %d file descriptors in a quiet time, %d in the first one"
                          % (proc, pid, min(inq), base_fds))
    v.sort(key=lambda x: x["t"])
    return {"violations": v, "failures": failures, "quiet": quiet, "model": m,
            "bounds": bounds_of(m)}


def registered_due(m, name, t):
    """When `name`'s key must be present, if it must be at t: healthy, its
    registrar running and etcd settled since then; None when it need not."""
    if m.health[name].at(t) != "up" or m.registrar[name].at(t) != "running":
        return None
    if not m.etcd_ok(t, t):
        return None
    # The latest moment any condition began to hold, with its bound.
    due = 0.0
    for tt, bound in m.trigger[name]:
        if tt <= t:
            due = max(due, tt + bound)
    # Every interruption since resets: the conditions must hold since the trigger.
    h, reg = m.health[name], m.registrar[name]
    for s in (h, reg):
        i = bisect.bisect_right(s.ts, t) - 1
        if i >= 0:
            due = max(due, s.ts[i])  # at least from the last change
    # etcd back: the settle window already holds the registration bound.
    for w in m.unsettled:
        if w[1] <= t:
            due = max(due, w[1])
    return due + SLACK


def within_bound(m, name, t, at):
    """Whether a request at t is within the bound of `name`'s failure, as
    judged at `at` (the request's start or its answer)."""
    d = m.deadline(name, at)
    return d is not None and t <= d


def allowed(m, t, inst, cause, t_end=None):
    """Why a request sent at t (answered at t_end) and failed is allowed by
    the Guarantees, or None."""
    if in_windows(m.unsettled, t):
        return "etcd without quorum, or settling after it"
    if in_windows(m.render_down, t):
        return "render down, or catching up after its restart"
    if in_windows(m.render_lost, t):
        return "render's member frozen or cut off, within watch_leaves_lost_member_s"
    if inst in m.health:
        # The instance may have failed while it handled the request.
        if any(within_bound(m, inst, t, tt) for tt in (t, t_end or t)):
            return "%s failed, within its withdraw + render bound" % inst
    # No instance the Guarantees require in the proxy: all down or withdrawn.
    required = [n for n in m.instances if n.startswith("web-")
                and registered_due(m, n, t - m.render - SLACK) is not None
                and registered_due(m, n, t - m.render - SLACK) <= t - m.render - SLACK]
    if not required:
        return "no instance was required to be serving"
    servers = m.haproxy.at(t) or frozenset()
    if inst is None and cause in ("server timeout", "timeout") or cause.startswith("status 50"):
        # Without the proxy's log line: some server in the proxy had failed
        # within its bound, by the time the request was answered.
        if any(s in m.health and within_bound(m, s, t, tt) for s in servers for tt in (t, t_end or t)):
            return "a server in the proxy had failed, within its bound"
    if cause in ("no server", "connection refused", "server timeout", "timeout"):
        failing = [s for s in servers if s in m.health and within_bound(m, s, t, t)]
        if servers and len(failing) == len(servers):
            return "every server in the proxy had failed within its bound"
    return None


def quiet_windows(m, recs):
    """Stretches where nothing was done for long enough that nothing should
    change in etcd: after the last action, a killed sidekick's keys expire
    within the TTL plus a leader change's extension, and the rest
    registers within its bounds."""
    after = m.stale + m.stale_leader + m.reg_back + SLACK
    acts = sorted(r["t"] for r in recs if r["type"] == "action")
    out = []
    if not acts:
        return out
    bounds = acts + [m.end]
    for i in range(len(bounds) - 1):
        a, b = bounds[i] + after, bounds[i + 1]
        if b - a >= 1.0 and a >= m.t_faults:
            out.append([round(a, 3), round(b, 3)])
    return out


def bounds_of(m):
    return {
        "withdraw_s": m.withdraw, "withdraw_sigterm_s": m.withdraw_term, "stale_s": m.stale,
        "stale_per_leader_change_s": m.stale_leader, "register_start_s": m.reg_start,
        "register_recovery_s": m.reg_recovery, "register_etcd_back_s": m.reg_back,
        "register_resume_s": m.reg_resume, "render_sum_s": m.render_sum, "render_s": m.render,
        "render_parts": m.render_parts, "slack_s": SLACK, "settle_s": m.settle_s,
        "watch_leaves_lost_member_s": m.lost,
    }

"""The checker against hand-made histories: each invariant holds on a clean
history and is reported when broken. Run: python3 -m unittest discover -s
scripts/campaign.d (or scripts/campaign --self-test)."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import check  # noqa: E402
import schedule  # noqa: E402

EXPLAIN = {
    "etcd_call_bound_s": 1.0, "withdraw_after_failure_s": 0.5, "withdraw_after_sigterm_s": 1.0,
    "stale_after_sigkill_s": 3.0, "stale_per_leader_change_s": 3.0, "register_after_start_s": 0.1,
    "register_after_recovery_s": 0.3, "register_after_etcd_back_s": 1.2, "keepalive_every_s": 1.0,
}
NO_PROBE = dict(EXPLAIN, register_after_start_s=None)
SHARED = {"/services/web/scheme": "http"}
KEY = "/services/web/hosts/1"


class H:
    """A history under construction: one instance web-1 (run), a foreign key,
    three members, render's figures summing to 0.2 s."""

    def __init__(self, explain=EXPLAIN, end=60.0):
        self.recs = [{"t": 0, "type": "meta", "seed": 1, "duration": end, "settle_s": 5.0,
                      "explain": {"probe": explain, "no_probe": NO_PROBE},
                      "flags": {"timing": [], "etcd": [], "drain": []},
                      "instances": {"web-1": {"key": KEY, "value": "127.0.0.1:9001", "by": "run",
                                              "shared": SHARED, "probe": True}},
                      "foreign": {"/foreign/a": "1"}, "members": ["m1", "m2", "m3"], "faults": [], "kinds": []},
                     {"t": 0.1, "type": "health", "members": {"m1": True, "m2": True, "m3": True}},
                     {"t": 0.2, "type": "snapshot", "rev": 1, "epoch": 0, "cluster": "c", "kvs": {}},
                     {"t": 0.3, "type": "foreign", "key": "/foreign/a", "value": "1", "rev": 2, "cluster": "c"},
                     {"t": 0.3, "type": "kv", "key": "/foreign/a", "op": "put", "value": "1", "rev": 2, "epoch": 0},
                     {"t": 0.5, "type": "action", "on": "backend", "target": "web-1", "do": "ready", "fault": 0},
                     {"t": 0.5, "type": "action", "on": "render", "target": "render", "do": "start", "fault": 0},
                     {"t": 0.6, "type": "action", "on": "sidekick", "target": "web-1", "do": "start", "fault": 0},
                     {"t": 0.8, "type": "kv", "key": KEY, "op": "put", "value": "127.0.0.1:9001", "rev": 3, "epoch": 0},
                     {"t": 0.8, "type": "kv", "key": "/services/web/scheme", "op": "put", "value": "http", "rev": 4, "epoch": 0},
                     {"t": 0.9, "type": "haproxy", "servers": ["web-1"]},
                     {"t": 1.0, "type": "render_status", "wait_max_s": 0.0, "last_read_s": 0.05, "last_render_s": 0.01,
                      "last_check_s": 0.09, "last_reload_s": 0.05},
                     {"t": 2.0, "type": "phase", "name": "faults"}]
        self.end = end
        self.rev = 10

    def add(self, t, type_, **kw):
        self.recs.append(dict(t=t, type=type_, **kw))
        return self

    def act(self, t, on, target, do):
        return self.add(t, "action", on=on, target=target, do=do, fault=1)

    def kv(self, t, key, value=None):
        self.rev += 1
        return self.add(t, "kv", key=key, op="put" if value is not None else "del", value=value or "",
                        rev=self.rev, epoch=0)

    def reqs(self, a, b, srv="web-1", status=200, every=0.1):
        t = a
        while t < b:
            self.add(round(t, 3), "req", n=len(self.recs), srv=srv, status=status, err=None, dt=0.01)
            t += every
        return self

    def run(self):
        self.add(self.end, "phase", name="teardown")
        return check.check(sorted(self.recs, key=lambda r: r["t"]))

    def kinds(self):
        return sorted({v["kind"] for v in self.run()["violations"]})


class CheckerTest(unittest.TestCase):
    def test_a_clean_history_passes(self):
        r = H().reqs(2, 50).run()
        self.assertEqual(r["violations"], [])
        self.assertEqual(r["failures"], [])

    def test_bounds_come_from_explain_not_constants(self):
        slow = dict(EXPLAIN, withdraw_after_failure_s=5.5)
        self.assertAlmostEqual(H().run()["bounds"]["withdraw_s"], 0.5 + 3 * 1.0)
        self.assertAlmostEqual(H(explain=slow).run()["bounds"]["withdraw_s"], 5.5 + 3 * 1.0)
        # render's bound is its measured sum plus one etcd call bound
        self.assertAlmostEqual(H().run()["bounds"]["render_s"], 0.2 + 1.0)

    def failed_instance(self, h, answered_at):
        h.act(10, "backend", "web-1", "down").kv(10.4, KEY).add(10.6, "haproxy", servers=[])
        h.add(answered_at, "req", n=999, srv="web-1", status=503, err=None, dt=0.01)
        return h

    def test_an_answer_within_the_withdraw_and_render_bounds_is_allowed(self):
        r = self.failed_instance(H(), 10.3).run()
        self.assertNotIn("served_after_bound", [v["kind"] for v in r["violations"]])
        self.assertTrue(r["failures"][0]["allowed"])

    def test_an_answer_after_the_bounds_is_a_violation(self):
        # withdraw 3.5 + render 1.2 + slack 1.0 after the failure at 10
        r = self.failed_instance(H(), 16.0).run()
        self.assertIn("served_after_bound", [v["kind"] for v in r["violations"]])

    def test_without_quorum_the_bounds_do_not_hold(self):
        h = self.failed_instance(H(), 16.0)
        h.act(9, "member", "m1", "kill").act(9.1, "member", "m2", "kill")
        h.add(9.2, "health", members={"m1": False, "m2": False, "m3": False})
        h.act(30, "member", "m1", "start").act(30, "member", "m2", "start")
        h.add(31, "health", members={"m1": True, "m2": True, "m3": True})
        self.assertNotIn("served_after_bound", h.kinds())

    def test_an_instance_failing_while_it_handles_a_request_is_allowed(self):
        # sent a moment before the instance turned slow, timed out by the proxy after
        h = H().act(10, "backend", "web-1", "slow").kv(10.6, KEY).add(10.7, "haproxy", servers=[])
        h.add(9.999, "req", n=999, srv=None, status=504, err=None, dt=1.0)
        h.add(61, "hlog", entries=[[999, "web-1", "sH--", "504", "0"]])
        r = h.run()
        self.assertEqual(r["violations"], [])
        self.assertEqual(r["failures"][0]["cause"], "server timeout")

    def test_a_502_as_the_instance_dies_is_allowed_without_the_proxys_log(self):
        # sent 0.2 ms before the kill, answered 502 after it; no log line joined
        h = H().act(10, "backend", "web-1", "kill").kv(10.6, KEY).add(10.7, "haproxy", servers=[])
        h.add(9.9998, "req", n=999, srv=None, status=502, err=None, dt=0.002)
        r = h.run()
        self.assertEqual(r["violations"], [])
        h = H().add(9.9998, "req", n=999, srv=None, status=502, err=None, dt=0.002)
        self.assertEqual(h.kinds(), ["failed_request"])

    def test_a_killed_sidekick_leaves_its_key_for_the_ttl(self):
        h = H().act(10, "sidekick", "web-1", "kill").act(10.5, "backend", "web-1", "down")
        h.add(13, "req", n=999, srv="web-1", status=503, err=None, dt=0.01)  # within TTL + leader change
        h.add(20, "req", n=998, srv="web-1", status=503, err=None, dt=0.01)  # long after
        v = [x for x in h.run()["violations"] if x["kind"] == "served_after_bound"]
        self.assertEqual([x["t"] for x in v], [20])

    def test_foreign_keys_deleted_or_rewritten_are_violations(self):
        self.assertEqual(H().kv(20, "/foreign/a").kinds(), ["foreign"])
        self.assertEqual(H().kv(20, "/foreign/a", "2").kinds(), ["foreign"])
        h = H()
        h.kv(20, "/foreign/a", "2")
        h.add(20, "foreign", key="/foreign/a", value="2", rev=h.rev, cluster="c")
        self.assertNotIn("foreign", h.kinds())
        # the writer's own put that timed out on its side and landed
        h = H().add(19.9, "foreign_intent", key="/foreign/a", value="3")
        h.kv(20, "/foreign/a", "3")
        self.assertNotIn("foreign", h.kinds())

    def test_a_healthy_instance_without_its_key_is_a_violation(self):
        self.assertIn("registered", H().kv(20, KEY).kinds())

    def test_a_key_back_within_the_recovery_bound_is_fine(self):
        h = H().act(20, "backend", "web-1", "down").kv(20.5, KEY).add(20.6, "haproxy", servers=[])
        h.act(25, "backend", "web-1", "up").kv(25.5, KEY, "127.0.0.1:9001").add(25.6, "haproxy", servers=["web-1"])
        self.assertEqual(h.kinds(), [])
        h = H().act(20, "backend", "web-1", "down").kv(20.5, KEY).add(20.6, "haproxy", servers=[])
        h.act(25, "backend", "web-1", "up").kv(29.5, KEY, "127.0.0.1:9001").add(29.6, "haproxy", servers=["web-1"])
        self.assertIn("registered", h.kinds())

    def test_the_proxy_must_follow_etcd_within_the_render_bound(self):
        h = H().act(20, "backend", "web-1", "down").kv(20.5, KEY).add(23.0, "haproxy", servers=[])
        self.assertEqual(h.kinds(), ["rendered"])
        h = H().act(20, "backend", "web-1", "down").kv(20.5, KEY).add(21.0, "haproxy", servers=[])
        self.assertEqual(h.kinds(), [])

    def lost_member(self, explain, follows, cut, rendered_at):
        """render's member `follows` per its status; `cut` cut off at 20; the
        withdrawal at 20.5 reaches the proxy at `rendered_at`."""
        h = H(explain=explain)
        h.recs[0]["member_endpoints"] = {m: "http://10.0.0.%d:2379" % i for i, m in enumerate(["m1", "m2", "m3"], 1)}
        h.add(1.5, "render_status", endpoint=h.recs[0]["member_endpoints"][follows], wait_max_s=0.0,
              last_read_s=0.05, last_render_s=0.01, last_check_s=0.09, last_reload_s=0.05)
        h.act(20, "member", cut, "link_down").act(24, "member", cut, "link_up")
        h.act(20, "backend", "web-1", "down").kv(20.5, KEY).add(rendered_at, "haproxy", servers=[])
        return h.kinds()

    def test_render_on_a_lost_member_may_lag_by_the_bound_explain_gives(self):
        lost = dict(EXPLAIN, watch_leaves_lost_member_s=11.0)
        # moving off m1 within 11 s, then reading afresh: allowed
        self.assertEqual(self.lost_member(lost, "m1", "m1", 29.0), [])
        # later than that bound (20 + 11 + a fresh read 2.2 + slack 1, then the render bound): not
        self.assertEqual(self.lost_member(lost, "m1", "m1", 40.0), ["rendered"])
        # another member cut off: render's own watch is not behind
        self.assertEqual(self.lost_member(lost, "m2", "m1", 29.0), ["rendered"])
        # a sidekick whose explain does not give the bound gets no window
        self.assertEqual(self.lost_member(EXPLAIN, "m1", "m1", 29.0), ["rendered"])

    def test_a_missing_shared_key_is_a_violation(self):
        self.assertIn("shared", H().kv(20, "/services/web/scheme").kinds())
        h = H().kv(20, "/services/web/scheme").kv(20.3, "/services/web/scheme", "http")
        self.assertNotIn("shared", h.kinds())

    def test_losing_every_server_after_a_wipe_is_a_violation(self):
        h = H().act(20, "cluster", "all", "wipe").add(20.1, "health", members={"m1": False, "m2": False, "m3": False})
        h.act(22, "cluster", "all", "start").add(23, "health", members={"m1": True, "m2": True, "m3": True})
        h.add(23.1, "snapshot", rev=1, epoch=1, cluster="d", kvs={})
        h.add(23.2, "haproxy", servers=[])  # rendered from the empty cluster at once
        h.kv(24, KEY, "127.0.0.1:9001").add(40, "haproxy", servers=["web-1"])
        self.assertIn("settle", h.kinds())
        h = H().act(20, "cluster", "all", "wipe").add(20.1, "health", members={"m1": False, "m2": False, "m3": False})
        h.act(22, "cluster", "all", "start").add(23, "health", members={"m1": True, "m2": True, "m3": True})
        h.add(23.1, "snapshot", rev=1, epoch=1, cluster="d", kvs={})
        h.kv(24, KEY, "127.0.0.1:9001")
        self.assertNotIn("settle", h.kinds())

    def test_unasked_exits_are_violations(self):
        h = H().add(30, "exit", proc="sk-web-1", pid=5, rc=101, expected=False)
        self.assertIn("exit", h.kinds())
        h = H().add(30, "exit", proc="sk-web-1", pid=5, rc=1, expected=True, teardown=True)
        self.assertIn("exit", h.kinds())

    def test_a_revision_while_nothing_changes_is_a_violation(self):
        h = H().act(10, "backend", "web-1", "up")
        self.assertEqual(h.kinds(), [])
        h = H().act(10, "backend", "web-1", "up").kv(40, "/services/web/hosts/9", "x")
        self.assertIn("quiet_revision", h.kinds())

    def test_rss_growth_and_fd_leaks(self):
        h = H()
        for i in range(50):
            h.add(5 + i, "res", proc="sk-web-1", pid=7, rss_kb=5000 if i < 30 else 6000, fds=12)
        self.assertEqual(h.kinds(), ["rss"])
        h = H().act(10, "backend", "web-1", "up").act(35, "backend", "web-1", "up")
        for i in range(50):
            h.add(5 + i, "res", proc="sk-web-1", pid=7, rss_kb=5000, fds=12 if i < 30 else 15)  # 2 endpoints more: 14
        self.assertEqual(h.kinds(), ["fds"])
        # a connection to each other endpoint is no leak
        h = H().act(10, "backend", "web-1", "up").act(35, "backend", "web-1", "up")
        for i in range(50):
            h.add(5 + i, "res", proc="sk-web-1", pid=7, rss_kb=5000, fds=12 if i < 30 else 14)
        self.assertEqual(h.kinds(), [])

    def test_failed_requests_with_nothing_to_excuse_them_are_violations(self):
        h = H().add(30, "req", n=5, srv=None, status=503, err=None, dt=0.01)
        h.add(61, "hlog", entries=[[5, "<NOSRV>", "SC--", "503", "0"]])
        self.assertIn("failed_request", h.kinds())
        r = h.run()
        self.assertEqual(r["failures"][0]["cause"], "no server")


class ScheduleTest(unittest.TestCase):
    args = (["web-1", "web-2", "web-3"], ["web-5"], ["m1", "m2", "m3"])

    def test_a_seed_replays_its_schedule(self):
        a = schedule.generate(42, 300, *self.args, ttl=3.0)
        self.assertEqual(a, schedule.generate(42, 300, *self.args, ttl=3.0))
        self.assertNotEqual(a, schedule.generate(43, 300, *self.args, ttl=3.0))

    def test_faults_on_one_target_never_overlap_and_kinds_are_kept(self):
        f = schedule.generate(7, 600, *self.args, ttl=3.0, kinds=schedule.STEADY_KINDS)
        self.assertTrue(f)
        self.assertTrue({x["kind"] for x in f} <= set(schedule.STEADY_KINDS))
        etcd = sorted((x["start"], x["end"]) for x in f if x["kind"] in schedule.ETCD_KINDS)
        for (a, b), (c, d) in zip(etcd, etcd[1:]):
            self.assertLessEqual(b, c)

    def test_a_sidekick_is_frozen_longer_than_its_ttl(self):
        f = schedule.generate(3, 2000, *self.args, ttl=3.0, kinds=["sidekick_stop"])
        self.assertTrue(f)
        self.assertTrue(all(x["end"] - x["start"] > 3.0 for x in f))


if __name__ == "__main__":
    unittest.main()

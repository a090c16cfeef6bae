"""scripts/campaign: a randomized fault campaign, end to end, with a checker
built from the Guarantees (docs/guarantees.md). See docs/reliability.md.

  campaign --duration 60s --seed N [--kinds K,K] [--out DIR]   run, check, report
  campaign --check HISTORY [--out DIR]                         check a recorded history again
  campaign --self-test                                         the checker's unit tests
"""

import argparse
import os
import random
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import check  # noqa: E402
import history  # noqa: E402
import report  # noqa: E402
import schedule as sched  # noqa: E402


def duration(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError("not a duration: %r (e.g. 60s, 20m, 1h)" % text)
    n, unit = float(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def parse(argv):
    p = argparse.ArgumentParser(prog="campaign", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=duration, default=60.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--kinds", help="comma list of fault kinds (default: all): " + ",".join(sched.ALL_KINDS))
    p.add_argument("--steady", action="store_true",
                   help="only the fault kinds whose verdict cannot hang on timing luck (scripts/test)")
    p.add_argument("--out", help="where the history, logs and report go (default: a new directory under /tmp)")
    p.add_argument("--sidekick", help="the sidekick binary (default: the release build)")
    p.add_argument("--check", metavar="HISTORY", help="check a recorded history again, run nothing")
    p.add_argument("--self-test", action="store_true", help="run the checker's unit tests")
    p.add_argument("--print-schedule", action="store_true", help="print the schedule and exit")
    p.add_argument("--raw-reload", action="store_true",
                   help="render reloads HAProxy with a bare kill -USR2 (which can be lost mid-reload)")
    p.add_argument("--repro", choices=["stale-withdraw", "lost-reload"], help="run the reproduction of a bug the campaign found")
    p.add_argument("--inner", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1, 1_000_000)
    if a.steady:
        a.kinds = ",".join(sched.STEADY_KINDS)
    a.kinds = a.kinds.split(",") if a.kinds else list(sched.ALL_KINDS)
    bad = [k for k in a.kinds if k not in sched.ALL_KINDS]
    if bad:
        p.error("unknown fault kind(s): %s" % ",".join(bad))
    return a


def faults_for(a):
    import runner
    return sched.generate(a.seed, a.duration, runner.RUN_INSTANCES, runner.AGENT_WEB,
                          ["m1", "m2", "m3"], ttl=3.0, kinds=a.kinds)


def check_and_report(hist_path, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    recs = history.load(hist_path)
    result = check.check(recs)
    md, svg = report.write(recs, result, out_dir)
    print(report.summary(recs, result))
    print("report: %s\npicture: %s\nhistory: %s" % (md, svg, hist_path))
    return 0 if not result["violations"] else 1


def inner(a):
    """Inside the namespace APP: run the campaign and record it."""
    import runner
    faults = faults_for(a)
    run_dir = a.out
    h = history.History(os.path.join(run_dir, "history.jsonl"))
    members = a.inner.split(",")
    if a.repro:
        import repro
        return {"stale-withdraw": repro.stale_withdraw, "lost-reload": repro.lost_reload}[a.repro](a, run_dir, members)
    c = runner.Campaign(a, run_dir, members, h)
    rc = 0
    try:
        c.meta(faults)
        c.setup()
        c.execute(faults)
    except KeyboardInterrupt:
        rc = 130
    except Exception as e:  # set-up failed: say so, then clean up
        h.add("error", what=repr(e))
        print("campaign: %s" % e, file=sys.stderr)
        rc = 3
    finally:
        try:
            c.teardown()
        finally:
            h.close()
    return rc


def outer(a):
    import world
    if os.geteuid() != 0:
        print("campaign: needs root (it makes network namespaces)", file=sys.stderr)
        return 2
    for tag in world.stale_namespaces():
        world.remove_namespaces(tag)
    if not a.sidekick:
        target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(HERE, "..", "..", "target")
        a.sidekick = os.path.join(target, "release", "sidekick")
    a.sidekick = os.path.abspath(a.sidekick)
    if not os.access(a.sidekick, os.X_OK):
        print("campaign: no sidekick binary at %s (cargo build --release)" % a.sidekick, file=sys.stderr)
        return 2
    a.out = os.path.abspath(a.out or "/tmp/campaign-%d-%d" % (a.seed, int(time.time())))
    os.makedirs(a.out, exist_ok=True)
    faults = faults_for(a)
    kinds = {}
    for f in faults:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    if a.repro:
        print("reproduction: %s" % a.repro, flush=True)
    else:
        print("campaign: seed %d, %gs, %d faults (%s)" % (a.seed, a.duration, len(faults),
          ", ".join("%s %d" % kv for kv in sorted(kinds.items()))), flush=True)
        print("replay with: scripts/campaign --duration %gs --seed %d%s%s" % (
        a.duration, a.seed, " --kinds " + ",".join(a.kinds) if set(a.kinds) != set(sched.ALL_KINDS) else "",
        " --raw-reload" if a.raw_reload else ""), flush=True)
    tag = "skc%d" % (os.getpid() % 100000)
    app, members = world.ns_names(tag)
    rc = 0
    try:
        world.make_namespaces(tag)
        argv = ["ip", "netns", "exec", app, sys.executable, os.path.abspath(__file__),
                "--inner", ",".join(members), "--seed", str(a.seed), "--duration", "%gs" % a.duration,
                "--kinds", ",".join(a.kinds), "--out", a.out, "--sidekick", a.sidekick] \
            + (["--repro", a.repro] if a.repro else []) + (["--raw-reload"] if a.raw_reload else [])
        rc = subprocess.call(argv)
    except KeyboardInterrupt:
        rc = 130
    finally:
        world.remove_namespaces(tag)
    if a.repro:
        return rc
    if rc not in (0,):
        print("campaign: the run failed (exit %d); logs in %s/logs" % (rc, a.out), file=sys.stderr)
        if rc != 3:
            return rc
    return check_and_report(os.path.join(a.out, "history.jsonl"), a.out) or rc


def main(argv):
    a = parse(argv)
    if a.self_test:
        import unittest
        suite = unittest.defaultTestLoader.discover(HERE, pattern="test_*.py")
        ok = unittest.TextTestRunner(verbosity=1).run(suite).wasSuccessful()
        return 0 if ok else 1
    if a.check:
        return check_and_report(a.check, a.out or os.path.dirname(os.path.abspath(a.check)))
    if a.print_schedule:
        for f in faults_for(a):
            print("%7.3f %7.3f  %-16s %s" % (f["start"], f["end"], f["kind"], f["target"]))
        return 0
    if a.inner:
        return inner(a)
    return outer(a)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The fault schedule: a pure function of the seed, the duration and the
cast (instances, members), so that a seed replays the same schedule.

A fault is a list of timed actions on one or more targets. Faults that
share a target never overlap; faults on different targets may. etcd faults
take the lock "etcd" (at most one etcd fault at a time, so that the
cluster's state is always one the checker can name); a whole-cluster fault
(quorum lost, wipe) takes it too.
"""

import random

# Every fault kind, with the targets it locks and how it is built.
INSTANCE_KINDS = ["backend_down", "backend_slow", "backend_kill", "sidekick_kill",
                  "sidekick_stop", "sidekick_term"]
AGENT_KINDS = ["agent_hup"]
ETCD_KINDS = ["member_kill", "member_freeze", "member_partition", "leader_kill",
              "quorum_loss", "wipe"]
OTHER_KINDS = ["render_kill", "reload_storm"]
ALL_KINDS = INSTANCE_KINDS + AGENT_KINDS + ETCD_KINDS + OTHER_KINDS

# Kinds whose verdict cannot hang on timing luck: each has a stated bound
# in the Guarantees, none cuts a member off or freezes it (a write that
# timed out on it could still land later: see docs/reliability.md), and
# none loads the machine enough to make a healthy instance's probe time
# out (an HAProxy reload storm can). The fixed-seed campaign of
# scripts/test draws from these.
STEADY_KINDS = ["backend_down", "backend_slow", "backend_kill", "sidekick_kill",
                "sidekick_term", "agent_hup", "render_kill", "member_kill"]


def _actions(kind, target, t, d, rng, ttl):
    """The timed actions of one fault starting at t and lasting d."""
    if kind == "backend_down":
        return [(t, "backend", target, "down"), (t + d, "backend", target, "up")]
    if kind == "backend_slow":
        return [(t, "backend", target, "slow"), (t + d, "backend", target, "up")]
    if kind == "backend_kill":
        return [(t, "backend", target, "kill"), (t + d, "backend", target, "start")]
    if kind == "sidekick_kill":
        return [(t, "sidekick", target, "kill"), (t + d, "sidekick", target, "start")]
    if kind == "sidekick_stop":
        # Frozen for longer than its TTL, so that its lease runs out.
        return [(t, "sidekick", target, "stop"), (t + d, "sidekick", target, "cont")]
    if kind == "sidekick_term":
        # A rolling update's step: the sidekick withdraws and exits (its
        # drain covers the proxy's reaction), the instance is replaced,
        # then both start again.
        return [(t, "sidekick", target, "term"), (t + d * 0.4, "backend", target, "kill"),
                (t + d * 0.6, "backend", target, "start"), (t + d * 0.7, "sidekick", target, "start")]
    if kind == "agent_hup":
        return [(t, "agent", target, "remove"), (t + d, "agent", target, "add")]
    if kind == "member_kill":
        return [(t, "member", target, "kill"), (t + d, "member", target, "start")]
    if kind == "member_freeze":
        return [(t, "member", target, "stop"), (t + d, "member", target, "cont")]
    if kind == "member_partition":
        return [(t, "member", target, "link_down"), (t + d, "member", target, "link_up")]
    if kind == "leader_kill":
        return [(t, "member", "leader", "kill"), (t + d, "member", "leader", "start")]
    if kind == "quorum_loss":
        how = rng.choice(["kill", "stop", "link_down"])
        back = {"kill": "start", "stop": "cont", "link_down": "link_up"}[how]
        a, b = target
        return [(t, "member", a, how), (t + 0.3, "member", b, how),
                (t + d, "member", a, back), (t + d + 0.3, "member", b, back)]
    if kind == "wipe":
        return [(t, "cluster", "all", "wipe"), (t + d, "cluster", "all", "start")]
    if kind == "render_kill":
        return [(t, "render", "render", "kill"), (t + d, "render", "render", "start")]
    if kind == "reload_storm":
        n = rng.randint(5, 15)
        return [(t + i * d / n, "haproxy", "haproxy", "reload") for i in range(n)]
    raise ValueError(kind)


def _duration(kind, rng, ttl):
    if kind == "sidekick_stop":
        return rng.uniform(ttl * 1.3, ttl * 2.2)
    if kind == "reload_storm":
        return rng.uniform(1.0, 3.0)
    if kind == "wipe":
        return rng.uniform(1.0, 3.0)
    if kind in ("quorum_loss",):
        return rng.uniform(2.0, 5.0)
    if kind in ETCD_KINDS:
        return rng.uniform(2.0, 6.0)
    return rng.uniform(1.5, 6.0)


def _locks(kind, target):
    if kind in INSTANCE_KINDS:
        return {"inst:" + target}
    if kind in AGENT_KINDS:
        return {"inst:" + target, "agent"}
    if kind in ETCD_KINDS:
        return {"etcd"}
    return {kind.split("_")[0]}


def generate(seed, duration, instances, agent_services, members, ttl, kinds=None,
             warmup=8.0, quiet=12.0, mean_gap=1.6, max_down=None):
    """Faults for a campaign of `duration` seconds.

    instances: names of instances run by `sidekick run` (instance faults);
    agent_services: names of agent services that SIGHUP may remove and add;
    members: etcd member names. Nothing happens during the first `warmup`
    seconds, nor the last `quiet` ones, and a quiet stretch of `quiet`
    seconds follows every 40 s of faults, so the checker sees windows where
    nothing changes. At most `max_down` instances (default: all but one)
    are made unhealthy at once.
    """
    rng = random.Random(seed)
    kinds = list(kinds or ALL_KINDS)
    all_inst = list(instances) + list(agent_services)
    if max_down is None:
        max_down = max(1, len(all_inst) - 1)
    busy = []  # (start, end, locks)
    faults = []
    t = warmup
    end = duration - quiet
    next_quiet = warmup + 40.0
    n = 0
    while True:
        t += rng.expovariate(1.0 / mean_gap)
        if t >= next_quiet:
            t = next_quiet + quiet
            next_quiet = t + 40.0
            continue
        if t >= end:
            break
        kind = rng.choice(kinds)
        if kind in INSTANCE_KINDS:
            target = rng.choice(list(instances))
        elif kind in AGENT_KINDS:
            if not agent_services:
                continue
            target = rng.choice(list(agent_services))
        elif kind in ("member_kill", "member_freeze", "member_partition"):
            target = rng.choice(list(members))
        elif kind == "quorum_loss":
            target = tuple(rng.sample(list(members), 2))
        else:
            target = kind.split("_")[0]
        d = _duration(kind, rng, ttl)
        # Faults end before the final quiet stretch and before the next one.
        if t + d + 1.0 >= min(end, next_quiet):
            continue
        locks = _locks(kind, target if isinstance(target, str) else "etcd")
        stop = t + d + 1.0
        if any(s < stop and t < e and (l & locks) for s, e, l in busy):
            continue
        if kind in INSTANCE_KINDS or kind in AGENT_KINDS:
            down = sum(1 for s, e, l in busy if s < stop and t < e and "down" in l)
            if down >= max_down:
                continue
            locks = locks | {"down"}
        busy.append((t, stop, locks))
        n += 1
        acts = _actions(kind, target, t, d, rng, ttl)
        faults.append({
            "id": n, "kind": kind,
            "target": list(target) if isinstance(target, tuple) else target,
            "start": round(t, 3), "end": round(t + d, 3),
            "actions": [{"t": round(a, 3), "on": on, "target": tg, "do": do}
                        for a, on, tg, do in acts],
        })
    return faults


def actions(faults):
    """Every action of every fault, in time order, each with its fault id."""
    out = []
    for f in faults:
        for a in f["actions"]:
            out.append(dict(a, fault=f["id"], kind=f["kind"]))
    out.sort(key=lambda a: (a["t"], a["fault"]))
    return out

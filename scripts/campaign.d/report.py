"""The campaign's summary (stdout), its Markdown report and its timeline
picture (SVG, written by hand: stdlib only)."""

import collections
import html
import os

WIDTH = 1400
LEFT = 110
ROW = 16


def summary(recs, result):
    m = result["model"]
    meta = m.meta
    faults = meta["faults"]
    kinds = collections.Counter(f["kind"] for f in faults)
    reqs = [r for r in recs if r["type"] == "req" and r["t"] < m.t_teardown]
    fails = result["failures"]
    causes = collections.Counter((f["cause"], "allowed" if f["allowed"] else "NOT allowed") for f in fails)
    v = result["violations"]
    lines = ["seed %d, %gs: %d faults (%s)" % (meta["seed"], meta["duration"], len(faults),
             ", ".join("%s %d" % kv for kv in sorted(kinds.items())))]
    lines.append("requests: %d sent, %d failed (%d allowed by the Guarantees, %d not)"
                 % (len(reqs), len(fails), sum(1 for f in fails if f["allowed"]),
                    sum(1 for f in fails if not f["allowed"])))
    for (cause, ok), n in sorted(causes.items()):
        lines.append("  %5d  %s (%s)" % (n, cause, ok))
    b = result["bounds"]
    lines.append("bounds: withdraw %.2fs, render %.3fs (measured sum %.3fs + one call bound), register %.2fs/%.2fs, "
                 "stale after SIGKILL %.2fs (+%.2fs per leader change), watch off a lost member %s, slack %.1fs"
                 % (b["withdraw_s"], b["render_s"], b["render_sum_s"], b["register_start_s"],
                    b["register_recovery_s"], b["stale_s"], b["stale_per_leader_change_s"],
                    "%.2fs" % b["watch_leaves_lost_member_s"] if b.get("watch_leaves_lost_member_s") is not None
                    else "not given by this sidekick's explain", b["slack_s"]))
    lines.append("quiet windows checked: %d (%.1fs)" % (len(result["quiet"]), sum(b - a for a, b in result["quiet"])))
    by = collections.Counter(x["kind"] for x in v)
    lines.append("invariant violations: %d%s" % (len(v), (" (" + ", ".join("%s %d" % kv for kv in sorted(by.items())) + ")") if v else ""))
    for x in v[:20]:
        lines.append("  VIOLATION %8.3f  %-18s %s" % (x["t"], x["kind"], x["text"]))
        lines.extend("      " + l for l in window(recs, x["t"]))
    if v:
        lines.append("seed %d: replay with scripts/campaign --duration %gs --seed %d" % (meta["seed"], meta["duration"], meta["seed"]))
    lines.append("verdict: %s" % ("PASS" if not v else "FAIL"))
    return "\n".join(lines)


def window(recs, t, before=3.0, after=1.0, most=25):
    """The history around t, the request stream left out but its failures."""
    out = []
    for r in recs:
        if t - before <= r["t"] <= t + after and r["type"] not in ("res", "render_status", "hlog", "meta", "snapshot"):
            if r["type"] == "req" and r.get("status") == 200:
                continue
            fields = {k: v for k, v in r.items() if k not in ("t", "type")}
            out.append("%9.3f %-9s %s" % (r["t"], r["type"], " ".join("%s=%s" % kv for kv in sorted(fields.items()))))
    if len(out) > most:
        out = out[:most // 2] + ["   ... %d more" % (len(out) - most)] + out[-most // 2:]
    return out


def write(recs, result, out_dir):
    md_path = os.path.join(out_dir, "report.md")
    svg_path = os.path.join(out_dir, "timeline.svg")
    with open(svg_path, "w") as f:
        f.write(svg(recs, result))
    m = result["model"]
    meta = m.meta
    with open(md_path, "w") as f:
        f.write("# Fault campaign, seed %d, %gs\n\n" % (meta["seed"], meta["duration"]))
        f.write("```\n%s\n```\n\n" % summary(recs, result))
        f.write("![timeline](timeline.svg)\n\n")
        f.write("## Flags and bounds\n\n")
        f.write("sidekick flags: `%s`\n\n" % " ".join(meta["flags"]["timing"] + meta["flags"]["etcd"] + meta["flags"]["drain"]))
        f.write("`sidekick explain --json` for them:\n\n```\n%s\n```\n\n" % meta["explain"]["probe"])
        f.write("bounds the checker used:\n\n```\n%s\n```\n\n" % result["bounds"])
        f.write("## Faults\n\n| start | end | kind | target |\n|---|---|---|---|\n")
        for x in meta["faults"]:
            f.write("| %.2f | %.2f | %s | %s |\n" % (x["start"] + m.t_faults, x["end"] + m.t_faults, x["kind"], x["target"]))
        f.write("\n## Failed requests\n\n| t | request | cause | server | allowed because |\n|---|---|---|---|---|\n")
        for x in result["failures"][:500]:
            f.write("| %.3f | %d | %s | %s | %s |\n" % (x["t"], x["n"], x["cause"], x["srv"] or "", x["allowed"] or "**not allowed**"))
        f.write("\n## Violations\n\n")
        if not result["violations"]:
            f.write("None.\n")
        for x in result["violations"]:
            f.write("- %.3f `%s`: %s\n\n```\n%s\n```\n" % (x["t"], x["kind"], x["text"], "\n".join(window(recs, x["t"]))))
    return md_path, svg_path


def svg(recs, result):
    m = result["model"]
    t0, t1 = 0.0, max(m.end, 1.0)
    insts = list(m.instances)
    rows = ["violations", "failed requests", "faults", "etcd", "m1", "m2", "m3", "render", "haproxy reloads"] + insts
    height = 40 + ROW * (len(rows) + 2) + 90
    x = lambda t: LEFT + (WIDTH - LEFT - 20) * (t - t0) / (t1 - t0)
    y = lambda name: 30 + ROW * rows.index(name)
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">' % (WIDTH, height),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="10" y="16" font-size="13">seed %d, %gs: faults, etcd, key presence (green), HAProxy set (blue), '
           'instance unhealthy (red), failed requests, violations</text>' % (m.meta["seed"], m.meta["duration"])]

    def bar(row, a, b, color, dy=2, h=ROW - 4, title=None):
        if b < a:
            return
        el = '<rect x="%.1f" y="%.1f" width="%.1f" height="%d" fill="%s">' % (x(a), y(row) + dy, max(x(b) - x(a), 1.0), h, color)
        out.append(el + ("<title>%s</title></rect>" % html.escape(title) if title else "</rect>"))

    for name in rows:
        out.append('<text x="4" y="%d">%s</text>' % (y(name) + 12, html.escape(name)))
        out.append('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="#eee"/>' % (LEFT, WIDTH - 20, y(name) + ROW, y(name) + ROW))
    for a, b in m.unsettled:
        bar("etcd", a, b, "#fde68a", title="etcd unsettled")
    for a, b in m.unavailable:
        bar("etcd", a, b, "#9ca3af", title="etcd unavailable")
    for a, b in m.render_lost:
        bar("render", a, b, "#fdba74", title="render's member frozen or cut off: moving off it")
    for a, b in m.render_down:
        bar("render", a, b, "#fca5a5", title="render down or catching up")
    # member states
    for r in recs:
        pass
    names = m.meta["members"]
    state = {n: ("up", 0.0) for n in names}
    colors = {"down": "#ef4444", "frozen": "#60a5fa", "cut": "#f59e0b"}
    for r in recs:
        if r["type"] == "action" and r["on"] in ("member", "cluster"):
            targets = names if r["on"] == "cluster" else [r["target"]]
            for n in targets:
                st = {"kill": "down", "wipe": "down", "start": "up", "stop": "frozen", "cont": "up",
                      "link_down": "cut", "link_up": "up"}[r["do"]]
                prev, since = state[n]
                if prev != "up":
                    bar(n, since, r["t"], colors[prev], title="%s %s" % (n, prev))
                state[n] = (st, r["t"])
        if r["type"] == "action" and r["on"] == "haproxy":
            bar("haproxy reloads", r["t"], r["t"] + 0.01, "#7c3aed")
    for n, (st, since) in state.items():
        if st != "up":
            bar(n, since, t1, colors[st])
    for name in insts:
        h = m.health[name]
        for i, (t, s) in enumerate(zip(h.ts, h.vs)):
            end = h.ts[i + 1] if i + 1 < len(h.ts) else t1
            if s != "up":
                bar(name, t, end, "#fecaca", dy=0, h=ROW, title="%s %s" % (name, s))
        reg = m.registrar[name]
        for i, (t, s) in enumerate(zip(reg.ts, reg.vs)):
            end = reg.ts[i + 1] if i + 1 < len(reg.ts) else t1
            if s != "running" and t > 0.5:
                bar(name, t, end, "#e5e7eb", dy=0, h=4, title="registrar %s" % s)
        k = m.kv.get(m.instances[name]["key"])
        if k:
            for i, (t, val) in enumerate(zip(k.ts, k.vs)):
                end = k.ts[i + 1] if i + 1 < len(k.ts) else t1
                if val is not None:
                    bar(name, t, end, "#16a34a", dy=4, h=5, title="key present")
        hp = m.haproxy
        for i, (t, s) in enumerate(zip(hp.ts, hp.vs)):
            end = hp.ts[i + 1] if i + 1 < len(hp.ts) else t1
            if s and name in s:
                bar(name, t, end, "#2563eb", dy=10, h=4, title="in HAProxy")
    palette = ["#0ea5e9", "#a855f7", "#f97316", "#14b8a6", "#eab308", "#ec4899", "#64748b", "#84cc16",
               "#6366f1", "#f43f5e", "#22c55e", "#b45309", "#0f766e", "#9333ea", "#be123c"]
    kinds = sorted({f["kind"] for f in m.meta["faults"]})
    for f in m.meta["faults"]:
        c = palette[kinds.index(f["kind"]) % len(palette)]
        bar("faults", f["start"] + m.t_faults, f["end"] + m.t_faults, c, dy=3, h=ROW - 6,
            title="%s %s" % (f["kind"], f["target"]))
    for f in result["failures"]:
        bar("failed requests", f["t"], f["t"] + 0.01, "#f59e0b" if f["allowed"] else "#dc2626",
            title="%d %s %s" % (f["n"], f["cause"], f["allowed"] or "NOT allowed"))
    for v in result["violations"]:
        bar("violations", v["t"], v["t"] + 0.01, "#dc2626", title=v["text"])
    # time axis
    step = 10 if t1 <= 120 else 60 if t1 <= 1200 else 300
    yb = 30 + ROW * len(rows) + 6
    t = 0
    while t <= t1:
        out.append('<line x1="%.1f" x2="%.1f" y1="26" y2="%d" stroke="#ddd"/>' % (x(t), x(t), yb))
        out.append('<text x="%.1f" y="%d" text-anchor="middle">%ds</text>' % (x(t), yb + 12, t))
        t += step
    legend = [("#16a34a", "key in etcd"), ("#2563eb", "in HAProxy"), ("#fecaca", "instance unhealthy"),
              ("#e5e7eb", "registrar not running"), ("#ef4444", "member down"), ("#60a5fa", "member frozen"),
              ("#f59e0b", "member cut off / failed request (allowed)"), ("#dc2626", "violation / failed request not allowed"),
              ("#9ca3af", "etcd unavailable"), ("#fde68a", "settle window"),
              ("#fca5a5", "render down or catching up"), ("#fdba74", "render moving off a lost member")]
    legend += [(palette[i % len(palette)], "fault: " + k) for i, k in enumerate(kinds)]
    lx, ly = LEFT, yb + 20
    for c, label in legend:
        w = 14 + 6.2 * len(label) + 10
        if lx + w > WIDTH - 10:
            lx, ly = LEFT, ly + 14
        out.append('<rect x="%d" y="%d" width="10" height="10" fill="%s"/><text x="%d" y="%d">%s</text>'
                   % (lx, ly, c, lx + 13, ly + 9, html.escape(label)))
        lx += w
    out.append("</svg>")
    return "\n".join(out)

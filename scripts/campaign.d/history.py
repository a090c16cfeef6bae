"""The recorded history: one JSON object a line, each with `t`, seconds
since the campaign's start on the monotonic clock, and `type`."""

import json
import threading
import time


class History:
    def __init__(self, path):
        self.f = open(path, "w")
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def now(self):
        return time.monotonic() - self.t0

    def add(self, type_, t=None, **fields):
        rec = {"t": round(self.now() if t is None else t, 4), "type": type_}
        rec.update(fields)
        line = json.dumps(rec, sort_keys=True)
        with self.lock:
            self.f.write(line + "\n")

    def close(self):
        with self.lock:
            self.f.flush()
            self.f.close()


def load(path):
    recs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                recs.append(json.loads(line))
    recs.sort(key=lambda r: r["t"])
    return recs

"""A demo instance for the campaign: answers every request with 200 and a
body and an X-Served-By header naming the instance, so a client behind the
proxy sees which instance served it.

Usage: backend.py NAME PORT STATE_FILE. STATE_FILE holds `up` (or is
missing), `down` (answer 503, still naming the instance) or `slow` (answer
after SLOW_S seconds, longer than any probe timeout the campaign uses).
"""

import http.server
import sys
import time

SLOW_S = 1.5


def main():
    name, port, state_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def state():
        try:
            with open(state_file) as f:
                return f.read().strip() or "up"
        except OSError:
            return "up"

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            s = state()
            if s == "slow":
                time.sleep(SLOW_S)
            code = 503 if s == "down" else 200
            body = ("%s %s\n" % (name, s)).encode()
            self.send_response(code)
            self.send_header("X-Served-By", name)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = 128

    Server(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()

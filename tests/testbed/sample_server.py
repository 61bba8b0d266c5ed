"""Run by test_runner.py inside the test bed, with PORT forwarded from the host:
try to reach the host's OUTBOUND_PORT (``restrict=on`` must stop it), say how that
went, then answer one HTTP request on PORT with the result and exit.

``python tests/testbed/sample_server.py PORT OUTBOUND_PORT``
"""

import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

HOST_AS_SEEN_INSIDE = "10.0.2.2"   # QEMU user networking's gateway, the host's loopback


def outbound(port: int) -> str:
    try:
        socket.create_connection((HOST_AS_SEEN_INSIDE, port), timeout=5).close()
    except OSError:
        return "blocked"
    return "open"


def main() -> None:
    port, outbound_port = map(int, sys.argv[1:3])
    answer = f"served from the test bed; outbound {outbound(outbound_port)}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    with HTTPServer(("", port), Handler) as server:
        print(f"listening on {port}", flush=True)
        server.handle_request()


if __name__ == "__main__":
    main()

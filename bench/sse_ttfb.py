#!/usr/bin/env python3
"""Time to the first SSE event, through a chain or straight at the backend.

For each sample: connect (and finish the TLS handshake when the URL is https), then start the
clock, send `GET <path>` and stop the clock at the first `data:` byte of the event stream. The
connection set-up is outside the measured time, so what remains is the request and the first event
crossing every hop. The backend (`phoenix whoami`) sends the first event at once and the next one
`interval` ms later, so a proxy that buffers the stream shows up as a first byte that is late by
about that interval.

Usage: sse_ttfb.py URL SAMPLES [CAFILE]  ->  prints the median and p90 in microseconds
"""

import socket
import ssl
import statistics
import sys
import time
from urllib.parse import urlsplit


def sample(url, ctx) -> float:
    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if u.scheme == "https":
        sock = ctx.wrap_socket(sock, server_hostname=u.hostname)
    path = u.path + ("?" + u.query if u.query else "")
    req = f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nAccept: text/event-stream\r\n\r\n".encode()
    buf = b""
    t0 = time.perf_counter()
    sock.sendall(req)
    while b"data:" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"stream ended before the first event: {buf[:200]!r}")
        buf += chunk
    t1 = time.perf_counter()
    # Read the stream to its end (chunked terminator) before closing: a client that leaves in the
    # middle of a response costs every proxy its upstream connection, and the next sample would
    # measure a new upstream handshake instead of the stream.
    while not buf.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    sock.close()
    return (t1 - t0) * 1e6


def main() -> None:
    url, n = sys.argv[1], int(sys.argv[2])
    ctx = ssl.create_default_context(cafile=sys.argv[3] if len(sys.argv) > 3 else None)
    ctx.set_alpn_protocols(["http/1.1"])
    sample(url, ctx)  # warm-up: upstream pools, caches
    xs = sorted(sample(url, ctx) for _ in range(n))
    p90 = xs[min(len(xs) - 1, int(len(xs) * 0.9))]
    print(f"{statistics.median(xs):.0f} {p90:.0f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Open N idle TLS connections to a gateway and hold them.

Used by bench/run.sh to measure the gateway's memory with many idle clients: every connection
completes its TLS handshake (TLS 1.3 where offered) and then sends nothing. The script prints
"ready <opened> <failed>" on stdout once all attempts are done and keeps the connections open
until it is terminated (SIGTERM), or at most HOLD seconds (default 120) so it never lingers.

Usage: idle_conns.py HOST PORT SNI COUNT [PARALLEL] [HOLD]

The client does not verify the gateway's certificate: it measures the server's cost per
connection, and verification on this side would only slow the client down. Every hop the
benchmark measures (gateway -> mesh) verifies.
"""

import asyncio
import signal
import ssl
import sys


async def main() -> None:
    host, port, sni, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    parallel = int(sys.argv[5]) if len(sys.argv) > 5 else 100
    hold = float(sys.argv[6]) if len(sys.argv) > 6 else 120.0
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    gate = asyncio.Semaphore(parallel)
    writers = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with gate:
            try:
                _, w = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni), 30
                )
                writers.append(w)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(count)))
    print(f"ready {len(writers)} {failed}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), hold)
    except asyncio.TimeoutError:
        pass
    for w in writers:
        w.transport.abort()


if __name__ == "__main__":
    asyncio.run(main())

#!/usr/bin/env python3
"""New TLS connections, one request each, with full or with resumed handshakes.

Each connection makes a TLS 1.3 handshake (server name tls.bench, certificate not checked),
sends one GET with `Connection: close`, and reads the response to its end. Several processes
run at once, so the server always has handshakes to do.

In `full` mode no session is ever offered, so every handshake is a full one (wrk and h2load
resume when they reconnect, so they cannot measure this). In `resumed` mode each process
offers the session its previous connection was given (the ticket that came after its
handshake), as a returning browser does; the same client in both modes makes the two
figures comparable.

    tls_connections.py full|resumed PORT PATH SECONDS [PROCESSES]

Prints "requests/s p50_ms p99_ms connections resumed" on one line (benches/run.sh reads the
first four). Exits non-zero if any response is not a 200, or if in `resumed` mode fewer than
nine in ten handshakes resumed.
"""

import multiprocessing
import socket
import ssl
import sys
import time


def one_connection(context, port, request, session):
    """Returns (whether the answer was a 200, the session to offer next, whether it resumed)."""
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="tls.bench", session=session) as tls:
            tls.sendall(request)
            response = bytearray()
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                response += chunk
            # TLS 1.3 tickets come after the handshake; by the end of the response it has one.
            return response.startswith(b"HTTP/1.1 200"), tls.session, tls.session_reused


def client(mode, port, path, seconds, results):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    request = f"GET {path} HTTP/1.1\r\nHost: tls.bench\r\nConnection: close\r\n\r\n".encode()
    latencies, failures, resumed = [], 0, 0
    session = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            ok, next_session, reused = one_connection(context, port, request, session)
        except (OSError, ssl.SSLError):
            ok, next_session, reused = False, None, False
        if mode == "resumed":
            session = next_session
        if ok:
            latencies.append(time.monotonic() - started)
            resumed += reused
        else:
            failures += 1
    results.put((latencies, failures, resumed))


def main():
    mode = sys.argv[1]
    if mode not in ("full", "resumed"):
        sys.exit(f"mode must be full or resumed, not {mode!r}")
    port, path, seconds = int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    processes = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    results = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=client, args=(mode, port, path, seconds, results))
        for _ in range(processes)
    ]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    latencies, failures, resumed = [], 0, 0
    for _ in workers:
        some, failed, reused = results.get()
        latencies += some
        failures += failed
        resumed += reused
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started
    if failures:
        print(f"{failures} connections failed", file=sys.stderr)
    latencies.sort()

    def percentile(p):
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000

    print(len(latencies) / elapsed, percentile(0.50), percentile(0.99), len(latencies), resumed)
    # The first connection of each process has nothing to resume.
    too_few_resumed = mode == "resumed" and resumed < 0.9 * len(latencies) - processes
    if too_few_resumed:
        print(f"only {resumed} of {len(latencies)} handshakes resumed", file=sys.stderr)
    sys.exit(1 if failures or too_few_resumed else 0)


if __name__ == "__main__":
    main()

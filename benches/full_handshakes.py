#!/usr/bin/env python3
"""New TLS connections with full handshakes: no client ever offers a session to resume.

wrk and h2load both resume TLS sessions when they reconnect, so their new-connection figures
are for resumed handshakes. Each connection here makes a fresh TLS 1.3 handshake (server name
tls.bench, certificate not checked), sends one GET with `Connection: close`, and reads the
response to its end. Several processes run at once, so the server always has handshakes to do.

    full_handshakes.py PORT PATH SECONDS [PROCESSES]

Prints "requests/s p50_ms p99_ms connections" on one line (the format benches/run.sh reads).
Exits non-zero if any response is not a 200.
"""

import multiprocessing
import socket
import ssl
import sys
import time


def one_connection(context, port, request):
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="tls.bench") as tls:
            tls.sendall(request)
            response = bytearray()
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                response += chunk
    return response.startswith(b"HTTP/1.1 200")


def client(port, path, seconds, results):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # No session is ever passed to wrap_socket, so none is offered: every handshake is full.
    request = f"GET {path} HTTP/1.1\r\nHost: tls.bench\r\nConnection: close\r\n\r\n".encode()
    latencies, failures = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            ok = one_connection(context, port, request)
        except (OSError, ssl.SSLError):
            ok = False
        if ok:
            latencies.append(time.monotonic() - started)
        else:
            failures += 1
    results.put((latencies, failures))


def main():
    port, path, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    processes = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    results = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=client, args=(port, path, seconds, results))
        for _ in range(processes)
    ]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    latencies, failures = [], 0
    for _ in workers:
        some, failed = results.get()
        latencies += some
        failures += failed
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

    print(len(latencies) / elapsed, percentile(0.50), percentile(0.99), len(latencies))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

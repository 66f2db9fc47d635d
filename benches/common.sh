# Sourced by the benchmark scripts: a scratch directory with the upstream's files, removed at
# exit, and every process whose pid is added to PIDS stopped at exit.
WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
# Waits for the processes before removing their directory (nginx removes its pid file there).
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait "${PIDS[@]}" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/www"
head -c 1024 /dev/zero | tr '\0' 'a' > "$WORK/www/1k"
head -c 102400 /dev/zero | tr '\0' 'b' > "$WORK/www/100k"
echo ok > "$WORK/www/up"

# idle_clients PORT COUNT HOST READY_FILE: opens COUNT keep-alive connections to PORT, sends
# one GET /up for HOST on each, reads the responses, touches READY_FILE, then holds them all
# open (idle) for 10 minutes or until killed. Run it in the background: `exec` makes $! the
# client itself, so killing $! closes the connections.
idle_clients() {
  exec python3 - "$@" <<'PY'
import socket, sys, time, resource
port, count, host, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 100, count + 100))
conns = []
for i in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /up HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
    conns.append(s)
for s in conns:
    s.recv(4096)
open(ready, "w").close()
time.sleep(600)
PY
}

# idle_tls_clients PORT COUNT HOST READY_FILE: as idle_clients, over TLS (1.3, the server's
# certificate not checked, HOST as the server name): COUNT connections, one GET /up each, then
# held open and idle. Handshakes run 50 at a time.
idle_tls_clients() {
  exec python3 - "$@" <<'PY'
import asyncio, resource, ssl, sys, time
port, count, host, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 100, count + 100))
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
request = b"GET /up HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n"
async def one(gate, conns):
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=host)
        writer.write(request)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        conns.append((reader, writer))
async def main():
    gate, conns = asyncio.Semaphore(50), []
    await asyncio.gather(*[one(gate, conns) for _ in range(count)])
    open(ready, "w").close()
    await asyncio.sleep(600)
asyncio.run(main())
PY
}

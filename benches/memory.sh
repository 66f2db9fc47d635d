#!/usr/bin/env bash
# Memory only: resident memory of a fresh proxy with 100 services, then with 10,000 idle
# keep-alive connections (one request each) once they have gone quiet, and the cost per
# connection. Also how many of those connections the proxy parked (held without hyper's
# buffers). Quicker than run.sh for checking one change; run.sh prints the same rows.
#
#   benches/memory.sh                       # builds the release binary
#   PROXY=target/profiling/proxy benches/memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in nginx taskset python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install nginx-light curl" >&2; exit 1; }
done
if [ -z "${PROXY:-}" ]; then
  cargo build --release -q
  PROXY=$PWD/target/release/proxy
fi
UPSTREAM_PORT=18091 MEMORY_PORT=18094 METRICS_PORT=18095 COUNT=${COUNT:-10000}

# shellcheck source=benches/common.sh
. benches/common.sh
rss_kb() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }

common="daemon off; pid $WORK/upstream.pid; error_log stderr error; events { worker_connections 20000; }"
[ "$(id -u)" = 0 ] && common="user root; $common"
cat > "$WORK/upstream.conf" <<CONF
$common
worker_processes 1;
http { access_log off; keepalive_requests 1000000; server { listen 127.0.0.1:$UPSTREAM_PORT; root $WORK/www; } }
CONF
taskset -c 1 nginx -c "$WORK/upstream.conf" -e stderr & PIDS+=($!)

export HOME=$WORK/home KAMAL_PROXY_SOCKET=$WORK/proxy.sock
mkdir -p "$HOME"
TOKIO_WORKER_THREADS=1 taskset -c 0 "$PROXY" run --bind 127.0.0.1 --http-port $MEMORY_PORT \
  --https-port 18494 --metrics-port $METRICS_PORT > /dev/null 2>"${PROXY_STDERR:-/dev/null}" & PIDS+=($!)
PID=$!
for _ in $(seq 100); do [ -S "$KAMAL_PROXY_SOCKET" ] && break; sleep 0.05; done
for i in $(seq 1 100); do
  "$PROXY" deploy "svc$i" --target 127.0.0.1:$UPSTREAM_PORT --host "svc$i.bench" --health-check-interval=1s >/dev/null
done
sleep 3
RSS_100=$(rss_kb $PID)
idle_clients $MEMORY_PORT "$COUNT" svc1.bench "$WORK/idle.ready" &
IDLE_PID=$!; PIDS+=($IDLE_PID)
for _ in $(seq 600); do [ -f "$WORK/idle.ready" ] && break; sleep 0.1; done
sleep "${IDLE_WAIT:-8}"
RSS_IDLE=$(rss_kb $PID)
UPSTREAM_CONNECTIONS=$(ss -Htn state established "( dport = :$UPSTREAM_PORT )" | wc -l)
METRICS=$(curl -s "http://127.0.0.1:$METRICS_PORT/metrics")
parked=$(echo "$METRICS" | awk '/^berth_parked_client_connections /{print $2}')
open=$(echo "$METRICS" | awk '/^berth_client_connections /{print $2}')
kill $IDLE_PID
echo "| 100 services, idle | $RSS_100 KiB |"
echo "| $COUNT idle keep-alive connections, 8 s after their response | $RSS_IDLE KiB |"
echo "| per idle keep-alive connection | $(( (RSS_IDLE - RSS_100) * 1024 / COUNT )) bytes |"
echo "| connections open / parked | ${open:-?} / ${parked:-?} |"
echo "| pooled connections to the upstream | $UPSTREAM_CONNECTIONS |"

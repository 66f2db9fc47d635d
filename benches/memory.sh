#!/usr/bin/env bash
# Memory only: resident memory of a fresh proxy with 100 services, then with idle keep-alive
# connections (one request each) once they have gone quiet, and the cost per connection, over
# plain HTTP (10,000 connections) and over TLS 1.3 (3,000), for Berth and for nginx (one
# worker, no master process, so its one process holds every connection). Also how many of
# Berth's connections were parked (held without hyper's buffers). Quicker than run.sh for
# checking one change; run.sh prints Berth's plain rows too.
#
#   benches/memory.sh                       # builds the release binary
#   PROXY=target/profiling/proxy benches/memory.sh
#   COUNT=5000 TLS_COUNT=1000 benches/memory.sh
#   KAMAL_PROXY_BIN=../shared/peers/kamal-proxy benches/memory.sh   # kamal-proxy alongside
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in nginx taskset python3 curl openssl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install nginx-light curl openssl" >&2; exit 1; }
done
if [ -z "${PROXY:-}" ]; then
  cargo build --release -q
  PROXY=$PWD/target/release/proxy
fi
UPSTREAM_PORT=18091 MEMORY_PORT=18094 MEMORY_TLS_PORT=18494 METRICS_PORT=18095
NGINX_PORT=18096 NGINX_TLS_PORT=18496
COUNT=${COUNT:-10000} TLS_COUNT=${TLS_COUNT:-3000}
# Connections are parked after a quiet 1-2 s; the memory they freed goes back to the system
# at the allocator's next check.
IDLE_WAIT=${IDLE_WAIT:-8}

# shellcheck source=benches/common.sh
. benches/common.sh
rss_kb() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$WORK/tls-key.pem" -out "$WORK/tls-cert.pem" -subj "/CN=tls.bench" \
  -addext "subjectAltName=DNS:tls.bench" 2>/dev/null

common="daemon off; error_log stderr error; events { worker_connections 20000; }"
[ "$(id -u)" = 0 ] && common="user root; $common"
cat > "$WORK/upstream.conf" <<CONF
$common
pid $WORK/upstream.pid; worker_processes 1;
http { access_log off; keepalive_requests 1000000; server { listen 127.0.0.1:$UPSTREAM_PORT; root $WORK/www; } }
CONF
taskset -c 1 nginx -c "$WORK/upstream.conf" -e stderr & PIDS+=($!)
cat > "$WORK/nginx.conf" <<CONF
$common
pid $WORK/nginx.pid; master_process off; worker_processes 1; worker_rlimit_nofile 30000;
http {
  access_log /dev/null combined; keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; }
  ssl_certificate $WORK/tls-cert.pem; ssl_certificate_key $WORK/tls-key.pem;
  server { listen 127.0.0.1:$NGINX_PORT; listen 127.0.0.1:$NGINX_TLS_PORT ssl;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
CONF

# idle_rss PID PORT COUNT HOST KIND: sets BEFORE and AFTER to PID's resident memory (KiB),
# then again once COUNT idle KIND (plain or tls) connections to PORT have been quiet IDLE_WAIT s.
idle_rss() {
  local pid=$1 port=$2 count=$3 host=$4 kind=$5 clients
  BEFORE=$(rss_kb "$pid")
  rm -f "$WORK/idle.ready"
  if [ "$kind" = tls ]; then
    idle_tls_clients "$port" "$count" "$host" "$WORK/idle.ready" &
  else
    idle_clients "$port" "$count" "$host" "$WORK/idle.ready" &
  fi
  clients=$!
  for _ in $(seq 1200); do [ -f "$WORK/idle.ready" ] && break; sleep 0.1; done
  [ -f "$WORK/idle.ready" ] || { echo "the idle $kind clients did not connect" >&2; exit 1; }
  sleep "$IDLE_WAIT"
  AFTER=$(rss_kb "$pid")
  if [ "$pid" = "${BERTH:-}" ]; then
    local metrics
    metrics=$(curl -s "http://127.0.0.1:$METRICS_PORT/metrics")
    PARKED=$(echo "$metrics" | awk '/^berth_parked_client_connections /{print $2}')
    OPEN=$(echo "$metrics" | awk '/^berth_client_connections /{print $2}')
    UPSTREAM_CONNECTIONS=$(ss -Htn state established "( dport = :$UPSTREAM_PORT )" | wc -l)
  fi
  kill "$clients"
  wait "$clients" 2>/dev/null || true
}

# start_proxy NAME BIN: a fresh Berth (or, with KAMAL_PROXY_BIN, kamal-proxy: the same CLI)
# with 100 services, one of them over TLS; sets SUT to its pid.
start_proxy() {
  local name=$1 bin=$2 berth_only=()
  export HOME=$WORK/home-$name KAMAL_PROXY_SOCKET=$WORK/proxy-$name.sock
  mkdir -p "$HOME"
  # kamal-proxy has no --bind (it listens on every address); its metrics are not read here.
  [ "$bin" = "$PROXY" ] && berth_only=(--bind 127.0.0.1 --metrics-port $METRICS_PORT)
  TOKIO_WORKER_THREADS=1 GOMAXPROCS=1 taskset -c 0 "$bin" run --http-port $MEMORY_PORT \
    --https-port $MEMORY_TLS_PORT "${berth_only[@]}" > /dev/null 2>"${PROXY_STDERR:-/dev/null}" & PIDS+=($!)
  SUT=$!
  for _ in $(seq 200); do "$bin" list >/dev/null 2>&1 && break; sleep 0.05; done
  "$bin" deploy tls --target 127.0.0.1:$UPSTREAM_PORT --host tls.bench --health-check-interval=1s \
    --tls --tls-redirect=false --tls-certificate-path "$WORK/tls-cert.pem" \
    --tls-private-key-path "$WORK/tls-key.pem" >/dev/null
  for i in $(seq 1 99); do
    "$bin" deploy "svc$i" --target 127.0.0.1:$UPSTREAM_PORT --host "svc$i.bench" --health-check-interval=1s >/dev/null
  done
  sleep 3
}
stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

# Each measurement in a fresh process, so that what one left in the allocator is not counted
# in the next.
start_proxy plain "$PROXY"; BERTH=$SUT
RSS_100=$(rss_kb $BERTH)
idle_rss $BERTH $MEMORY_PORT "$COUNT" svc1.bench plain
BERTH_PLAIN=$(( (AFTER - BEFORE) * 1024 / COUNT ))
PLAIN_PARKED="$OPEN / $PARKED" PLAIN_UPSTREAM=$UPSTREAM_CONNECTIONS RSS_IDLE=$AFTER
stop $BERTH
start_proxy tls "$PROXY"; BERTH=$SUT
idle_rss $BERTH $MEMORY_TLS_PORT "$TLS_COUNT" tls.bench tls
BERTH_TLS=$(( (AFTER - BEFORE) * 1024 / TLS_COUNT ))
TLS_PARKED="$OPEN / $PARKED"
stop $BERTH
BERTH=
for kind in plain tls; do
  taskset -c 0 nginx -c "$WORK/nginx.conf" -e stderr & PIDS+=($!)
  NGINX=$!
  sleep 1
  if [ $kind = plain ]; then
    idle_rss $NGINX $NGINX_PORT "$COUNT" svc1.bench plain
    NGINX_PLAIN=$(( (AFTER - BEFORE) * 1024 / COUNT ))
  else
    idle_rss $NGINX $NGINX_TLS_PORT "$TLS_COUNT" tls.bench tls
    NGINX_TLS=$(( (AFTER - BEFORE) * 1024 / TLS_COUNT ))
  fi
  stop $NGINX
done
if [ -n "${KAMAL_PROXY_BIN:-}" ]; then
  start_proxy kamal-proxy-plain "$KAMAL_PROXY_BIN"
  idle_rss $SUT $MEMORY_PORT "$COUNT" svc1.bench plain
  KP_PLAIN=$(( (AFTER - BEFORE) * 1024 / COUNT ))
  stop $SUT
  start_proxy kamal-proxy-tls "$KAMAL_PROXY_BIN"
  idle_rss $SUT $MEMORY_TLS_PORT "$TLS_COUNT" tls.bench tls
  KP_TLS=$(( (AFTER - BEFORE) * 1024 / TLS_COUNT ))
  stop $SUT
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo "| 100 services, idle | $RSS_100 KiB |"
echo "| $COUNT idle keep-alive connections, $IDLE_WAIT s after their response | $RSS_IDLE KiB |"
echo
if [ -n "${KAMAL_PROXY_BIN:-}" ]; then
  echo "| per idle keep-alive connection | Berth | nginx | kamal-proxy | Berth ÷ nginx | Berth ÷ kamal-proxy | Berth's connections open / parked |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  echo "| plain HTTP/1.1 ($COUNT connections) | $BERTH_PLAIN bytes | $NGINX_PLAIN bytes | $KP_PLAIN bytes | $(ratio $BERTH_PLAIN $NGINX_PLAIN) | $(ratio $BERTH_PLAIN $KP_PLAIN) | $PLAIN_PARKED |"
  echo "| TLS 1.3, HTTP/1.1 ($TLS_COUNT connections) | $BERTH_TLS bytes | $NGINX_TLS bytes | $KP_TLS bytes | $(ratio $BERTH_TLS $NGINX_TLS) | $(ratio $BERTH_TLS $KP_TLS) | $TLS_PARKED |"
else
  echo "| per idle keep-alive connection | Berth | nginx | Berth ÷ nginx | Berth's connections open / parked |"
  echo "|---|---:|---:|---:|---:|"
  echo "| plain HTTP/1.1 ($COUNT connections) | $BERTH_PLAIN bytes | $NGINX_PLAIN bytes | $(ratio $BERTH_PLAIN $NGINX_PLAIN) | $PLAIN_PARKED |"
  echo "| TLS 1.3, HTTP/1.1 ($TLS_COUNT connections) | $BERTH_TLS bytes | $NGINX_TLS bytes | $(ratio $BERTH_TLS $NGINX_TLS) | $TLS_PARKED |"
fi
echo
echo "Berth's pooled connections to the upstream with the plain clients idle: $PLAIN_UPSTREAM"

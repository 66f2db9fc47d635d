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

# per_connection PID KIND PLAIN_PORT TLS_PORT: sets PER_CONNECTION to the bytes PID holds per
# idle KIND (plain or tls) connection, measured on the port for that kind.
per_connection() {
  local pid=$1 kind=$2 count=$COUNT port=$3 host=svc1.bench
  [ "$kind" = tls ] && count=$TLS_COUNT port=$4 host=tls.bench
  idle_rss "$pid" "$port" "$count" "$host" "$kind"
  PER_CONNECTION=$(( (AFTER - BEFORE) * 1024 / count ))
}

# Each measurement in a fresh process, so that what one left in the allocator is not counted
# in the next. Bytes per idle connection, by kind:
declare -A BERTH_BYTES NGINX_BYTES KP_BYTES OPEN_PARKED
for kind in plain tls; do
  start_proxy "berth-$kind" "$PROXY"; BERTH=$SUT
  [ $kind = plain ] && RSS_100=$(rss_kb $BERTH)
  per_connection $BERTH $kind $MEMORY_PORT $MEMORY_TLS_PORT
  BERTH_BYTES[$kind]=$PER_CONNECTION OPEN_PARKED[$kind]="$OPEN / $PARKED"
  [ $kind = plain ] && PLAIN_UPSTREAM=$UPSTREAM_CONNECTIONS RSS_IDLE=$AFTER
  stop $BERTH
  BERTH=

  taskset -c 0 nginx -c "$WORK/nginx.conf" -e stderr & PIDS+=($!)
  NGINX=$!
  sleep 1
  per_connection $NGINX $kind $NGINX_PORT $NGINX_TLS_PORT
  NGINX_BYTES[$kind]=$PER_CONNECTION
  stop $NGINX

  if [ -n "${KAMAL_PROXY_BIN:-}" ]; then
    start_proxy "kamal-proxy-$kind" "$KAMAL_PROXY_BIN"
    per_connection $SUT $kind $MEMORY_PORT $MEMORY_TLS_PORT
    KP_BYTES[$kind]=$PER_CONNECTION
    stop $SUT
  fi
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo "| 100 services, idle | $RSS_100 KiB |"
echo "| $COUNT idle keep-alive connections, $IDLE_WAIT s after their response | $RSS_IDLE KiB |"
echo
kp_header="" kp_rule=""
[ -n "${KAMAL_PROXY_BIN:-}" ] && kp_header=" kamal-proxy | Berth ÷ kamal-proxy |" kp_rule="---:|---:|"
echo "| per idle keep-alive connection | Berth | nginx | Berth ÷ nginx |$kp_header Berth's connections open / parked |"
echo "|---|---:|---:|---:|$kp_rule---:|"
for kind in plain tls; do
  label="plain HTTP/1.1 ($COUNT connections)"
  [ $kind = tls ] && label="TLS 1.3, HTTP/1.1 ($TLS_COUNT connections)"
  kp_cells=""
  [ -n "${KAMAL_PROXY_BIN:-}" ] && kp_cells=" ${KP_BYTES[$kind]} bytes | $(ratio ${BERTH_BYTES[$kind]} ${KP_BYTES[$kind]}) |"
  echo "| $label | ${BERTH_BYTES[$kind]} bytes | ${NGINX_BYTES[$kind]} bytes | $(ratio ${BERTH_BYTES[$kind]} ${NGINX_BYTES[$kind]}) |$kp_cells ${OPEN_PARKED[$kind]} |"
done
echo
echo "Berth's pooled connections to the upstream with the plain clients idle: $PLAIN_UPSTREAM"

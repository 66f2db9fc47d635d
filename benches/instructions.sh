#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind: Berth
# (unbuffered and buffered) and nginx, each proxying the same 1 KB GETs to the same upstream,
# over plain HTTP/1.1 and over TLS (HTTP/1.1 and HTTP/2, keep-alive; the handshakes are not
# counted: two runs of different lengths on the same 8 connections each, and the difference).
# Unlike requests/s on a shared machine, the count does not move with the neighbours' load, so
# it is how the hot-path changes in benches/RESULTS.md were compared. Kernel time is not
# counted (it is about the same for both proxies: the same five system calls per request).
# Needs: valgrind, h2load, nginx (apt-get install valgrind nghttp2-client nginx-light).
#
#   benches/instructions.sh           # 4000 requests per run
#   REQUESTS=20000 benches/instructions.sh
#   PROXY=/tmp/proxy-before benches/instructions.sh
#   KEEP_PROFILES=/tmp/profiles benches/instructions.sh   # keeps each run's profile, for
#                                        # callgrind_annotate --inclusive=yes /tmp/profiles/...
#   CACHE_SIM=1 benches/instructions.sh  # also simulated cache misses per request (valgrind's
#                                        # model of this CPU's caches): where equal instruction
#                                        # counts still cost different CPU time
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-4000}
CACHE_FLAG="${CALLGRIND_FLAGS:-}"
[ -n "${CACHE_SIM:-}" ] && CACHE_FLAG="$CACHE_FLAG --cache-sim=yes"
UPSTREAM_PORT=18091 NGINX_PORT=18092 BERTH_PORT=18093 NGINX_TLS_PORT=18094 BERTH_TLS_PORT=18493
for tool in valgrind callgrind_control h2load nginx openssl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install valgrind nghttp2-client nginx-light" >&2; exit 1; }
done
# Symbols for the report; otherwise the release build. PROXY=path measures that binary
# instead (another commit's, say, built and copied aside).
if [ -z "${PROXY:-}" ]; then
  cargo build --profile profiling -q
  PROXY=$PWD/target/profiling/proxy
fi

# shellcheck source=benches/common.sh
. benches/common.sh

common="daemon off; error_log stderr error; events { worker_connections 1024; }"
[ "$(id -u)" = 0 ] && common="user root; $common"
cat > "$WORK/upstream.conf" <<CONF
$common
pid $WORK/upstream.pid;
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UPSTREAM_PORT; root $WORK/www; } }
CONF
nginx -c "$WORK/upstream.conf" -e stderr & PIDS+=($!)
# The reference proxy: one process (no master), so callgrind sees the worker's instructions.
cat > "$WORK/proxy.conf" <<CONF
$common
pid $WORK/proxy.pid; master_process off; worker_processes 1;
http {
  access_log /dev/null combined; keepalive_requests 1000000;
  client_body_temp_path $WORK/b; proxy_temp_path $WORK/p;
  upstream app { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; }
  ssl_certificate $WORK/tls-cert.pem; ssl_certificate_key $WORK/tls-key.pem;
  ssl_protocols TLSv1.2 TLSv1.3;
  server { listen 127.0.0.1:$NGINX_PORT; listen 127.0.0.1:$NGINX_TLS_PORT ssl http2;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme; } }
}
CONF

# The certificate for the TLS rows (ECDSA P-256, as Let's Encrypt issues by default).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$WORK/tls-key.pem" -out "$WORK/tls-cert.pem" -subj "/CN=tls.bench" \
  -addext "subjectAltName=DNS:tls.bench" 2>/dev/null

# instructions PID [NAME] -> the instructions the process under callgrind ran since its
# counters were last zeroed. With a NAME, the summary line is kept as WORK/summary.NAME (for
# CACHE_SIM's table), and the profile as KEEP_PROFILES/NAME.callgrind when that is set.
instructions() {
  local pid=$1 name=${2:-} total
  callgrind_control -d "$pid" > /dev/null 2>&1
  sleep 1
  total=$(cat "$WORK"/cg."$pid".[0-9]* | awk '/^summary:/ { sum += $2 } END { print sum + 0 }')
  if [ -n "$name" ]; then
    grep -h "^summary:" "$WORK"/cg."$pid".[0-9]* > "$WORK/summary.$name"
    if [ -n "${KEEP_PROFILES:-}" ]; then
      mkdir -p "$KEEP_PROFILES" && cat "$WORK"/cg."$pid".[0-9]* > "$KEEP_PROFILES/$name.callgrind"
    fi
  fi
  rm -f "$WORK"/cg."$pid".[0-9]*
  echo "$total"
}

# count_tls PORT PID PROTOCOL NAME -> instructions per request over TLS (PROTOCOL h1, h2 with
# one stream per connection, or h2x16 with 16 at once, as benches/run.sh's row), on 8
# keep-alive connections. Every h2load run makes 8 new connections, so one of REQUESTS and
# one of 3 x REQUESTS requests are counted, and the difference divided by 2 x REQUESTS: what
# the handshakes cost cancels out. With KEEP_PROFILES, the longer run's profile is kept.
count_tls() {
  local port=$1 pid=$2 protocol=$3 name=$4 short long
  local args=(-c 8 -m 1 --connect-to="127.0.0.1:$port")
  [ "$protocol" = h1 ] && args+=(--h1)
  [ "$protocol" = h2x16 ] && args=(-c 8 -m 16 --connect-to="127.0.0.1:$port")
  run_tls() {
    h2load "${args[@]}" -n "$1" "https://tls.bench:$port/1k" | grep -q "$1 succeeded" \
      || { echo "TLS requests failed on port $port" >&2; exit 1; }
  }
  run_tls 400
  callgrind_control -z "$pid" > /dev/null 2>&1
  run_tls "$REQUESTS"
  short=$(instructions "$pid")
  callgrind_control -z "$pid" > /dev/null 2>&1
  run_tls $(( 3 * REQUESTS ))
  long=$(instructions "$pid" "$name")
  echo $(( (long - short) / (2 * REQUESTS) ))
}

# count PORT HOST PID -> prints the instructions per request of the process under callgrind
count() {
  local port=$1 host=$2 pid=$3
  h2load --h1 -n 400 -c 8 -H ":authority: $host" "http://127.0.0.1:$port/1k" > /dev/null
  callgrind_control -z "$pid" > /dev/null 2>&1
  h2load --h1 -n "$REQUESTS" -c 8 -H ":authority: $host" "http://127.0.0.1:$port/1k" \
    | grep -q "$REQUESTS succeeded" || { echo "requests failed on port $port" >&2; exit 1; }
  local total
  total=$(instructions "$pid" "$host")
  echo $(( total / REQUESTS ))
}

wait_for_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; }

valgrind --tool=callgrind $CACHE_FLAG --callgrind-out-file="$WORK/cg.%p" nginx -c "$WORK/proxy.conf" -e stderr 2>/dev/null &
NGINX_PID=$!; PIDS+=($NGINX_PID)
wait_for_port $NGINX_PORT
nginx_count=$(count $NGINX_PORT up.bench $NGINX_PID)
nginx_tls_h1=$(count_tls $NGINX_TLS_PORT $NGINX_PID h1 nginx-tls-h1)
nginx_tls_h2=$(count_tls $NGINX_TLS_PORT $NGINX_PID h2 nginx-tls-h2)
nginx_tls_h2x16=$(count_tls $NGINX_TLS_PORT $NGINX_PID h2x16 nginx-tls-h2x16)
kill $NGINX_PID; sleep 1

export HOME=$WORK/home KAMAL_PROXY_SOCKET=$WORK/proxy.sock
mkdir -p "$HOME"
TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind $CACHE_FLAG --callgrind-out-file="$WORK/cg.%p" "$PROXY" run \
  --bind 127.0.0.1 --http-port $BERTH_PORT --https-port $BERTH_TLS_PORT > /dev/null 2>&1 &
BERTH_PID=$!; PIDS+=($BERTH_PID)
for _ in $(seq 300); do [ -S "$KAMAL_PROXY_SOCKET" ] && break; sleep 0.1; done
"$PROXY" deploy plain --target 127.0.0.1:$UPSTREAM_PORT --host plain.bench --health-check-interval=10s > /dev/null
"$PROXY" deploy buffered --target 127.0.0.1:$UPSTREAM_PORT --host buffered.bench \
  --health-check-interval=10s --buffer-requests --buffer-responses > /dev/null
plain_count=$(count $BERTH_PORT plain.bench $BERTH_PID)
buffered_count=$(count $BERTH_PORT buffered.bench $BERTH_PID)
# Over TLS with Kamal's defaults for a TLS service (buffering on), as benches/run.sh.
"$PROXY" deploy tls --target 127.0.0.1:$UPSTREAM_PORT --host tls.bench --health-check-interval=10s \
  --tls --tls-redirect=false --tls-certificate-path "$WORK/tls-cert.pem" \
  --tls-private-key-path "$WORK/tls-key.pem" --buffer-requests --buffer-responses > /dev/null
berth_tls_h1=$(count_tls $BERTH_TLS_PORT $BERTH_PID h1 berth-tls-h1)
berth_tls_h2=$(count_tls $BERTH_TLS_PORT $BERTH_PID h2 berth-tls-h2)
berth_tls_h2x16=$(count_tls $BERTH_TLS_PORT $BERTH_PID h2x16 berth-tls-h2x16)

echo "### User-space instructions per proxied 1 KB GET (callgrind, $REQUESTS requests, 8 connections)"
echo
echo "| proxy | instructions/request | vs nginx |"
echo "|---|---:|---:|"
for row in "berth (unbuffered) $plain_count" "berth (buffered, Kamal's default) $buffered_count" "nginx $nginx_count"; do
  name=${row% *}; value=${row##* }
  echo "| $name | $value | $(python3 -c "print(f'{$value/$nginx_count:.2f}')") |"
done
echo
echo "### Over TLS: user-space instructions per proxied 1 KB GET, keep-alive (handshakes not counted)"
echo
echo "| proxy | HTTP/1.1 | vs nginx | HTTP/2, 1 stream per connection | vs nginx | HTTP/2, 16 streams per connection | vs nginx |"
echo "|---|---:|---:|---:|---:|---:|---:|"
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
echo "| berth (buffered, Kamal's default) | $berth_tls_h1 | $(ratio $berth_tls_h1 $nginx_tls_h1) | $berth_tls_h2 | $(ratio $berth_tls_h2 $nginx_tls_h2) | $berth_tls_h2x16 | $(ratio $berth_tls_h2x16 $nginx_tls_h2x16) |"
echo "| nginx | $nginx_tls_h1 | 1.00 | $nginx_tls_h2 | 1.00 | $nginx_tls_h2x16 | 1.00 |"

if [ -n "${CACHE_SIM:-}" ]; then
  echo
  echo "### Simulated cache misses and data accesses per request (callgrind --cache-sim=yes)"
  echo
  echo "| proxy | data reads | data writes | L1 instruction misses | L1 data read misses | L1 data write misses |"
  echo "|---|---:|---:|---:|---:|---:|"
  for row in "berth (unbuffered):plain.bench" "berth (buffered, Kamal's default):buffered.bench" "nginx:up.bench"; do
    name=${row%%:*}; host=${row##*:}
    # summary: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
    awk -v name="$name" -v n="$REQUESTS" '{ printf "| %s | %d | %d | %d | %d | %d |\n", name, $3/n, $4/n, $5/n, $6/n, $7/n }' "$WORK/summary.$host"
  done
fi

#!/usr/bin/env bash
# Load benchmark: the upstream direct, Berth unbuffered, Berth with Kamal's buffering, and
# nginx as an equivalent keep-alive reverse proxy, with the same load generator and settings
# (in the 1 KB keep-alive rows also the same nginx adding the headers kamal-proxy adds).
# Prints requests/s, p50 and p99 latency, the proxy's CPU time per request, how busy the load
# generator's core was (near 100%, it was the limit, not the proxy) and the ratios to the
# direct run and to nginx, for plain HTTP and HTTPS (keep-alive, and a new TLS connection per
# request: resumed by wrk, full and resumed handshakes by benches/tls_connections.py, and by
# openssl s_time over TLS 1.3 and TLS 1.2; h2load's keep-alive rows and the s_time rows also
# with each proxy capped at CPU_CAP_PERCENT (default 10) % of its core so that the proxy is
# the limit), then
# memory and deploy figures. Loopback only. Needs: wrk, nginx (apt-get install wrk nginx-light).
#
# Each contender is measured ROUNDS times, the contenders taking turns, and the median run
# is reported: on a shared machine the same binary's throughput moves by a third from one
# minute to the next, and taking turns spreads that drift over all contenders alike.
#
#   benches/run.sh                          # 3 rounds of 5 s runs
#   ROUNDS=5 DURATION=10s benches/run.sh    # longer, steadier
#   KAMAL_PROXY_BIN=../shared/peers/kamal-proxy benches/run.sh   # kamal-proxy alongside
#   BASELINE_BIN=/tmp/proxy-before ONLY=plain benches/run.sh      # another build of Berth
#       alongside, in turns with this one (a change measured against its parent), and only
#       the plain 1 KB GET row
#   BASELINE_BIN=/tmp/proxy-before ONLY=https benches/run.sh      # the same, for the
#       HTTPS keep-alive rows (wrk HTTP/1.1, h2load HTTP/2 and HTTP/1.1, and h2load again
#       with each proxy capped)
#   BASELINE_BIN=/tmp/proxy-before ONLY=connections benches/run.sh  # the same, for the rows
#       of new TLS connections
#
# The HTTP/2 and HTTP/1.1-over-TLS rows use h2load (apt-get install nghttp2-client).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
UPSTREAM_PORT=18081 NGINX_PROXY_PORT=18082 BERTH_PORT=18083 BERTH_TLS_PORT=18443
NGINX_TLS_PORT=18085 NGINX_SAME_HEADERS_PORT=18089 NGINX_SAME_HEADERS_TLS_PORT=18090
# The proxy under test gets CPU 0 and one worker; wrk and the upstream share CPU 1.
SUT_CPU=0 LOAD_CPU=1

for tool in wrk nginx taskset python3 openssl h2load curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install wrk nginx-light openssl nghttp2-client curl" >&2; exit 1; }
done
KAMAL_PROXY_BIN=${KAMAL_PROXY_BIN:-}
KP_PORT=18086 KP_TLS_PORT=18446
BASELINE_BIN=${BASELINE_BIN:-}
BASELINE_PORT=18088 BASELINE_TLS_PORT=18448
ONLY=${ONLY:-}
case "$ONLY" in ""|plain|https|connections) ;; *) echo "ONLY=$ONLY: the subsets are ONLY=plain, ONLY=https and ONLY=connections (benches/memory.sh has the memory rows)" >&2; exit 1 ;; esac
# PROXY=path measures that build instead of this checkout's release build.
if [ -z "${PROXY:-}" ]; then
  cargo build --release -q
  PROXY=$PWD/target/release/proxy
fi

# shellcheck source=benches/common.sh
. benches/common.sh

# --- the upstream: nginx serving fixed bodies ---------------------------------------------
common="daemon off; pid PIDFILE; error_log stderr error; events { worker_connections 20000; }"
[ "$(id -u)" = 0 ] && common="user root; $common"
cat > "$WORK/upstream.conf" <<CONF
${common//PIDFILE/$WORK/upstream.pid}
worker_processes 1;
http {
  access_log off; keepalive_requests 1000000; client_body_temp_path $WORK/body;
  server {
    listen 127.0.0.1:$UPSTREAM_PORT reuseport;
    root $WORK/www;
    location = /post { client_max_body_size 10m; client_body_buffer_size 1m; return 200 "ok\n"; }
  }
}
CONF
taskset -c $LOAD_CPU nginx -c "$WORK/upstream.conf" -e stderr & PIDS+=($!)

# A certificate for the HTTPS rows (ECDSA P-256, as Let's Encrypt issues by default).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$WORK/tls-key.pem" -out "$WORK/tls-cert.pem" -subj "/CN=tls.bench" \
  -addext "subjectAltName=DNS:tls.bench,IP:127.0.0.1" 2>/dev/null

# --- nginx as the reference reverse proxy ---------------------------------------------------
# What both of its servers do for a request (single quotes: nginx's variables stay as written).
proxy_to_app='proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;'
cat > "$WORK/nginx-proxy.conf" <<CONF
${common//PIDFILE/$WORK/proxy.pid}
worker_processes 1;
http {
    # Logs every request, as Berth does (both to /dev/null here).
  access_log /dev/null combined; keepalive_requests 1000000; client_body_temp_path $WORK/body2; proxy_temp_path $WORK/proxy_temp;
  upstream app { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; }
  ssl_certificate $WORK/tls-cert.pem; ssl_certificate_key $WORK/tls-key.pem;
  # nginx's default from 1.23.4 on, as production nginx speaks it. Debian 12's 1.22 defaults
  # to TLS 1.2 at most, whose resumption skips the key exchange that TLS 1.3's still does:
  # with it, nginx's new-connection figures were for a cheaper handshake than Berth's.
  ssl_protocols TLSv1.2 TLSv1.3;
  client_max_body_size 10m;
  server {
    listen 127.0.0.1:$NGINX_PROXY_PORT;
    listen 127.0.0.1:$NGINX_TLS_PORT ssl;
    location / {
      $proxy_to_app
    }
  }
  # The same proxy, also adding the headers kamal-proxy (so Berth) adds for the app, within a
  # few bytes: the upstream then parses the same ~280-byte request behind both. The "nginx,
  # kamal-proxy's headers" rows; the ratios stay against the server above.
  server {
    listen 127.0.0.1:$NGINX_SAME_HEADERS_PORT;
    listen 127.0.0.1:$NGINX_SAME_HEADERS_TLS_PORT ssl;
    location / {
      $proxy_to_app
      proxy_set_header X-Forwarded-Host \$http_host; proxy_set_header X-Request-Start "t=\${msec}";
      proxy_set_header X-Request-ID \$request_id; proxy_set_header X-Kamal-Target 127.0.0.1:$UPSTREAM_PORT;
    }
  }
}
CONF
taskset -c $SUT_CPU nginx -c "$WORK/nginx-proxy.conf" -e stderr & PIDS+=($!)
NGINX_MASTER=$!

# --- Berth ----------------------------------------------------------------------------------
export HOME=$WORK/home KAMAL_PROXY_SOCKET=$WORK/proxy.sock
mkdir -p "$HOME"
BERTH_METRICS_PORT=18087
TOKIO_WORKER_THREADS=1 taskset -c $SUT_CPU "$PROXY" run --bind 127.0.0.1 --http-port $BERTH_PORT \
  --https-port $BERTH_TLS_PORT --metrics-port $BERTH_METRICS_PORT > /dev/null 2>&1 & PIDS+=($!)
BERTH_PID=$!
for _ in $(seq 100); do [ -S "$KAMAL_PROXY_SOCKET" ] && break; sleep 0.05; done
until curl -sf "http://127.0.0.1:$UPSTREAM_PORT/up" >/dev/null; do sleep 0.05; done
rss_kb() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }

"$PROXY" deploy plain --target 127.0.0.1:$UPSTREAM_PORT --host plain.bench --health-check-interval=100ms
"$PROXY" deploy buffered --target 127.0.0.1:$UPSTREAM_PORT --host buffered.bench --health-check-interval=100ms \
  --buffer-requests --buffer-responses
"$PROXY" deploy tls --target 127.0.0.1:$UPSTREAM_PORT --host tls.bench --health-check-interval=100ms \
  --tls --tls-redirect=false --tls-certificate-path "$WORK/tls-cert.pem" \
  --tls-private-key-path "$WORK/tls-key.pem" --buffer-requests --buffer-responses

# --- another build of Berth, when given: the plain and TLS services, the same core --------
BASELINE_PID=""
if [ -n "$BASELINE_BIN" ]; then
  mkdir -p "$WORK/home-baseline"
  HOME=$WORK/home-baseline KAMAL_PROXY_SOCKET=$WORK/baseline.sock TOKIO_WORKER_THREADS=1 \
    taskset -c $SUT_CPU "$BASELINE_BIN" run --bind 127.0.0.1 --http-port $BASELINE_PORT \
    --https-port $BASELINE_TLS_PORT > /dev/null 2>&1 & PIDS+=($!)
  BASELINE_PID=$!
  for _ in $(seq 100); do [ -S "$WORK/baseline.sock" ] && break; sleep 0.05; done
  HOME=$WORK/home-baseline KAMAL_PROXY_SOCKET=$WORK/baseline.sock "$BASELINE_BIN" deploy plain \
    --target 127.0.0.1:$UPSTREAM_PORT --host plain.bench --health-check-interval=100ms >/dev/null
  HOME=$WORK/home-baseline KAMAL_PROXY_SOCKET=$WORK/baseline.sock "$BASELINE_BIN" deploy tls \
    --target 127.0.0.1:$UPSTREAM_PORT --host tls.bench --health-check-interval=100ms \
    --tls --tls-redirect=false --tls-certificate-path "$WORK/tls-cert.pem" \
    --tls-private-key-path "$WORK/tls-key.pem" --buffer-requests --buffer-responses >/dev/null
fi

# --- kamal-proxy, when given: the same services, one core, GOMAXPROCS=1 -------------------
KP_PID=""
if [ -n "$KAMAL_PROXY_BIN" ]; then
  KP_HOME=$WORK/home-kamal-proxy
  mkdir -p "$KP_HOME"
  kp() { HOME=$KP_HOME KAMAL_PROXY_SOCKET=$KP_HOME/kamal-proxy.sock "$KAMAL_PROXY_BIN" "$@"; }
  GOMAXPROCS=1 HOME=$KP_HOME KAMAL_PROXY_SOCKET=$KP_HOME/kamal-proxy.sock taskset -c $SUT_CPU \
    "$KAMAL_PROXY_BIN" run --http-port $KP_PORT --https-port $KP_TLS_PORT > "$WORK/kamal-proxy.log" 2>&1 & PIDS+=($!)
  KP_PID=$!
  for _ in $(seq 200); do kp list >/dev/null 2>&1 && break; sleep 0.05; done
  kp list >/dev/null 2>&1 || { echo "kamal-proxy did not start:" >&2; cat "$WORK/kamal-proxy.log" >&2; exit 1; }
  kp deploy plain --target 127.0.0.1:$UPSTREAM_PORT --host plain.bench --health-check-interval=100ms >/dev/null
  kp deploy buffered --target 127.0.0.1:$UPSTREAM_PORT --host buffered.bench --health-check-interval=100ms \
    --buffer-requests --buffer-responses >/dev/null
  kp deploy tls --target 127.0.0.1:$UPSTREAM_PORT --host tls.bench --health-check-interval=100ms \
    --tls --tls-redirect=false --tls-certificate-path "$WORK/tls-cert.pem" \
    --tls-private-key-path "$WORK/tls-key.pem" --buffer-requests --buffer-responses >/dev/null
fi

cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 102400)
wrk.headers["Content-Type"] = "application/octet-stream"
LUA

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# How busy the load generator's core was while a run measured: load_core_mark before,
# load_core_busy after prints the percentage. Near 100, the load generator and the upstream
# were the limit and requests/s say little about the proxy (its CPU per request still does).
load_core_ticks() { awk -v cpu="cpu$LOAD_CPU" '$1 == cpu { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
load_core_mark() { LOAD_MARK=$(load_core_ticks); }
load_core_busy() {
  local busy_before all_before busy all
  read -r busy_before all_before <<< "$LOAD_MARK"
  read -r busy all <<< "$(load_core_ticks)"
  awk -v busy=$((busy - busy_before)) -v all=$((all - all_before)) 'BEGIN { print all ? 100 * busy / all : "nan" }'
}
# nginx's one worker (the master only supervises it): the process whose CPU time counts.
until NGINX_PID=$(pgrep -P "$NGINX_MASTER" nginx | head -1) && [ -n "$NGINX_PID" ]; do sleep 0.05; done

# run NAME PORT HOST PATH [SCRIPT [SCHEME [HEADER [PID]]]] -> "rps p50_ms p99_ms cpu_us_per_request
# load_core_busy_percent"
# PID, when given, is the proxy whose CPU time (user + system) is divided by the requests.
run() {
  local port=$2 host=$3 path=$4 script=${5:-} scheme=${6:-http} header=${7:-} pid=${8:-}
  local args=(-t1 -c"$CONNECTIONS" -d"$DURATION" --latency -H "Host: $host")
  [ -n "$script" ] && args+=(-s "$script")
  [ -n "$header" ] && args+=(-H "$header")
    # A short unmeasured run first, so every contender is measured warm (pools filled).
  taskset -c $LOAD_CPU wrk "${args[@]/#-d$DURATION/-d2s}" "$scheme://127.0.0.1:$port$path" > /dev/null 2>&1
  local before=0
  [ -n "$pid" ] && before=$(cpu_ticks "$pid")
  load_core_mark
  taskset -c $LOAD_CPU wrk "${args[@]}" "$scheme://127.0.0.1:$port$path" > "$WORK/wrk.out" 2>&1
  local load ticks=nan
  load=$(load_core_busy)
  [ -n "$pid" ] && ticks=$(( $(cpu_ticks "$pid") - before ))
  python3 - "$WORK/wrk.out" "$ticks" "$(getconf CLK_TCK)" "$load" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
ticks, hz = float(sys.argv[2]), float(sys.argv[3])
def ms(label):
    m = re.search(r"^\s*%s%%\s+([\d.]+)(us|ms|s)\s*$" % label, text, re.M)
    if not m: return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
total = re.search(r"(\d+) requests in", text)
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
socket_errors = re.search(r"Socket errors: (.*)", text)
if errors or socket_errors:
    print("errors in run:", errors.group(0) if errors else "", socket_errors.group(0) if socket_errors else "", file=sys.stderr)
cpu = ticks / hz * 1e6 / float(total.group(1)) if total and ticks == ticks else float("nan")
print(rps.group(1) if rps else "nan", ms("50"), ms("99"), cpu, sys.argv[4])
PY
}

report() {
  local title=$1 path=$2 script=${3:-}
  local direct="" plain="" baseline="" buffered="" kamal="" same_headers="" nginx=""
  for _ in $(seq "$ROUNDS"); do
    direct+="$(run direct $UPSTREAM_PORT up.bench "$path" "$script");"
    plain+="$(run berth $BERTH_PORT plain.bench "$path" "$script" http "" $BERTH_PID);"
    [ -n "$BASELINE_PID" ] && baseline+="$(run baseline $BASELINE_PORT plain.bench "$path" "$script" http "" $BASELINE_PID);"
    buffered+="$(run berth-buffered $BERTH_PORT buffered.bench "$path" "$script" http "" $BERTH_PID);"
    [ -n "$KP_PID" ] && kamal+="$(run kamal-proxy $KP_PORT buffered.bench "$path" "$script" http "" $KP_PID);"
    [ "$path" = /1k ] && same_headers+="$(run nginx-same-headers $NGINX_SAME_HEADERS_PORT up.bench "$path" "$script" http "" $NGINX_PID);"
    nginx+="$(run nginx $NGINX_PROXY_PORT up.bench "$path" "$script" http "" $NGINX_PID);"
  done
  local rows=("direct to upstream|$direct" "berth (unbuffered)|$plain")
  [ -n "$BASELINE_PID" ] && rows+=("baseline berth, $BASELINE_BIN (unbuffered)|$baseline")
  rows+=("berth (buffered, Kamal's default)|$buffered")
  [ -n "$KP_PID" ] && rows+=("kamal-proxy (buffered)|$kamal")
  [ -n "$same_headers" ] && rows+=("nginx, adding kamal-proxy's headers|$same_headers")
  table "$title" "${rows[@]}" "nginx|$nginx"
}

# report_tls TITLE PATH [HEADER]: Berth (Kamal's buffering) and nginx over HTTPS, with wrk.
# Not kamal-proxy: wrk sends the URL's IP address as the server name, which kamal-proxy
# refuses (Berth, like rustls, ignores an IP address there); the h2load rows name the host.
report_tls() {
  local title=$1 path=$2 header=${3:-}
  local berth="" baseline="" same_headers="" nginx=""
  for _ in $(seq "$ROUNDS"); do
    berth+="$(run berth-tls $BERTH_TLS_PORT tls.bench "$path" "" https "$header" $BERTH_PID);"
    [ -n "$BASELINE_PID" ] && baseline+="$(run baseline-tls $BASELINE_TLS_PORT tls.bench "$path" "" https "$header" $BASELINE_PID);"
    # Keep-alive only: behind a new TLS connection per request, the headers are noise.
    [ -z "$header" ] && same_headers+="$(run nginx-same-headers-tls $NGINX_SAME_HEADERS_TLS_PORT tls.bench "$path" "" https "" $NGINX_PID);"
    nginx+="$(run nginx-tls $NGINX_TLS_PORT tls.bench "$path" "" https "$header" $NGINX_PID);"
  done
  local rows=("berth (buffered, Kamal's default)|$berth")
  [ -n "$BASELINE_PID" ] && rows+=("baseline berth, $BASELINE_BIN (buffered)|$baseline")
  [ -n "$same_headers" ] && rows+=("nginx, adding kamal-proxy's headers|$same_headers")
  table "$title" "${rows[@]}" "nginx|$nginx"
}

# run_h2load NAME PORT PATH PROTOCOL PID -> "rps p50_ms p99_ms cpu_us_per_request", from
# h2load over TLS: PROTOCOL h2 (8 connections x 16 streams) or http/1.1 (32 connections).
# Percentiles come from h2load's per-request log. The URL names tls.bench (the server name
# sent) and --connect-to the proxy's address.
run_h2load() {
  local port=$2 path=$3 protocol=$4 pid=$5
  local args=(-c8 -m16)
  [ "$protocol" = "http/1.1" ] && args=(-c32 -m1 --h1)
  local seconds=${DURATION%s}
  args+=(--connect-to="127.0.0.1:$port")
  taskset -c $LOAD_CPU h2load "${args[@]}" -D 2 "https://tls.bench:$port$path" > /dev/null 2>&1
  local before
  before=$(cpu_ticks "$pid")
  load_core_mark
  taskset -c $LOAD_CPU h2load "${args[@]}" -D "$seconds" \
    --log-file="$WORK/h2load.log" "https://tls.bench:$port$path" > "$WORK/h2load.out" 2>&1
  local load ticks
  load=$(load_core_busy)
  ticks=$(( $(cpu_ticks "$pid") - before ))
  python3 - "$WORK/h2load.out" "$WORK/h2load.log" "$ticks" "$(getconf CLK_TCK)" "$load" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
ticks, hz = float(sys.argv[3]), float(sys.argv[4])
rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
if not done or int(done.group(3)) or int(done.group(4)) or (status and (int(status.group(3)) or int(status.group(4)))):
    print("errors in h2load run:", done.group(0) if done else text[-300:], status.group(0) if status else "", file=sys.stderr)
times = sorted(int(line.split()[2]) for line in open(sys.argv[2]) if line.strip())
def pct(p):
    return times[min(len(times) - 1, int(len(times) * p))] / 1000 if times else float("nan")
count = int(done.group(1)) if done else 0
cpu = ticks / hz * 1e6 / count if count else float("nan")
print(rps.group(1) if rps else "nan", pct(0.50), pct(0.99), cpu, sys.argv[5])
PY
}

# report_h2load TITLE PATH PROTOCOL: the same path through each proxy with h2load.
report_h2load() {
  local title=$1 path=$2 protocol=$3
  local berth="" baseline="" kamal="" same_headers="" nginx=""
  for _ in $(seq "$ROUNDS"); do
    berth+="$(run_h2load berth $BERTH_TLS_PORT "$path" "$protocol" $BERTH_PID);"
    [ -n "$BASELINE_PID" ] && baseline+="$(run_h2load baseline $BASELINE_TLS_PORT "$path" "$protocol" $BASELINE_PID);"
    [ -n "$KP_PID" ] && kamal+="$(run_h2load kamal-proxy $KP_TLS_PORT "$path" "$protocol" $KP_PID);"
    same_headers+="$(run_h2load nginx-same-headers $NGINX_SAME_HEADERS_TLS_PORT "$path" "$protocol" $NGINX_PID);"
    nginx+="$(run_h2load nginx $NGINX_TLS_PORT "$path" "$protocol" $NGINX_PID);"
  done
  local rows=("berth (buffered, Kamal's default)|$berth")
  [ -n "$BASELINE_PID" ] && rows+=("baseline berth, $BASELINE_BIN (buffered)|$baseline")
  [ -n "$KP_PID" ] && rows+=("kamal-proxy (buffered)|$kamal")
  rows+=("nginx, adding kamal-proxy's headers|$same_headers")
  table "$title" "${rows[@]}" "nginx|$nginx"
}

# run_h2load_at PATH PROTOCOL PORT PID: run_h2load with the port and pid last, for report_each.
run_h2load_at() { run_h2load h2load "$3" "$1" "$2" "$4"; }

# run_tls_connections MODE PATH PORT PID -> "rps p50_ms p99_ms cpu_us_per_request load": new TLS
# connections, one request each, by benches/tls_connections.py (4 client processes) in MODE:
# `full` (no client resumes) or `resumed` (each offers the session of its last connection).
run_tls_connections() {
  local mode=$1 path=$2 port=$3 pid=$4
  local seconds=${DURATION%s}
  taskset -c $LOAD_CPU python3 benches/tls_connections.py "$mode" "$port" "$path" 1 > /dev/null
  local before
  before=$(cpu_ticks "$pid")
  load_core_mark
  local rps p50 p99 count
  read -r rps p50 p99 count _ <<< "$(taskset -c $LOAD_CPU python3 benches/tls_connections.py "$mode" "$port" "$path" "$seconds")"
  local load ticks
  load=$(load_core_busy)
  ticks=$(( $(cpu_ticks "$pid") - before ))
  python3 -c "import sys; t, hz, n = map(float, sys.argv[1:4]); print('$rps $p50 $p99', t / hz * 1e6 / n if n else float('nan'), sys.argv[4])" \
    "$ticks" "$(getconf CLK_TCK)" "$count" "$load"
}

# report_each TITLE RUNNER ARGS...: a row per proxy (Berth, the baseline build and
# kamal-proxy when given, nginx), each measured ROUNDS times, the proxies taking turns, by
# `RUNNER ARGS... PORT PID` with that proxy's TLS port and the pid whose CPU time counts.
report_each() {
  local title=$1
  shift
  local berth="" baseline="" kamal="" nginx=""
  for _ in $(seq "$ROUNDS"); do
    berth+="$("$@" $BERTH_TLS_PORT $BERTH_PID);"
    [ -n "$BASELINE_PID" ] && baseline+="$("$@" $BASELINE_TLS_PORT $BASELINE_PID);"
    [ -n "$KP_PID" ] && kamal+="$("$@" $KP_TLS_PORT $KP_PID);"
    nginx+="$("$@" $NGINX_TLS_PORT $NGINX_PID);"
  done
  local rows=("berth (buffered, Kamal's default)|$berth")
  [ -n "$BASELINE_PID" ] && rows+=("baseline berth, $BASELINE_BIN (buffered)|$baseline")
  [ -n "$KP_PID" ] && rows+=("kamal-proxy (buffered)|$kamal")
  table "$title" "${rows[@]}" "nginx|$nginx"
}

# run_s_time MODE VERSION PORT PID -> "rps nan nan cpu_us_per_connection load": new TLS connections,
# one HTTP/1.0 GET each, by 4 openssl s_time processes: MODE -new (every handshake full) or
# -reuse (every connection offers the first one's session), VERSION -tls1_3 or -tls1_2. s_time
# sends "GET <page> HTTP/1.0" and no Host, so the page carries one (and no server name, which
# all three proxies accept with one certificate). No latencies: s_time reports none.
run_s_time() {
  local mode=$1 version=$2 port=$3 pid=$4
  local seconds=${DURATION%s}
  local page=$'/1k HTTP/1.0\r\nHost: tls.bench\r\nX-Padding:'
  local clients=() before ticks started
  taskset -c $LOAD_CPU openssl s_time -connect "127.0.0.1:$port" "$mode" "$version" -time 1 -www "$page" > /dev/null 2>&1
  before=$(cpu_ticks "$pid")
  load_core_mark
  started=$(date +%s%N)
  for i in 1 2 3 4; do
    taskset -c $LOAD_CPU openssl s_time -connect "127.0.0.1:$port" "$mode" "$version" \
      -time "$seconds" -www "$page" > "$WORK/s_time.$i" 2>&1 & clients+=($!)
  done
  wait "${clients[@]}"
  local load
  load=$(load_core_busy)
  ticks=$(( $(cpu_ticks "$pid") - before ))
  # The rate is over the time measured here: s_time's own is in whole seconds.
  python3 - "$ticks" "$(getconf CLK_TCK)" "$(( $(date +%s%N) - started ))" "$load" "$WORK"/s_time.? <<'PY'
import re, sys
ticks, hz, seconds = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]) / 1e9
count = 0
for name in sys.argv[5:]:
    text = open(name).read()
    # The last "N connections in S real seconds, B bytes read per connection" is the timed run.
    runs = re.findall(r"(\d+) connections in [\d.]+ real seconds, (\d+) bytes read per connection", text)
    if not runs or int(runs[-1][1]) < 1024:
        print(f"s_time did not fetch the page: {text[-300:]}", file=sys.stderr)
        continue
    count += int(runs[-1][0])
cpu = ticks / hz * 1e6 / count if count else float("nan")
print(count / seconds, "nan nan", cpu, sys.argv[4])
PY
}

# --- a CPU cap on the proxy under test, for rows where the proxy must be the limit ------------
# The clients on the other core cannot open connections faster than any of the proxies can
# take them, so the rows above compare CPU per connection, not capacity. Capping each proxy at
# CPU_CAP_PERCENT of its core (a cgroup CPU quota, v1 or v2; needs root) makes the proxy the
# limit: its rate then says how many connections that much CPU buys.
CPU_CAP_PERCENT=${CPU_CAP_PERCENT:-10}
CAP_GROUP=""
if [ "$(id -u)" = 0 ] && [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then
  CAP_GROUP=/sys/fs/cgroup/berth-bench-$$
  { echo +cpu > /sys/fs/cgroup/cgroup.subtree_control && mkdir -p "$CAP_GROUP" &&
    echo "$((CPU_CAP_PERCENT * 1000)) 100000" > "$CAP_GROUP/cpu.max"; } 2>/dev/null || CAP_GROUP=""
  CAP_ROOT=/sys/fs/cgroup
elif [ "$(id -u)" = 0 ] && [ -d /sys/fs/cgroup/cpu ]; then
  CAP_GROUP=/sys/fs/cgroup/cpu/berth-bench-$$
  { mkdir -p "$CAP_GROUP" && echo 100000 > "$CAP_GROUP/cpu.cfs_period_us" &&
    echo "$((CPU_CAP_PERCENT * 1000))" > "$CAP_GROUP/cpu.cfs_quota_us"; } 2>/dev/null || CAP_GROUP=""
  CAP_ROOT=/sys/fs/cgroup/cpu
fi
# Moves process PID (every thread of it) into the capped group, or back out.
cap_cpu() { echo "$1" > "$CAP_GROUP/cgroup.procs"; }
uncap_cpu() { echo "$1" > "$CAP_ROOT/cgroup.procs"; }

# capped RUNNER ARGS... PORT PID: the runner, with process PID held to the CPU cap meanwhile.
capped() {
  local pid=${!#}
  cap_cpu "$pid"
  "$@"
  uncap_cpu "$pid"
}

# Berth's TLS handshakes so far, full and resumed: tells whether a row's clients resumed.
handshakes() {
  curl -s "http://127.0.0.1:$BERTH_METRICS_PORT/metrics" |
    awk '/^berth_tls_handshakes_total\{kind="full"\}/ { full = $2 } /^berth_tls_handshakes_total\{kind="resumed"\}/ { resumed = $2 } END { printf "%d %d", full, resumed }'
}

# table TITLE "NAME|RUNS"...: the median of each figure over the rounds, and the ratios to
# nginx (the last row) and to the direct run (the first row, when there is one).
table() {
  python3 - "$@" <<'PY'
import statistics, sys
title, *rows = sys.argv[1:]
def median_run(text):
    # Each figure is the median of its own rounds: req/s, p50, p99, CPU and the load core's
    # busy share taken separately.
    rounds = [tuple(map(float, r.split())) for r in text.split(";") if r.strip()]
    return tuple(statistics.median(r[i] for r in rounds) for i in range(5))
named = [(row.split("|", 1)[0], median_run(row.split("|", 1)[1])) for row in rows]
first, nginx = named[0][1], named[-1][1]
print(f"\n### {title}\n")
print("| run | req/s | p50 ms | p99 ms | CPU µs/request | req/s vs first | req/s vs nginx | p99 vs nginx | CPU vs nginx | load core busy |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, (rps, p50, p99, cpu, load) in named:
    cpu_text = "-" if cpu != cpu else f"{cpu:.1f}"
    ratio = "-" if cpu != cpu or not nginx[3] else f"{cpu/nginx[3]:.2f}"
    load_text = "-" if load != load else f"{load:.0f}%"
    print(f"| {name} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {cpu_text} | {rps/first[0]:.2f} | {rps/nginx[0]:.2f} | {p99/nginx[2]:.2f} | {ratio} | {load_text} |")
PY
}

echo "# Load benchmark ($(date -u +%Y-%m-%d), $(nproc) cores, wrk -t1 -c$CONNECTIONS -d$DURATION, median of $ROUNDS rounds; proxies pinned to CPU $SUT_CPU with one worker, wrk and upstream on CPU $LOAD_CPU)"
if [ -z "$ONLY" ] || [ "$ONLY" = plain ]; then
  report "GET, 1 KB response" /1k
fi
[ "$ONLY" = plain ] && exit 0
if [ -z "$ONLY" ]; then
  report "GET, 100 KB response" /100k
  report "POST, 100 KB body" /post "$WORK/post.lua"
fi
if [ -z "$ONLY" ] || [ "$ONLY" = https ]; then
  report_tls "HTTPS (HTTP/1.1 keep-alive), GET, 1 KB response" /1k
  report_h2load "HTTPS, HTTP/2 (h2load, 8 connections x 16 streams), GET, 1 KB" /1k h2
  report_h2load "HTTPS, HTTP/1.1 (h2load, 32 connections), GET, 1 KB" /1k http/1.1
  # Uncapped, the load generator's core is the limit in the rows above, and requests/s say
  # little about the proxies; held to the same sliver of a core, the proxy is the limit.
  if [ -n "$CAP_GROUP" ]; then
    report_each "HTTPS, HTTP/1.1 (h2load, 32 connections), each proxy capped at $CPU_CAP_PERCENT% of its core, GET, 1 KB" capped run_h2load_at /1k http/1.1
    report_each "HTTPS, HTTP/2 (h2load, 8 connections x 16 streams), each proxy capped at $CPU_CAP_PERCENT% of its core, GET, 1 KB" capped run_h2load_at /1k h2
    echo
    echo "With every proxy held to $CPU_CAP_PERCENT% of a core, the proxy is the limit: these rates compare how many requests the same CPU buys (latencies there are the quota's: a throttled proxy waits out the rest of its 100 ms period)."
  fi
fi
[ "$ONLY" = https ] && { [ -n "$CAP_GROUP" ] && rmdir "$CAP_GROUP" 2>/dev/null; exit 0; }
read -r FULL_BEFORE RESUMED_BEFORE <<< "$(handshakes)"
report_tls "HTTPS, a new TLS connection per request (Connection: close; wrk resumes sessions), GET, 1 KB" /1k "Connection: close"
read -r FULL_AFTER RESUMED_AFTER <<< "$(handshakes)"
echo
echo "Berth's handshakes during the new-connection row: $((FULL_AFTER - FULL_BEFORE)) full, $((RESUMED_AFTER - RESUMED_BEFORE)) resumed (\`berth_tls_handshakes_total\`): the row measures resumed handshakes."
report_each "HTTPS, a new TLS connection per request, full handshakes (no client resumes; 4 Python clients), GET, 1 KB" run_tls_connections full /1k
read -r FULL_END RESUMED_END <<< "$(handshakes)"
echo
echo "Berth's handshakes during the full-handshake row: $((FULL_END - FULL_AFTER)) full, $((RESUMED_END - RESUMED_AFTER)) resumed. Requests/s there are bounded by the Python clients on the other core; CPU per connection is the figure to compare."
report_each "HTTPS, a new TLS connection per request, resumed handshakes (the same 4 Python clients, each offering its last session), GET, 1 KB" run_tls_connections resumed /1k
read -r FULL_RESUMED RESUMED_RESUMED <<< "$(handshakes)"
echo
echo "Berth's handshakes during the resumed row: $((FULL_RESUMED - FULL_END)) full, $((RESUMED_RESUMED - RESUMED_END)) resumed. With the same clients as the row above, the two rows' CPU per connection compare full and resumed handshakes directly."
report_each "HTTPS, a new TLS 1.3 connection per request, full handshakes (openssl s_time -new, 4 processes), GET, 1 KB" run_s_time -new -tls1_3
report_each "HTTPS, a new TLS 1.3 connection per request, resumed handshakes (openssl s_time -reuse, 4 processes), GET, 1 KB" run_s_time -reuse -tls1_3
report_each "HTTPS, a new TLS 1.2 connection per request, full handshakes (openssl s_time -new, 4 processes), GET, 1 KB" run_s_time -new -tls1_2
report_each "HTTPS, a new TLS 1.2 connection per request, resumed handshakes (openssl s_time -reuse, 4 processes), GET, 1 KB" run_s_time -reuse -tls1_2
read -r FULL_S_TIME RESUMED_S_TIME <<< "$(handshakes)"
echo
echo "Berth's handshakes during the four s_time rows: $((FULL_S_TIME - FULL_RESUMED)) full, $((RESUMED_S_TIME - RESUMED_RESUMED)) resumed. OpenSSL's C client costs less per connection than the Python one, so in these rows the rate of resumed connections against full ones depends less on the client; the clients are still the limit. A TLS 1.2 resumption skips the key exchange that a TLS 1.3 one still makes (clients offer only psk_dhe_ke)."

if [ -n "$CAP_GROUP" ]; then
  report_each "HTTPS, a new TLS 1.3 connection per request, full handshakes (openssl s_time -new), each proxy capped at $CPU_CAP_PERCENT% of its core, GET, 1 KB" capped run_s_time -new -tls1_3
  report_each "HTTPS, a new TLS 1.3 connection per request, resumed handshakes (openssl s_time -reuse), each proxy capped at $CPU_CAP_PERCENT% of its core, GET, 1 KB" capped run_s_time -reuse -tls1_3
  report_each "HTTPS, a new TLS 1.2 connection per request, full handshakes (openssl s_time -new), each proxy capped at $CPU_CAP_PERCENT% of its core, GET, 1 KB" capped run_s_time -new -tls1_2
  report_each "HTTPS, a new TLS 1.2 connection per request, resumed handshakes (openssl s_time -reuse), each proxy capped at $CPU_CAP_PERCENT% of its core, GET, 1 KB" capped run_s_time -reuse -tls1_2
  echo
  echo "With every proxy held to $CPU_CAP_PERCENT% of a core, the proxy is the limit: these rates compare how many connections the same CPU buys."
  rmdir "$CAP_GROUP" 2>/dev/null || true
else
  echo
  echo "Rows with a CPU cap on the proxy skipped: they need root and a cgroup CPU controller."
fi
[ "$ONLY" = connections ] && exit 0

# --- memory ---------------------------------------------------------------------------------
# A fresh process, so what the allocator kept from the load runs above is not counted.
RSS_AFTER_LOAD=$(rss_kb $BERTH_PID)
export HOME=$WORK/home-memory KAMAL_PROXY_SOCKET=$WORK/proxy-memory.sock
mkdir -p "$HOME"
MEMORY_PORT=18084
TOKIO_WORKER_THREADS=1 taskset -c $SUT_CPU "$PROXY" run --bind 127.0.0.1 --http-port $MEMORY_PORT \
  --https-port 18444 > /dev/null 2>&1 & PIDS+=($!)
MEMORY_PID=$!
for _ in $(seq 100); do [ -S "$KAMAL_PROXY_SOCKET" ] && break; sleep 0.05; done
sleep 1
RSS_START=$(rss_kb $MEMORY_PID)
"$PROXY" deploy plain --target 127.0.0.1:$UPSTREAM_PORT --host plain.bench --health-check-interval=1s >/dev/null
for i in $(seq 1 99); do
  "$PROXY" deploy "svc$i" --target 127.0.0.1:$UPSTREAM_PORT --host "svc$i.bench" --health-check-interval=1s >/dev/null
done
sleep 3
RSS_100=$(rss_kb $MEMORY_PID)
idle_clients $MEMORY_PORT 10000 plain.bench "$WORK/idle.ready" &
IDLE_PID=$!; PIDS+=($IDLE_PID)
for _ in $(seq 600); do [ -f "$WORK/idle.ready" ] && break; sleep 0.1; done
RSS_10K_BUSY=$(rss_kb $MEMORY_PID)
# Connections are parked after a quiet 1-2 s; the memory they freed goes back to the system
# at the next 5 s check.
sleep 8
RSS_10K=$(rss_kb $MEMORY_PID)
kill $IDLE_PID
echo
echo "### Memory (resident)"
echo
echo "| state | RSS |"
echo "|---|---:|"
echo "| started, no services | $((RSS_START)) KiB |"
echo "| idle, 100 services deployed | $((RSS_100)) KiB |"
echo "| the load-tested process, after the load runs (allocator caches included) | $((RSS_AFTER_LOAD)) KiB |"
echo "| 10,000 keep-alive connections, as their responses are read | $((RSS_10K_BUSY)) KiB |"
echo "| the same 10,000, idle for 8 s | $((RSS_10K)) KiB |"
echo "| per idle keep-alive connection | $(( (RSS_10K - RSS_100) * 1024 / 10000 )) bytes |"

# --- deploy cost ----------------------------------------------------------------------------
start=$(date +%s%N)
"$PROXY" deploy plain --target 127.0.0.1:$UPSTREAM_PORT --host plain.bench --health-check-interval=100ms --drain-timeout=5s
end=$(date +%s%N)
echo
echo "### Deploy"
echo
echo "Time from \`deploy\` to traffic on the new target (100 ms health check interval, idle old target): $(( (end - start) / 1000000 )) ms"
echo
echo "Route lookup with 10 vs 10,000 hosts: \`cargo bench -p berth-proxy --bench route_lookup\`."

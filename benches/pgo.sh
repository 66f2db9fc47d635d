#!/usr/bin/env bash
# A profile-guided release build of `proxy`: builds it instrumented, runs it under the
# benchmarks' traffic (plain HTTP/1.1 unbuffered and buffered, small and large bodies, an
# upload, HTTPS keep-alive, HTTP/2, new TLS connections), merges the profile, and builds it
# again laid out and inlined by what the requests ran. The binary is target/pgo/release/proxy.
#
# Laid out by profile, the request path's hot code sits together: callgrind counts a quarter
# fewer instructions per request and half the instruction-cache misses (benches/RESULTS.md).
#
#   benches/pgo.sh
#   PROXY=target/pgo/release/proxy benches/run.sh     # measure it
#
# Needs: wrk, nginx, h2load, curl, openssl (apt-get install wrk nginx-light nghttp2-client curl
# openssl) and an llvm-profdata that reads the raw profiles of rustc's LLVM. The one rustup ships
# with rustc always does (rustup component add llvm-tools) and is taken first; otherwise Debian's
# (apt-get install llvm-19 reads rustc 1.95's); LLVM_PROFDATA=path picks one.
# Two release builds: about 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in wrk nginx h2load curl openssl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install wrk nginx-light nghttp2-client curl openssl" >&2; exit 1; }
done
if [ -z "${LLVM_PROFDATA:-}" ]; then
  # rustup's llvm-tools match rustc's LLVM exactly; a raw profile's format changes with LLVM.
  matched=$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata
  if [ -x "$matched" ]; then LLVM_PROFDATA=$matched; fi
fi
if [ -z "${LLVM_PROFDATA:-}" ]; then
  for candidate in llvm-profdata-22 llvm-profdata-21 llvm-profdata-20 llvm-profdata-19; do
    if command -v "$candidate" >/dev/null; then LLVM_PROFDATA=$candidate; break; fi
  done
fi
[ -n "${LLVM_PROFDATA:-}" ] || { echo "missing llvm-profdata: rustup component add llvm-tools (or apt-get install llvm-19)" >&2; exit 1; }

BUILD_PROFILE=${BUILD_PROFILE:-release}
TARGET=$PWD/target/pgo
PROFILES=$TARGET/profiles
rm -rf "$PROFILES"
mkdir -p "$PROFILES"

echo "building the instrumented binary..." >&2
RUSTFLAGS="-Cprofile-generate=$PROFILES" CARGO_TARGET_DIR=$TARGET/instrumented \
  cargo build --profile "$BUILD_PROFILE" --locked --bin proxy -q
# Build scripts and proc macros ran instrumented too; only the proxy's runs are kept.
rm -f "$PROFILES"/*.profraw

# shellcheck source=benches/common.sh
. benches/common.sh
UPSTREAM_PORT=18381 HTTP_PORT=18383 HTTPS_PORT=18384
common="daemon off; pid $WORK/upstream.pid; error_log stderr error; events { worker_connections 1024; }"
[ "$(id -u)" = 0 ] && common="user root; $common"
cat > "$WORK/upstream.conf" <<CONF
$common
http {
  access_log off; keepalive_requests 1000000; client_body_temp_path $WORK/body;
  server {
    listen 127.0.0.1:$UPSTREAM_PORT;
    root $WORK/www;
    location = /post { client_max_body_size 10m; client_body_buffer_size 1m; return 200 "ok\n"; }
  }
}
CONF
nginx -c "$WORK/upstream.conf" -e stderr & PIDS+=($!)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -subj "/CN=tls.train" \
  -addext "subjectAltName=DNS:tls.train,IP:127.0.0.1" 2>/dev/null
cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 102400)
LUA

# The instrumented proxy, its state in the scratch directory (HOME only for it: cargo needs
# the real one for the second build).
mkdir -p "$WORK/home"
instrumented() {
  HOME=$WORK/home KAMAL_PROXY_SOCKET=$WORK/proxy.sock \
    LLVM_PROFILE_FILE=$PROFILES/proxy-%p-%m.profraw "$TARGET/instrumented/$BUILD_PROFILE/proxy" "$@"
}
# Started directly, not through the function: $! must be the proxy itself, whose profile is
# written when it exits.
HOME=$WORK/home KAMAL_PROXY_SOCKET=$WORK/proxy.sock LLVM_PROFILE_FILE=$PROFILES/proxy-%p-%m.profraw \
  "$TARGET/instrumented/$BUILD_PROFILE/proxy" run --bind 127.0.0.1 --http-port $HTTP_PORT \
  --https-port $HTTPS_PORT > /dev/null 2>&1 &
PROXY_PID=$!
PIDS+=($PROXY_PID)
for _ in $(seq 100); do [ -S "$WORK/proxy.sock" ] && break; sleep 0.05; done
until curl -sf "http://127.0.0.1:$UPSTREAM_PORT/up" >/dev/null; do sleep 0.05; done
instrumented deploy plain --target 127.0.0.1:$UPSTREAM_PORT --host plain.train --health-check-interval=100ms
instrumented deploy buffered --target 127.0.0.1:$UPSTREAM_PORT --host buffered.train \
  --health-check-interval=100ms --buffer-requests --buffer-responses
instrumented deploy tls --target 127.0.0.1:$UPSTREAM_PORT --host tls.train --health-check-interval=100ms \
  --tls --tls-redirect=false --tls-certificate-path "$WORK/cert.pem" --tls-private-key-path "$WORK/key.pem" \
  --buffer-requests --buffer-responses

echo "training on the benchmarks' traffic..." >&2
train() { wrk -t1 -c16 -d3s "$@" > /dev/null; }
for host in plain.train buffered.train; do
  train -H "Host: $host" "http://127.0.0.1:$HTTP_PORT/1k"
  train -H "Host: $host" "http://127.0.0.1:$HTTP_PORT/100k"
  train -H "Host: $host" -s "$WORK/post.lua" "http://127.0.0.1:$HTTP_PORT/post"
done
train -H "Host: tls.train" "https://127.0.0.1:$HTTPS_PORT/1k"
train -H "Host: tls.train" -H "Connection: close" "https://127.0.0.1:$HTTPS_PORT/1k"
h2load -n 20000 -c 8 -m 16 "https://tls.train:$HTTPS_PORT/1k" \
  --connect-to=127.0.0.1:$HTTPS_PORT > /dev/null 2>&1 || true
# The profile is written as the process exits.
kill -TERM $PROXY_PID
wait $PROXY_PID || true
ls "$PROFILES"/proxy-"$PROXY_PID"-*.profraw > /dev/null 2>&1 \
  || { echo "the instrumented proxy wrote no profile" >&2; exit 1; }

"$LLVM_PROFDATA" merge -o "$TARGET/proxy.profdata" "$PROFILES"/*.profraw
echo "building the optimised binary..." >&2
RUSTFLAGS="-Cprofile-use=$TARGET/proxy.profdata" CARGO_TARGET_DIR=$TARGET \
  cargo build --profile "$BUILD_PROFILE" --locked --bin proxy -q
echo "$TARGET/$BUILD_PROFILE/proxy"

#!/usr/bin/env bash
# Compares the proxy example with nginx, same algorithm, same three local backends, in one run:
# fast backends, then one slow backend. Writes benches/e2e/results.md. Not part of CI.
#
#   benches/e2e/compare.sh [DURATION_SECONDS]   (default 10 per measurement)
#
# Installs nginx and wrk from Debian's packages if they are missing. Everything runs on
# 127.0.0.1; wrk uses 2 threads and 64 connections. On a 2-core machine the load generator,
# the proxy and the backends share the cores, so read the figures as relative.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${1:-10}
OUT=benches/e2e/results.md
NGINX_PORT=18080
PROXY_PORT=18081
BACKENDS=(19001 19002 19003)

need() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] && return 0
    echo "installing $2"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
need nginx nginx
need wrk wrk
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --example backends --example proxy --features http,dns,axum 2>&1 | tail -1
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]:-}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$TMP/nginx.pid" ] && kill "$(cat "$TMP/nginx.pid")" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    return 1
}

# wrk's "Requests/sec" and the 99th percentile latency, as "RPS P99".
measure() {
    local out
    out=$(wrk -t2 -c64 -d"${DURATION}s" --latency "$1")
    local rps p99
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
    echo "$rps $p99"
}

# nginx's upstream block for an algorithm.
upstream() {
    local directive="" weights=("" "" "")
    case "$1" in
        round-robin) ;;
        weighted) weights=(" weight=3" " weight=1" " weight=1") ;;
        least-conn) directive="least_conn;" ;;
        hash) directive='hash $remote_addr consistent;' ;;
    esac
    echo "upstream backends { $directive"
    for i in 0 1 2; do echo "  server 127.0.0.1:${BACKENDS[$i]}${weights[$i]};"; done
    echo "  keepalive 64; }"
}

start_nginx() {
    cat >"$TMP/nginx.conf" <<CONF
worker_processes 2;
pid $TMP/nginx.pid;
error_log $TMP/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  $(upstream "$1")
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
    "$NGINX" -p "$TMP" -c "$TMP/nginx.conf"
    wait_port $NGINX_PORT
}

stop_nginx() {
    kill "$(cat "$TMP/nginx.pid")" 2>/dev/null || true
    sleep 0.5
}

proxy_strategy() {
    case "$1" in
        round-robin) echo round-robin ;;
        weighted) echo weighted-round-robin ;;
        least-conn) echo least-connections ;;
        hash) echo nginx-hash-ip ;;
    esac
}

start_proxy() {
    local weights=("" "" "")
    [ "$1" = weighted ] && weights=("=3" "=1" "=1")
    target/release/examples/proxy --listen 127.0.0.1:$PROXY_PORT \
        --backend "127.0.0.1:${BACKENDS[0]}${weights[0]}" \
        --backend "127.0.0.1:${BACKENDS[1]}${weights[1]}" \
        --backend "127.0.0.1:${BACKENDS[2]}${weights[2]}" \
        --strategy "$(proxy_strategy "$1")" >"$TMP/proxy.log" 2>&1 &
    PROXY_PID=$!
    wait_port $PROXY_PORT
}

{
    echo "# The proxy example against nginx"
    echo
    echo "wrk -t2 -c64 -d${DURATION}s on 127.0.0.1, three local backends; $(nproc) cores shared by everything; $(date -u +%Y-%m-%d)."
    echo
} >"$OUT"

for scenario in fast slow; do
    if [ "$scenario" = fast ]; then
        specs=("${BACKENDS[0]}" "${BACKENDS[1]}" "${BACKENDS[2]}")
    else
        specs=("${BACKENDS[0]}:1" "${BACKENDS[1]}:1" "${BACKENDS[2]}:20")
    fi
    target/release/examples/backends "${specs[@]}" >"$TMP/backends.log" 2>&1 &
    BACKENDS_PID=$!
    PIDS+=("$BACKENDS_PID")
    for port in "${BACKENDS[@]}"; do wait_port "$port"; done
    {
        echo "## ${scenario} backends ($( [ "$scenario" = fast ] && echo "no delay" || echo "1 ms, 1 ms, 20 ms"))"
        echo
        echo "| algorithm | nginx req/s | proxy req/s | nginx p99 | proxy p99 |"
        echo "|---|--:|--:|--:|--:|"
    } >>"$OUT"
    for algo in round-robin weighted least-conn hash; do
        start_nginx "$algo"
        read -r n_rps n_p99 < <(measure "http://127.0.0.1:$NGINX_PORT/")
        stop_nginx
        start_proxy "$algo"
        read -r p_rps p_p99 < <(measure "http://127.0.0.1:$PROXY_PORT/")
        kill "$PROXY_PID" 2>/dev/null || true
        wait "$PROXY_PID" 2>/dev/null || true
        echo "| $algo | $n_rps | $p_rps | $n_p99 | $p_p99 |" >>"$OUT"
        echo "$scenario $algo: nginx $n_rps req/s p99 $n_p99; proxy $p_rps req/s p99 $p_p99"
    done
    echo >>"$OUT"
    kill "$BACKENDS_PID" 2>/dev/null || true
    wait "$BACKENDS_PID" 2>/dev/null || true
done
echo "written to $OUT"

#!/usr/bin/env bash
# Compares the proxy example with nginx: the same algorithm over the same three local backends,
# fast backends, then one slow backend. Writes benches/e2e/results.md. Not part of CI.
#
#   benches/e2e/compare.sh [DURATION_SECONDS [ROUNDS]]   (defaults: 10 s, 3 rounds)
#
# Each round measures, for every algorithm, nginx twice (A and B: an A/A pair whose gap is the
# noise floor) and the proxy once, in an order that rotates from round to round; the table
# shows medians over the rounds. CPU per request is the server's user + system CPU time
# (nginx: master and workers; the proxy: its process) over the requests wrk completed.
#
# nginx runs 2 workers with an upstream keepalive pool of 32 and the usual forwarding headers
# (Host, X-Forwarded-For/-Proto/-Host); the proxy runs tokio's default
# (one worker thread per core) and keeps up to 64 idle connections per backend, what nginx's
# two workers keep at most (32 each, for the whole upstream): with a hashed key every request
# goes to one backend, and a smaller cap than the 64 connections wrk keeps busy would make
# the proxy open and close connections that nginx keeps. wrk uses 2 threads and 64 connections. On a 2-core machine
# the load generator, the server and the backends share the cores, so the figures are
# relative; the load average before and after is recorded, and measurements taken while other
# work runs are noise. Installs nginx and wrk from Debian's packages if they are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${1:-10}
ROUNDS=${2:-3}
OUT=benches/e2e/results.md
NGINX_PORT=18080
PROXY_PORT=18081
ADMIN_PORT=18082
BACKENDS=(19001 19002 19003)
CLK_TCK=$(getconf CLK_TCK)

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
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
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

# User + system CPU ticks of the given processes.
cpu_ticks() {
    local total=0 pid fields
    for pid in "$@"; do
        # Fields 14 and 15 of /proc/PID/stat, counted after the command name's ")".
        fields=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
        total=$((total + $(echo "$fields" | awk '{print $12 + $13}')))
    done
    echo "$total"
}

# wrk's latency as milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000
        printf "%.2f", n
    }'
}

# Runs wrk against URL (sending HEADER, if not empty) while counting the CPU of PIDS; prints
# "RPS P90_MS P99_MS CPU_US_PER_REQUEST".
measure() {
    local url=$1 pids=$2 header=$3
    # One argument per word: wrk drops a header written without a space after the colon.
    local extra=()
    [ -n "$header" ] && extra=(-H "$header")
    # A short warm-up, so both servers start with connections open.
    wrk -t2 -c64 -d1s "${extra[@]}" "$url" >/dev/null
    local before after out
    # shellcheck disable=SC2086
    before=$(cpu_ticks $pids)
    out=$(wrk -t2 -c64 -d"${DURATION}s" --latency "${extra[@]}" "$url")
    # shellcheck disable=SC2086
    after=$(cpu_ticks $pids)
    local rps requests p90 p99
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    p90=$(to_ms "$(echo "$out" | awk '$1 == "90%" {print $2}')")
    p99=$(to_ms "$(echo "$out" | awk '$1 == "99%" {print $2}')")
    local cpu_us
    cpu_us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$requests" \
        'BEGIN { printf "%.1f", (n > 0 ? t * 1e6 / hz / n : 0) }')
    echo "$rps $p90 $p99 $cpu_us"
}

# nginx's upstream block for an algorithm.
upstream() {
    local directive="" weights=("" "" "")
    case "$1" in
        round-robin) ;;
        weighted) weights=(" weight=3" " weight=1" " weight=1") ;;
        least-conn) directive="least_conn;" ;;
        hash-ip) directive='hash $remote_addr consistent;' ;;
        hash-xff) directive='hash $http_x_forwarded_for consistent;' ;;
    esac
    echo "upstream backends { $directive"
    for i in 0 1 2; do echo "  server 127.0.0.1:${BACKENDS[$i]}${weights[$i]};"; done
    echo "  keepalive 32; }"
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
      # The usual reverse-proxy headers (the proxy example sets these, and Forwarded).
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
    }
  }
}
CONF
    "$NGINX" -p "$TMP" -c "$TMP/nginx.conf"
    wait_port $NGINX_PORT
    local master workers=""
    master=$(cat "$TMP/nginx.pid")
    # The workers may not be forked yet on a busy machine.
    for _ in $(seq 1 100); do
        workers=$(pgrep -P "$master" | tr '\n' ' ' || true)
        [ "$(echo "$workers" | wc -w)" -ge 2 ] && break
        sleep 0.05
    done
    SERVER_PIDS="$master $workers"
}

stop_nginx() {
    local master
    master=$(cat "$TMP/nginx.pid")
    kill "$master" 2>/dev/null || true
    while kill -0 "$master" 2>/dev/null; do sleep 0.1; done
}

proxy_strategy() {
    case "$1" in
        round-robin) echo round-robin ;;
        weighted) echo weighted-round-robin ;;
        least-conn) echo least-connections ;;
        hash-ip) echo nginx-hash-ip ;;
        hash-xff) echo nginx-hash-header:x-forwarded-for ;;
    esac
}

start_proxy() {
    local weights=("" "" "")
    [ "$1" = weighted ] && weights=("=3" "=1" "=1")
    target/release/examples/proxy --listen 127.0.0.1:$PROXY_PORT \
        --admin-listen 127.0.0.1:$ADMIN_PORT \
        --backend "127.0.0.1:${BACKENDS[0]}${weights[0]}" \
        --backend "127.0.0.1:${BACKENDS[1]}${weights[1]}" \
        --backend "127.0.0.1:${BACKENDS[2]}${weights[2]}" \
        --upstream-max-idle 64 \
        --strategy "$(proxy_strategy "$1")" >"$TMP/proxy.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_port $PROXY_PORT
    SERVER_PIDS=$PROXY_PID
}

stop_proxy() {
    kill "$PROXY_PID" 2>/dev/null || true
    wait "$PROXY_PID" 2>/dev/null || true
}

# One measurement of SERVER (nginx-a, nginx-b or proxy) with ALGO; appends a line to RAW.
run_one() {
    local server=$1 algo=$2 scenario=$3 header=""
    [ "$algo" = hash-xff ] && header="X-Forwarded-For: 198.51.100.7"
    local url
    if [ "$server" = proxy ]; then
        start_proxy "$algo"
        url="http://127.0.0.1:$PROXY_PORT/"
    else
        start_nginx "$algo"
        url="http://127.0.0.1:$NGINX_PORT/"
    fi
    local result
    result=$(measure "$url" "$SERVER_PIDS" "$header")
    if [ "$server" = proxy ]; then stop_proxy; else stop_nginx; fi
    echo "$scenario $algo $server $result" >>"$TMP/raw"
    echo "  $scenario $algo $server: $result (req/s p90 p99 cpu-us/req)"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$TMP/raw"
for scenario in fast slow; do
    if [ "$scenario" = fast ]; then
        specs=("${BACKENDS[0]}" "${BACKENDS[1]}" "${BACKENDS[2]}")
        algos=(round-robin weighted least-conn hash-ip hash-xff)
    else
        specs=("${BACKENDS[0]}" "${BACKENDS[1]}" "${BACKENDS[2]}:50")
        algos=(least-conn round-robin)
    fi
    target/release/examples/backends "${specs[@]}" >"$TMP/backends.log" 2>&1 &
    BACKENDS_PID=$!
    PIDS+=("$BACKENDS_PID")
    for port in "${BACKENDS[@]}"; do wait_port "$port"; done
    for round in $(seq 1 "$ROUNDS"); do
        echo "$scenario round $round of $ROUNDS (load $(cut -d' ' -f1 /proc/loadavg))"
        # Rotate the order each round so that drift (other work, thermal) spreads evenly.
        case $((round % 3)) in
            1) order=(nginx-a proxy nginx-b) ;;
            2) order=(proxy nginx-b nginx-a) ;;
            0) order=(nginx-b nginx-a proxy) ;;
        esac
        for algo in "${algos[@]}"; do
            for server in "${order[@]}"; do run_one "$server" "$algo" "$scenario"; done
        done
    done
    kill "$BACKENDS_PID" 2>/dev/null || true
    wait "$BACKENDS_PID" 2>/dev/null || true
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$TMP/raw" "$OUT" "$DURATION" "$ROUNDS" "$LOAD_BEFORE" "$LOAD_AFTER" "$(nproc)" \
    "$("$NGINX" -v 2>&1 | sed 's/.*\///')" <<'PY'
import statistics, sys, datetime
raw, out, duration, rounds, load_before, load_after, cores, nginx = sys.argv[1:]
rows = {}
for line in open(raw):
    scenario, algo, server, rps, p90, p99, cpu = line.split()
    rows.setdefault((scenario, algo), {}).setdefault(server, []).append(
        (float(rps), float(p90), float(p99), float(cpu)))
def med(samples, i):
    return statistics.median(s[i] for s in samples)
lines = [
    "# The proxy example against nginx", "",
    f"wrk -t2 -c64 -d{duration}s on 127.0.0.1, three local backends, medians of {rounds} "
    f"interleaved rounds; nginx {nginx} (2 workers, keepalive 32) and the proxy (2 runtime "
    f"threads); {cores} cores shared by wrk, the server and the backends; "
    f"load average {load_before} before, {load_after} after; "
    f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}.", "",
    "nginx A and B are two runs of the same nginx: their gap is the noise floor. "
    "CPU is the server's user + system time per request.", "",
]
titles = {"fast": "fast backends (no delay)", "slow": "one slow backend (0 ms, 0 ms, 50 ms)"}
for scenario in ["fast", "slow"]:
    lines += [f"## {titles[scenario]}", "",
              "| algorithm | nginx A req/s | nginx B req/s | proxy req/s | proxy / nginx "
              "| nginx CPU µs/req | proxy CPU µs/req | nginx p90 | proxy p90 | nginx p99 | proxy p99 |",
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for (s, algo), servers in rows.items():
        if s != scenario:
            continue
        a, b, p = servers["nginx-a"], servers["nginx-b"], servers["proxy"]
        nginx_all = a + b
        n_rps = med(nginx_all, 0)
        lines.append(
            f"| {algo} | {med(a, 0):,.0f} | {med(b, 0):,.0f} | {med(p, 0):,.0f} "
            f"| {med(p, 0) / n_rps:.2f} | {med(nginx_all, 3):.1f} | {med(p, 3):.1f} "
            f"| {med(nginx_all, 1):.2f} ms | {med(p, 1):.2f} ms "
            f"| {med(nginx_all, 2):.2f} ms | {med(p, 2):.2f} ms |")
    lines.append("")
open(out, "w").write("\n".join(lines))
print("\n".join(lines))
PY
echo "written to $OUT"

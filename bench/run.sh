#!/usr/bin/env bash
# bench/run.sh: the Phoenix flow against nginx, HAProxy and Caddy on one machine, on loopback.
#
#   bench/run.sh                      # full run: 3 interleaved rounds of 10 s per figure (about 15 min + build)
#   BENCH_QUICK=1 bench/run.sh        # 1 round of 3 s, 2 ACME issuances (about 3 min), for iterating
#
# It builds `cargo build --release -p phoenix`, then measures the same three-hop flow for every chain:
#
#   client --HTTPS--> gateway --HTTPS, verified against the internal root--> mesh --HTTP--> backend
#
#   chain     gateway          mesh             ports (gateway/mesh)
#   nginx     nginx            nginx            18443 / 19443
#   haproxy   haproxy          haproxy          14443 / 15443
#   caddy     caddy            caddy            28443 / 29443
#   phoenix   phoenix gateway  phoenix mesh     24443 / 25443
#   relay     haproxy, TCP     haproxy, TCP     16443 / 17443   (optional: TLS relayed, no HTTP; below)
#   direct    (none: wrk straight at the backend, the baseline)
#
# One backend for every chain: nginx (1 worker) returning a fixed 19-byte body on 127.0.0.1:18080;
# `/sse` is routed by every mesh to `phoenix whoami` on 127.0.0.1:18001 for the SSE figure. Every chain
# uses the same certificates, issued by `phoenix ca issue` (ECDSA P-256, root -> intermediate -> leaf),
# verifies the mesh's certificate and name on the gateway -> mesh hop, keeps upstream connections
# alive, adds X-Forwarded-For, and runs without an access log (none of the peers logs either).
# Timeouts for a client that has not sent a request are 60 s everywhere (nginx's default). Every
# listener offers TLS 1.2 and 1.3, so every chain negotiates TLS 1.3 with the clients (nginx 1.22
# enables only up to TLS 1.2 unless told; `ssl_protocols` says so, as nginx >= 1.23.4 does by default).
#
# Figures (each the median over rounds; within a round every chain runs once for the keep-alive
# figures, then once more for the others, in a shuffled order; the report gives each chain's ratio to
# nginx both as the ratio of the medians and, for the rates, paired: the median over rounds of the
# ratio within each round):
#   ka        wrk -t1 -c$CONNS keep-alive: req/s, p50 and p99 latency
#   close     wrk with `Connection: close`: one full TLS handshake per request, req/s
#   h2        h2load -c$CONNS -m10 over HTTP/2 (ALPN h2), req/s
#   cpu       CPU seconds (utime+stime from /proc/PID/stat, all processes of both hops) per 10 000
#             requests of the keep-alive run, also split into user and kernel time, next to the rest
#             of the machine's busy time (/proc/stat) in the same interval
#   peak      peak RSS (VmHWM) summed over the processes of both hops after the load runs
#   idle      RSS of the gateway's processes holding $IDLE idle TLS connections (bench/idle_conns.py)
#   sse       extra time to the first SSE event through the chain compared with the backend directly
#             (bench/sse_ttfb.py: median of $SSE_SAMPLES, connection set-up excluded)
#   acme      lego issuing one certificate (new account, order, http-01, finalize, download) against
#             `phoenix ca serve` and against Caddy's `acme_server`, median of $ACME_RUNS
#   instr     user-space instructions per request of each hop under callgrind, for the nginx and
#             Phoenix chains (once: the count does not depend on the machine's load)
#
# Needs (Debian): nginx haproxy caddy wrk nghttp2-client lego python3 curl openssl valgrind, and root (it adds
# the bench names to /etc/hosts and binds port 80 for http-01), and a hard `ulimit -n` above IDLE+1000.
# Environment: ROUNDS SECS CONNS IDLE SSE_SAMPLES ACME_RUNS CHAINS SETTLE (seconds between chains,
# default 2) BENCH_DIR PHOENIX_BIN (skip the build),
# FIGURES (a subset of "ka close h2 idle sse acme instr"; the CPU figure comes with ka, peak RSS
# with ka or any of close h2 idle sse;
# instr needs valgrind), INSTR_REQS, and PHOENIX_BIN_B with the chain `phoenixb`
# (CHAINS="nginx phoenix phoenixb") to compare two builds.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${BENCH_QUICK:-}" ]; then
  ROUNDS=${ROUNDS:-1}; SECS=${SECS:-3}; ACME_RUNS=${ACME_RUNS:-2}; SSE_SAMPLES=${SSE_SAMPLES:-20}
fi
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-10}; CONNS=${CONNS:-50}; IDLE=${IDLE:-10000}
SSE_SAMPLES=${SSE_SAMPLES:-40}; ACME_RUNS=${ACME_RUNS:-5}
CHAINS=${CHAINS:-"direct nginx haproxy caddy phoenix"}
FIGURES=${FIGURES:-"ka close h2 idle sse acme instr"}
want() { case " $FIGURES " in *" $1 "*) return 0;; *) return 1;; esac; }
W=${BENCH_DIR:-/tmp/phoenix-bench}
HOST=app.bench.test
TICK=$(getconf CLK_TCK)

for tool in nginx haproxy caddy wrk h2load lego python3 curl; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install nginx haproxy caddy wrk nghttp2-client lego)" >&2; exit 1; }
done
if want instr; then
  command -v valgrind >/dev/null || { echo "bench: the instr figure needs valgrind (apt-get install valgrind, or leave instr out of FIGURES)" >&2; exit 1; }
fi
# Every process started below inherits this: the gateway and the idle client need $IDLE descriptors.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -gt $((IDLE + 1000)) ] \
  || { echo "bench: ulimit -n is $(ulimit -n), too low for IDLE=$IDLE" >&2; exit 1; }
grep -q " $HOST " /etc/hosts || echo "127.0.0.1 $HOST mesh.bench.test gateway.bench.test lego.bench.test acme.bench.test " >> /etc/hosts

# A process left over from an earlier run (or anything else) on one of the ports would silently
# take part in the measurement (nginx's backend uses reuseport): refuse to start instead.
busy=""
for port in 18080 18001 18443 19443 14443 15443 16443 17443 28443 29443 24443 25443 24000 24901 24902 27000 80; do
  [ -n "$(ss -Hltn "sport = :$port")" ] && busy+=" $port"
done
[ -z "$busy" ] || { echo "bench: ports in use:$busy (stop what listens there: ss -ltnp)" >&2; exit 1; }

if [ -z "${PHOENIX_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -p phoenix) || { echo "bench: release build failed" >&2; exit 1; }
  PHOENIX_BIN=$ROOT/target/release/phoenix
fi
BIN=$PHOENIX_BIN

rm -rf "$W"; mkdir -p "$W"; cd "$W"
PIDS=()
cleanup() {
  for f in nginx-*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# --------------------------------------------------------------------------------------------------
# PKI: one phoenix CA; leaves for the gateway name and the mesh name, used by every chain.
# The topology file is also the phoenix chain's configuration.
cat > phoenix.toml <<EOF
domain = "bench.test"
[ca]
listen = "127.0.0.1:24000"
data_dir = "ca"
domains = ["bench.test"]
networks = ["127.0.0.0/8"]
[ca.acme]
http01_port = 80
[ca.acme.resolve]
"lego.bench.test" = "127.0.0.1"
[gateway]
listen = "127.0.0.1:24443"
admin_listen = "127.0.0.1:24902"
mesh = "https://127.0.0.1:25443"
mesh_name = "mesh.bench.test"
ca_root = "ca/root.pem"
tls_cert = "pki/gw/cert.pem"
tls_key = "pki/gw/key.pem"
trusted_proxies = ["127.0.0.1/32"]
access_log = false
[gateway.limits]
header_read_timeout = "60s"
max_connections = 20000
[mesh]
listen = "127.0.0.1:25443"
admin_listen = "127.0.0.1:24901"
name = "mesh.bench.test"
tls_cert = "pki/mesh/cert.pem"
tls_key = "pki/mesh/key.pem"
ca_root = "ca/root.pem"
trusted_proxies = ["127.0.0.1/32"]
plaintext_networks = ["127.0.0.0/8"]
access_log = false
[mesh.limits]
header_read_timeout = "60s"
max_connections = 20000
[[service]]
name = "app"
servers = ["http://127.0.0.1:18080"]
[[service]]
name = "sse"
servers = ["http://127.0.0.1:18001"]
[[route]]
rule = "Host(\`$HOST\`) && PathPrefix(\`/sse\`)"
service = "sse"
EOF
"$BIN" ca init --config phoenix.toml >/dev/null || { echo "bench: phoenix ca init failed" >&2; exit 1; }
"$BIN" ca issue --config phoenix.toml --name $HOST --name gateway.bench.test --out pki/gw >/dev/null
"$BIN" ca issue --config phoenix.toml --name mesh.bench.test --out pki/mesh >/dev/null
ROOTPEM=$W/ca/root.pem
for n in gw mesh; do cat pki/$n/cert.pem pki/$n/key.pem > pki/$n/combined.pem; done

# --------------------------------------------------------------------------------------------------
# The shared backends.
cat > backend.conf <<EOF
worker_processes 1; pid $W/nginx-b.pid; error_log $W/b.err; daemon on; worker_rlimit_nofile 20000;
events { worker_connections 20000; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18080 reuseport backlog=4096; location / { return 200 "hello from backend\n"; } } }
EOF
nginx -c "$W/backend.conf" -p "$W" 2>/dev/null
PHOENIX_LOG=warn "$BIN" whoami --listen 127.0.0.1:18001 --name sse >whoami.log 2>&1 & PIDS+=($!)

# --------------------------------------------------------------------------------------------------
# Chains. start_X sets PORT and the pid lists CHAIN_PIDS (both hops) and GW_PIDS (gateway only).
nginx_pids() { local m; m=$(cat "$W/$1" 2>/dev/null) || return 0; echo "$m $(pgrep -P "$m" | tr '\n' ' ')"; }

start_nginx() {
  local common="worker_processes auto; daemon on; worker_rlimit_nofile 20000;
events { worker_connections 20000; }"
  local proxy="proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;"
  cat > gw.conf <<EOF
$common pid $W/nginx-g.pid; error_log $W/g.err;
http { access_log off; keepalive_requests 1000000; client_header_timeout 60s;
  upstream mesh { server 127.0.0.1:19443; keepalive 128; }
  server { listen 127.0.0.1:18443 ssl http2 backlog=4096; ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate $W/pki/gw/cert.pem; ssl_certificate_key $W/pki/gw/key.pem;
    location / { proxy_pass https://mesh; $proxy proxy_set_header X-Forwarded-Proto https;
      proxy_ssl_verify on; proxy_ssl_trusted_certificate $ROOTPEM; proxy_ssl_name mesh.bench.test;
      proxy_ssl_server_name on; proxy_ssl_session_reuse on; }
    location /sse { proxy_pass https://mesh; $proxy proxy_buffering off;
      proxy_ssl_verify on; proxy_ssl_trusted_certificate $ROOTPEM; proxy_ssl_name mesh.bench.test;
      proxy_ssl_server_name on; proxy_ssl_session_reuse on; } } }
EOF
  cat > mesh.conf <<EOF
$common pid $W/nginx-m.pid; error_log $W/m.err;
http { access_log off; keepalive_requests 1000000; client_header_timeout 60s;
  upstream be { server 127.0.0.1:18080; keepalive 128; }
  upstream sse { server 127.0.0.1:18001; keepalive 16; }
  server { listen 127.0.0.1:19443 ssl backlog=4096; ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate $W/pki/mesh/cert.pem; ssl_certificate_key $W/pki/mesh/key.pem;
    location / { proxy_pass http://be; $proxy }
    location /sse { proxy_pass http://sse; $proxy proxy_buffering off; } } }
EOF
  nginx -c "$W/gw.conf" -p "$W" 2>/dev/null; nginx -c "$W/mesh.conf" -p "$W" 2>/dev/null
  PORT=18443
}
stop_nginx() { kill "$(cat nginx-g.pid)" "$(cat nginx-m.pid)" 2>/dev/null; sleep 0.5; rm -f nginx-g.pid nginx-m.pid; }
pids_nginx() { CHAIN_PIDS="$(nginx_pids nginx-g.pid) $(nginx_pids nginx-m.pid)"; GW_PIDS=$(nginx_pids nginx-g.pid); }

start_haproxy() {
  cat > hg.cfg <<EOF
global
  maxconn 10500
  no strict-limits
  nbthread 2
  ssl-server-verify required
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend gw
  bind 127.0.0.1:14443 ssl crt $W/pki/gw/combined.pem alpn h2,http/1.1
  http-request set-header X-Forwarded-Proto https
  option forwardfor
  default_backend mesh
backend mesh
  http-reuse always
  server m1 127.0.0.1:15443 ssl verify required ca-file $ROOTPEM sni str(mesh.bench.test) verifyhost mesh.bench.test
EOF
  cat > hm.cfg <<EOF
global
  maxconn 10500
  no strict-limits
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend mesh
  bind 127.0.0.1:15443 ssl crt $W/pki/mesh/combined.pem
  option forwardfor
  use_backend sse if { path_beg /sse }
  default_backend be
backend be
  http-reuse always
  server b1 127.0.0.1:18080
backend sse
  http-reuse always
  server s1 127.0.0.1:18001
EOF
  start_haproxies hg.cfg hm.cfg
  PORT=14443
}
start_haproxies() { # gateway.cfg mesh.cfg: one HAProxy per hop, logs next to their configurations
  haproxy -f "$1" >"${1%.cfg}.log" 2>&1 & HP1=$!
  haproxy -f "$2" >"${2%.cfg}.log" 2>&1 & HP2=$!
}
stop_haproxy() { kill $HP1 $HP2 2>/dev/null; wait $HP1 $HP2 2>/dev/null || true; }
pids_haproxy() { CHAIN_PIDS="$HP1 $HP2"; GW_PIDS=$HP1; }

start_caddy() {
  cat > gw.Caddyfile <<EOF
{
	admin off
	auto_https off
	default_sni $HOST
}
https://:28443 {
	bind 127.0.0.1
	tls $W/pki/gw/cert.pem $W/pki/gw/key.pem
	reverse_proxy https://127.0.0.1:29443 {
		transport http {
			tls_trusted_ca_certs $ROOTPEM
			tls_server_name mesh.bench.test
		}
	}
}
EOF
  cat > mesh.Caddyfile <<EOF
{
	admin off
	auto_https off
	default_sni mesh.bench.test
}
https://:29443 {
	bind 127.0.0.1
	tls $W/pki/mesh/cert.pem $W/pki/mesh/key.pem
	reverse_proxy /sse* 127.0.0.1:18001
	reverse_proxy 127.0.0.1:18080
}
EOF
  HOME=$W caddy run --adapter caddyfile --config gw.Caddyfile >caddy-g.log 2>&1 & CP1=$!
  HOME=$W caddy run --adapter caddyfile --config mesh.Caddyfile >caddy-m.log 2>&1 & CP2=$!
  PORT=28443
}
stop_caddy() { kill $CP1 $CP2 2>/dev/null; wait $CP1 $CP2 2>/dev/null || true; }
pids_caddy() { CHAIN_PIDS="$CP1 $CP2"; GW_PIDS=$CP1; }

start_phoenix() {
  PHOENIX_LOG=warn "$BIN" mesh --config phoenix.toml >phoenix-m.log 2>&1 & PM=$!
  PHOENIX_LOG=warn "$BIN" gateway --config phoenix.toml >phoenix-g.log 2>&1 & PG=$!
  PORT=24443
}
stop_phoenix() { kill $PG $PM 2>/dev/null; wait $PG $PM 2>/dev/null || true; }
pids_phoenix() { CHAIN_PIDS="$PG $PM"; GW_PIDS=$PG; }
# phoenixb: the same chain with a second binary ($PHOENIX_BIN_B), for an A/B of a change in one run.
start_phoenixb() { local BIN=${PHOENIX_BIN_B:?set PHOENIX_BIN_B for the phoenixb chain}; start_phoenix; }
stop_phoenixb() { stop_phoenix; }
pids_phoenixb() { pids_phoenix; }

# relay: a reference, not a product. HAProxy in TCP mode on both hops: the gateway terminates the
# client's TLS and opens TLS to the mesh (verified, as in the other chains), the mesh terminates it
# and passes the bytes to the backend. No HTTP is parsed, routed or rewritten, one upstream connection
# per client connection: the least work a chain of two TLS hops can do, on the same sockets. Only the
# keep-alive figures apply (it speaks no HTTP/2 and has no /sse route); not in the default CHAINS.
start_relay() {
  local head="global
  maxconn 10500
  no strict-limits
  nbthread 2
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s"
  cat > rg.cfg <<EOF
$head
frontend g
  bind 127.0.0.1:16443 ssl crt $W/pki/gw/combined.pem alpn http/1.1
  default_backend m
backend m
  server m1 127.0.0.1:17443 ssl verify required ca-file $ROOTPEM sni str(mesh.bench.test) verifyhost mesh.bench.test
EOF
  cat > rm.cfg <<EOF
$head
frontend m
  bind 127.0.0.1:17443 ssl crt $W/pki/mesh/combined.pem
  default_backend b
backend b
  server b1 127.0.0.1:18080
EOF
  start_haproxies rg.cfg rm.cfg
  PORT=16443
}
stop_relay() { stop_haproxy; }
pids_relay() { pids_haproxy; }
keepalive_only() { [ "$1" = relay ]; }   # chain: it has no figures but the keep-alive ones

start_direct() { PORT=18080; }
stop_direct() { :; }
pids_direct() { CHAIN_PIDS=$(nginx_pids nginx-b.pid); GW_PIDS=$CHAIN_PIDS; }

# --------------------------------------------------------------------------------------------------
# Measurements.
url() { if [ "$1" = direct ]; then echo "http://$HOST:$PORT/"; else echo "https://$HOST:$PORT/"; fi; }
# "user system" clock ticks of the processes in $1; the machine's busy ticks (all CPUs, every process).
cpu_ticks() { local u=0 s=0 p a b; for p in $1; do [ -r /proc/$p/stat ] && read -r a b < <(awk '{print $14, $15}' /proc/$p/stat) && u=$((u + a)) && s=$((s + b)); done; echo "$u $s"; }
busy_ticks() { awk '$1=="cpu"{print $2+$3+$4+$7+$8}' /proc/stat; }
per10k() { awk -v t="$1" -v hz="$TICK" -v n="$2" 'BEGIN{printf "%.3f", t/hz/n*10000}'; }
kb_sum() { local t=0 p v; for p in $2; do v=$(awk -v k="$1:" '$1==k{print $2}' /proc/$p/status 2>/dev/null); t=$((t + ${v:-0})); done; echo $t; }
to_ms() { awk -v v="$1" 'BEGIN{ if (v ~ /ms$/) {sub(/ms$/,"",v); print v} else if (v ~ /us$/) {sub(/us$/,"",v); print v/1000} else if (v ~ /s$/) {sub(/s$/,"",v); print v*1000} else print "nan" }'; }

declare -A R   # R[chain.metric] = "v1 v2 ..." one value per round
add() { R[$1.$2]+="$3 "; }

declare -A PEAK   # PEAK[chain] = the peak RSS of this round's keep-alive phase, in MB
measure_ka() { # chain: the keep-alive figures, CPU per request and peak RSS
  local c=$1 out reqs u0 s0 b0 u1 s1 b1
  wrk -t1 -c"$CONNS" -d1s "$(url "$c")" >/dev/null 2>&1 || true   # warm-up: pools, caches
  read -r u0 s0 < <(cpu_ticks "$CHAIN_PIDS"); b0=$(busy_ticks)
  out=$(wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "$(url "$c")")
  read -r u1 s1 < <(cpu_ticks "$CHAIN_PIDS"); b1=$(busy_ticks)
  echo "$out" > "wrk-ka-$c.out"
  reqs=$(echo "$out" | awk '/requests in/{print $1}')
  add "$c" ka "$(echo "$out" | awk '/Requests\/sec/{print $2}')"
  add "$c" p50 "$(to_ms "$(echo "$out" | awk '$1=="50%"{print $2}')")"
  add "$c" p99 "$(to_ms "$(echo "$out" | awk '$1=="99%"{print $2}')")"
  add "$c" cpu "$(per10k $((u1 - u0 + s1 - s0)) "$reqs")"
  add "$c" cpu_user "$(per10k $((u1 - u0)) "$reqs")"
  add "$c" cpu_sys "$(per10k $((s1 - s0)) "$reqs")"
  # Everything else the machine ran meanwhile (/proc/stat counts this VM only): the client and the backend.
  add "$c" cpu_rest "$(per10k $((b1 - b0 - (u1 - u0) - (s1 - s0))) "$reqs")"
  echo "$out" | grep -E "Non-2xx|Socket errors" | sed "s/^/  $c keep-alive: /" >&2 || true
  PEAK[$c]=$(( $(kb_sum VmHWM "$CHAIN_PIDS") / 1024 ))
  # With a second phase, that phase records the larger of both peaks.
  if ! more_figures || keepalive_only "$c"; then add "$c" peak "${PEAK[$c]}"; fi
}

more_figures() { want close || want h2 || want idle || want sse; }
measure_more() { # chain: every other figure, on a fresh start of the chain
  local c=$1 out peak ka_peak=${PEAK[$1]:-0}
  if want close; then
    out=$(wrk -t1 -c"$CONNS" -d"${SECS}s" -H 'Connection: close' "$(url "$c")")
    echo "$out" > "wrk-close-$c.out"
    add "$c" close "$(echo "$out" | awk '/Requests\/sec/{print $2}')"
  fi

  if [ "$c" != direct ] && want h2; then
    out=$(h2load -c"$CONNS" -m10 -t1 -D"$SECS" "$(url "$c")" 2>&1)
    echo "$out" > "h2load-$c.out"
    add "$c" h2 "$(echo "$out" | awk '/^finished in/{print $4}')"
    echo "$out" | awk '/^requests:/ && ($10 != 0 || $12 != 0) {print "  '"$c"' h2: " $0}' >&2
  fi
  # The larger of the two phases' peaks (the keep-alive phase's is missing when ka is left out).
  peak=$(( $(kb_sum VmHWM "$CHAIN_PIDS") / 1024 ))
  add "$c" peak "$(( ka_peak > peak ? ka_peak : peak ))"

  if [ "$c" != direct ] && want idle; then
    local fifo=idle.out ready
    rm -f $fifo
    python3 "$ROOT/bench/idle_conns.py" 127.0.0.1 "$PORT" $HOST "$IDLE" 100 120 > $fifo 2>idle.err </dev/null & local ip=$!
    for _ in $(seq 1 600); do ready=$(cat $fifo 2>/dev/null); [ -n "$ready" ] && break; sleep 0.2; done
    sleep 1
    pids_$c   # nginx workers may have changed; re-read
    add "$c" idle "$(( $(kb_sum VmRSS "$GW_PIDS") / 1024 ))"
    [ "${ready:-}" = "ready $IDLE 0" ] || echo "  $c idle: ${ready:-no answer} (opened, failed)" >&2
    kill $ip 2>/dev/null || true; wait $ip 2>/dev/null || true
  fi
  if ! want sse; then
    :
  elif [ "$c" != direct ]; then
    add "$c" sse "$(python3 "$ROOT/bench/sse_ttfb.py" "https://$HOST:$PORT/sse?count=2&interval=100" "$SSE_SAMPLES" "$ROOTPEM" | awk '{print $1}')"
  else
    add "$c" sse "$(python3 "$ROOT/bench/sse_ttfb.py" "http://$HOST:18001/sse?count=2&interval=100" "$SSE_SAMPLES" | awk '{print $1}')"
  fi
}

wait_chain() { # chain: the chain answers through every hop
  local c=$1
  for _ in $(seq 1 100); do
    if curl -s --max-time 2 --cacert "$ROOTPEM" "$(url "$c")" 2>/dev/null | grep -q "hello from backend"; then return 0; fi
    sleep 0.1
  done
  echo "bench: chain $c does not answer on $PORT" >&2; return 1
}

echo "bench: rounds=$ROUNDS secs=$SECS conns=$CONNS idle=$IDLE chains=[$CHAINS] dir=$W" >&2
# Each round has two phases, each running every chain once, started afresh and stopped after:
# first the keep-alive figures, then all the others. The machine's speed drifts over minutes (the
# client's and the backend's CPU per request, the same programs for every chain, has moved by half
# from one chain's run to another's), so the keep-alive figures that are compared are taken a minute
# or two apart, each after another chain's keep-alive run: not several minutes apart, each after
# whichever chain's handshake run and 10 000 idle connections (Caddy's take 400 MB) came before it.
# Within a phase the chains run in a shuffled order, a different one each round and phase (seeded
# by both, so a run can be repeated), so that no chain keeps one place or one predecessor. After
# each chain the machine gets a moment to settle.
order() { # seed -> the chains, shuffled, one per line
  printf '%s\n' $CHAINS | awk -v seed="$1" 'BEGIN{srand(seed)} {print rand() "\t" $0}' | sort -g | cut -f2
}
phase() { # round seed measure-function
  local c
  for c in $(order "$2"); do
    [ "$3" = measure_more ] && keepalive_only "$c" && continue
    echo "round $1: $c (${3#measure_})" >&2
    start_$c
    if wait_chain "$c"; then pids_$c; "$3" "$c"; fi
    stop_$c; sleep "${SETTLE:-2}"
  done
}
for r in $(seq 1 "$ROUNDS"); do
  PEAK=()
  want ka && phase "$r" $((2 * r)) measure_ka
  more_figures && phase "$r" $((2 * r + 1)) measure_more
done

# --------------------------------------------------------------------------------------------------
# Instructions per request: the user-space instructions of each hop under callgrind, over a fixed
# number of keep-alive requests (h2load --h1, 10 connections) after a warm-up. Unlike time, this
# does not move with what else runs on the machine, so it shows what a change to the request path
# is worth where the req/s figures' noise would hide it. It counts neither the kernel nor cache
# misses: it complements the CPU figure, it does not replace it. nginx runs one process per hop
# (master_process off), Phoenix as deployed.
INSTR_REQS=${INSTR_REQS:-3000}
callgrind_start() { # tag command... -> pid (valgrind runs the program in its own process)
  PHOENIX_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$W/callgrind.$1.%p" "${@:2}" >"$W/callgrind-$1.log" 2>&1 &
  echo $!
}
instr_of() { # tag pid -> instructions per request, from the dump taken after the counters were zeroed
  local f; f=$(ls -t "$W"/callgrind."$1"."$2".* 2>/dev/null | head -1)
  [ -n "$f" ] && awk -v n="$INSTR_REQS" '/^(summary|totals):/{printf "%.0f", $2/n; exit}' "$f"
}
if want instr; then
  for c in $CHAINS; do
    case $c in
      nginx)
        start_nginx; stop_nginx   # writes gw.conf and mesh.conf
        for hop in gw mesh; do
          sed 's/worker_processes auto; daemon on;/worker_processes 1; daemon off; master_process off;/' $hop.conf > $hop-1.conf
        done
        G=$(callgrind_start "$c-gw" nginx -c "$W/gw-1.conf" -p "$W")
        M=$(callgrind_start "$c-mesh" nginx -c "$W/mesh-1.conf" -p "$W")
        PORT=18443 ;;
      phoenix|phoenixb)
        b=$BIN; [ "$c" = phoenixb ] && b=${PHOENIX_BIN_B:?set PHOENIX_BIN_B for the phoenixb chain}
        M=$(callgrind_start "$c-mesh" "$b" mesh --config phoenix.toml)
        G=$(callgrind_start "$c-gw" "$b" gateway --config phoenix.toml)
        PORT=24443 ;;
      *) continue ;;
    esac
    echo "instructions: $c" >&2
    for _ in $(seq 1 300); do curl -s --max-time 5 --cacert "$ROOTPEM" "$(url "$c")" 2>/dev/null | grep -q "hello from backend" && break; sleep 0.2; done
    h2load --h1 -n 1000 -c 10 "$(url "$c")" >/dev/null 2>&1
    callgrind_control -z "$G" >/dev/null; callgrind_control -z "$M" >/dev/null
    out=$(h2load --h1 -n "$INSTR_REQS" -c 10 "$(url "$c")" 2>&1)
    callgrind_control -d "$G" >/dev/null; callgrind_control -d "$M" >/dev/null
    # valgrind is not this shell's child ($(...) started it), so `wait` returns at once: poll until
    # both have exited and written their last dump, or the counts may be read before they exist.
    kill "$G" "$M" 2>/dev/null
    for _ in $(seq 1 300); do kill -0 "$G" 2>/dev/null || kill -0 "$M" 2>/dev/null || break; sleep 0.1; done
    if echo "$out" | grep -q "$INSTR_REQS succeeded, 0 failed"; then
      add "$c" instr_gw "$(instr_of "$c-gw" "$G")"
      add "$c" instr_mesh "$(instr_of "$c-mesh" "$M")"
    else
      echo "  $c instructions: $(echo "$out" | grep '^requests:')" >&2
    fi
  done
fi

# --------------------------------------------------------------------------------------------------
# ACME issuance with lego: phoenix CA and Caddy's acme_server, interleaved. lego answers http-01 on
# 127.0.0.1:80; both CAs resolve lego.bench.test to 127.0.0.1 (phoenix from [ca.acme.resolve], Caddy
# from /etc/hosts).
cat > acme.Caddyfile <<EOF
{
	admin off
	skip_install_trust
	auto_https disable_redirects
	storage file_system $W/caddy-acme
}
https://acme.bench.test:27000 {
	bind 127.0.0.1
	tls internal
	acme_server
}
EOF
if want acme; then
PHOENIX_LOG=warn "$BIN" ca serve --config phoenix.toml >phoenix-ca.log 2>&1 & PCA=$!; PIDS+=($PCA)
HOME=$W caddy run --adapter caddyfile --config acme.Caddyfile >caddy-acme.log 2>&1 & CCA=$!; PIDS+=($CCA)
for _ in $(seq 1 100); do
  curl -s --cacert "$ROOTPEM" https://127.0.0.1:24000/acme/directory >/dev/null 2>&1 \
    && [ -f "$W/caddy-acme/pki/authorities/local/root.crt" ] \
    && curl -s --cacert "$W/caddy-acme/pki/authorities/local/root.crt" https://acme.bench.test:27000/acme/local/directory >/dev/null 2>&1 && break
  sleep 0.2
done
lego_once() { # name ca-file directory-url -> seconds
  local d=$W/lego-$1-$RANDOM t0 t1
  t0=$(date +%s.%N)
  LEGO_CA_CERTIFICATES=$2 lego --server "$3" --path "$d" --accept-tos --email bench@bench.test \
    --domains lego.bench.test --http --http.port 127.0.0.1:80 --key-type ec256 run >"$d.log" 2>&1 \
    || { echo "  lego against $1 failed: $(tail -3 "$d.log")" >&2; echo nan; return; }
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}'
}
for i in $(seq 1 "$ACME_RUNS"); do
  add phoenix acme "$(lego_once phoenix "$ROOTPEM" https://127.0.0.1:24000/acme/directory)"
  add caddy acme "$(lego_once caddy "$W/caddy-acme/pki/authorities/local/root.crt" https://acme.bench.test:27000/acme/local/directory)"
done
kill $PCA $CCA 2>/dev/null || true
fi

# --------------------------------------------------------------------------------------------------
# Report: medians, and ratios to nginx.
med() { tr ' ' '\n' | sed '/^$/d;/nan/d' | sort -g | awk '{a[NR]=$1} END{if(NR==0){print "-"} else if(NR%2){print a[(NR+1)/2]} else {print (a[NR/2]+a[NR/2+1])/2}}'; }
M() { echo "${R[$1.$2]:-}" | med; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a=="-" || b=="-" || b==0) print "-"; else printf "%.2f", a/b }'; }
sse_direct=$(M direct sse)
extra() { awk -v a="$1" -v b="$sse_direct" 'BEGIN{ if (a=="-" || b=="-") print "-"; else printf "%.0f", a-b }'; }

{
echo "Rounds: $ROUNDS x ${SECS}s, $CONNS connections (wrk -t1, h2load -t1 -m10), $IDLE idle connections, $SSE_SAMPLES SSE samples, $ACME_RUNS ACME issuances."
echo
echo "| chain | keep-alive req/s | p50 ms | p99 ms | close req/s | h2 req/s | CPU s/10k req | peak RSS MB | RSS with $IDLE idle MB | SSE extra first byte µs | lego issuance s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for c in $CHAINS; do
  sse=$(M "$c" sse); [ "$c" != direct ] && sse=$(extra "$sse") || sse="($sse abs.)"
  echo "| $c | $(M "$c" ka) | $(M "$c" p50) | $(M "$c" p99) | $(M "$c" close) | $(M "$c" h2) | $(M "$c" cpu) | $(M "$c" peak) | $(M "$c" idle) | $sse | $(M "$c" acme) |"
done
echo
echo "Ratios to nginx (higher is better for req/s; lower is better for the others):"
echo
echo "| chain | keep-alive req/s | p99 | close req/s | h2 req/s | CPU/req | RSS idle |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for c in $CHAINS; do
  [ "$c" = direct ] && continue
  echo "| $c | $(ratio "$(M "$c" ka)" "$(M nginx ka)") | $(ratio "$(M "$c" p99)" "$(M nginx p99)") | $(ratio "$(M "$c" close)" "$(M nginx close)") | $(ratio "$(M "$c" h2)" "$(M nginx h2)") | $(ratio "$(M "$c" cpu)" "$(M nginx cpu)") | $(ratio "$(M "$c" idle)" "$(M nginx idle)") |"
done
# Paired: each round's figure over nginx's in the same round. A phase's chains run within a minute
# or two of each other, the rounds several minutes apart, and the machine's speed drifts between
# rounds more than within one; the median of the paired ratios is the steadier estimate.
paired() { awk -v a="${R[$1.$2]:-}" -v b="${R[nginx.$2]:-}" 'BEGIN{
  n = split(a, x, " "); m = split(b, y, " "); k = 0
  for (i = 1; i <= n && i <= m; i++) if (y[i] > 0 && x[i] != "nan" && y[i] != "nan") r[++k] = x[i] / y[i]
  if (k == 0) { print "-"; exit }
  for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
  med = (k % 2) ? r[(k + 1) / 2] : (r[k / 2] + r[k / 2 + 1]) / 2
  s = ""; for (i = 1; i <= n && i <= m; i++) if (y[i] > 0) s = s sprintf("%s%.2f", (s == "" ? "" : ", "), x[i] / y[i])
  printf "%.2f (%s)", med, s }'; }
echo
echo "Paired ratios to nginx: the median over rounds of each round's figure over nginx's in that round"
echo "(the rounds' own ratios in brackets):"
echo
echo "| chain | keep-alive req/s | close req/s | h2 req/s |"
echo "|---|---|---|---|"
for c in $CHAINS; do
  case $c in direct|nginx) continue;; esac
  echo "| $c | $(paired "$c" ka) | $(paired "$c" close) | $(paired "$c" h2) |"
done
if want ka; then
  echo
  echo "Where the CPU goes in the keep-alive run (CPU s per 10 000 requests; \"rest\" is everything else the"
  echo "machine ran meanwhile: the client and the backend, mostly):"
  echo
  echo "| chain | proxies, user | proxies, kernel | rest | total |"
  echo "|---|---:|---:|---:|---:|"
  total() { awk -v u="$(M "$1" cpu_user)" -v s="$(M "$1" cpu_sys)" -v r="$(M "$1" cpu_rest)" 'BEGIN{ if (u=="-") print "-"; else printf "%.3f", u+s+r }'; }
  for c in $CHAINS; do
    [ "$c" = direct ] && continue
    echo "| $c | $(M "$c" cpu_user) | $(M "$c" cpu_sys) | $(M "$c" cpu_rest) | $(total "$c") |"
  done
  if [[ " $CHAINS " == *" nginx "* && " $CHAINS " == *" phoenix "* ]]; then
    # Requests per second follow total CPU per request once the machine is saturated, so 1.25 x nginx's
    # rate means at most 0.8 x its total; the rest (client, backend) is not the proxies' to save.
    awk -v tn="$(total nginx)" -v r="$(M phoenix cpu_rest)" -v s="$(M phoenix cpu_sys)" -v un="$(M nginx cpu_user)" 'BEGIN{
      if (tn=="-" || r=="-") exit; b=0.8*tn-r;
      printf "\nFor 1.25 x nginx'"'"'s keep-alive rate: total <= %.3f, so the proxies <= %.3f; Phoenix'"'"'s kernel time (%.3f)\nleaves %.3f for its user space, %.2f x nginx'"'"'s (%.3f).\n", 0.8*tn, b, s, b-s, (b-s)/un, un
      # The ceiling: the same kernel time and rest with no user space at all.
      printf "With no user space at all (its kernel time and the rest as measured), Phoenix'"'"'s chain would make\n%.2f x nginx'"'"'s rate.\n", tn/(s+r) }'
  fi
fi
if want instr; then
  echo
  echo "User-space instructions per request under callgrind ($INSTR_REQS keep-alive requests, h2load --h1 -c10):"
  echo
  echo "| chain | gateway | mesh | both hops | ratio to nginx |"
  echo "|---|---:|---:|---:|---:|"
  for c in $CHAINS; do
    g=$(M "$c" instr_gw); m=$(M "$c" instr_mesh)
    [ "$g" = - ] && continue
    both=$((g + m))
    echo "| $c | $g | $m | $both | $(ratio "$both" "$(( $(M nginx instr_gw) + $(M nginx instr_mesh) ))") |"
  done
fi
echo
echo "Per-round values:"
for k in $(printf '%s\n' "${!R[@]}" | sort); do echo "  $k: ${R[$k]}"; done
} | tee "$W/results.md"

#!/usr/bin/env bash
# msgflash-gateway against its peers: one command, see docs/benchmarks.md.
#
#   bench/run.sh            # full run: K=3 rounds x 5 scenarios x 6 targets, 10 s each, + half-peak
#   K=1 DURATION=3 bench/run.sh          # a quick look
#   bench/run.sh tune                    # the framework gap: passthrough variants vs nginx
#   bench/run.sh callgrind               # instructions per request (deterministic), by target
#   bench/run.sh allocs                  # heap allocations per request, by target
#   bench/run.sh tls                     # TLS at the edge: gateway vs nginx, same certificate
#
# Environment (defaults in brackets):
#   K [3]  rounds            DURATION [10] seconds per wrk run   CONNS [32] wrk connections
#   WRK_THREADS [1]
#   PIN [1]   1: one worker per proxy (nginx worker_processes = gateway/passthrough threads = 1),
#             every proxy pinned to CPU 1, wrk + upstream + redis pinned to CPU 0.
#             0: no pinning, WORKERS [2] workers per proxy, everything shares both cores.
#   SCENARIOS ["valid abusive bogus bogus_repeat jwt"]
#   TARGETS   ["direct passthrough nginx_proxy nginx_gw kong_local kong_redis gw_embedded gw_redis"];
#             gw_redis_b (with gw_redis): the binary GW_B on the same Redis, for an A/B of two builds
#             kong_*: a Kong-shaped gateway, nginx + ngx_lua (bench/kong/auth.lua): key-auth from a
#             shared dict, rate limiting with Kong's local or redis policy
#             refuser: the passthrough answering every request with the gateway's 401 itself
#             (PT_REFUSE=1): pingora's floor for a refusal; not in the defaults
#   HALF_PEAK [1]  also run the latency phase: valid traffic at a fixed rate, half of each
#             gateway's measured peak, from examples/openloop.rs (open loop, latency counted from
#             each request's due time); OPEN_CONNS [50] its connections; HALF_PEAK_RPS: one rate
#             to use instead of the measured halves
#   JOBS [1]  cargo -j (the machine is shared)       NO_BUILD [0]  1: use the existing binaries
#   PORT_BASE [27180]  the ports used are PORT_BASE .. PORT_BASE+16
# Raw output: target/bench/run-<UTC date>/ (target/bench/latest points to it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/bench
MODE=${1:-run}
K=${K:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
WRK_THREADS=${WRK_THREADS:-1}
PIN=${PIN:-1}
if [ "$PIN" = 1 ]; then WORKERS=1; else WORKERS=${WORKERS:-2}; fi
SCENARIOS=${SCENARIOS:-"valid abusive bogus bogus_repeat jwt"}
TARGETS=${TARGETS:-"direct passthrough nginx_proxy nginx_gw kong_local kong_redis gw_embedded gw_redis"}
HALF_PEAK=${HALF_PEAK:-1}
JOBS=${JOBS:-1}
NO_BUILD=${NO_BUILD:-0}
ACCOUNTS=${ACCOUNTS:-1000}
KEYS_PER_ACCOUNT=10

# Ports: PORT_BASE+0..9, below the ephemeral range so that nothing else picks them at random.
PB=${PORT_BASE:-27180}
P_UP=$PB P_PASS=$((PB + 1)) P_NGX_PROXY=$((PB + 2)) P_NGX_GW=$((PB + 3)) P_GW_EMB=$((PB + 4))
P_ADM_EMB=$((PB + 5)) P_GW_REDIS=$((PB + 6)) P_ADM_REDIS=$((PB + 7)) P_REDIS=$((PB + 8))
P_GW_TLS=$((PB + 9)) P_NGX_TLS=$((PB + 10)) P_KONG_L=$((PB + 11)) P_KONG_R=$((PB + 12))
P_ALLOC=$((PB + 13)) P_GW_REDIS_B=$((PB + 14)) P_ADM_REDIS_B=$((PB + 15)) P_REFUSER=$((PB + 16))

export MSGFLASH_ADMIN_TOKEN=$(openssl rand -hex 24)
export MSGFLASH_JWT_SECRET=$(openssl rand -hex 32)

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$ROOT/target/bench/$MODE-$STAMP
mkdir -p "$OUT"/{logs,wrk,conf}
ln -sfn "$OUT" "$ROOT/target/bench/latest"
[ "$MODE" = tune ] && ln -sfn "$OUT" "$ROOT/target/bench/latest-tune"
GW=$ROOT/target/release/msgflash-gateway
PASS=$ROOT/target/release/examples/passthrough_mimalloc   # the gateway's allocator
PASS_GLIBC=$ROOT/target/release/examples/passthrough      # glibc malloc (LD_PRELOAD-able)
OPENLOOP=$ROOT/target/release/examples/openloop
ALLOC=$ROOT/target/release/examples/alloc_count
OPEN_CONNS=${OPEN_CONNS:-50}

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# --- prerequisites -------------------------------------------------------------------------
install_missing() {
  local missing=()
  command -v nginx >/dev/null 2>&1 || missing+=(nginx)
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
  command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
  [ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing+=(libnginx-mod-http-lua)
  if [ "$MODE" = tls ]; then
    command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  fi
  if [ "$MODE" = tune ]; then
    [ -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] || missing+=(libjemalloc2)
    [ -e /usr/lib/x86_64-linux-gnu/libmimalloc.so.2 ] || missing+=(libmimalloc2.0)
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$OUT/logs/apt.log"
  fi
}
install_missing

if [ "$NO_BUILD" != 1 ]; then
  log "building (cargo -j$JOBS): release binary, passthrough, cache_memory and openloop examples"
  (cd "$ROOT" && cargo build --release -j"$JOBS" --bin msgflash-gateway \
    --example passthrough --example passthrough_mimalloc --example cache_memory \
    --example openloop $([ "$MODE" = allocs ] && echo --example alloc_count)) 2>&1 | tail -n 3 >&2
fi

# --- process management --------------------------------------------------------------------
PIDS=()
NGINX_DIRS=()
cleanup() {
  set +e
  for d in "${NGINX_DIRS[@]}"; do
    [ -f "$d/nginx.pid" ] && kill "$(cat "$d/nginx.pid")" 2>/dev/null
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
}
trap cleanup EXIT

WRAP="" # a command the proxies run under (callgrind mode)
proxy_cpu() { [ "$PIN" = 1 ] && echo "taskset -c 1" || true; }
load_cpu() { [ "$PIN" = 1 ] && echo "taskset -c 0" || true; }

wait_port() {
  local port=$1 i
  for i in $(seq "${WAIT_TRIES:-100}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  log "nothing listening on $port"; return 1
}

for port in $P_UP $P_PASS $P_NGX_PROXY $P_NGX_GW $P_GW_EMB $P_ADM_EMB $P_GW_REDIS $P_ADM_REDIS $P_REDIS $P_GW_TLS $P_NGX_TLS $P_KONG_L $P_KONG_R $P_ALLOC $P_GW_REDIS_B $P_ADM_REDIS_B; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    log "port $port is already in use (a previous run still alive?)"; exit 1
  fi
done

# nginx instance NAME WORKERS CPU_PREFIX: config from stdin (the http{} body)
start_nginx() {
  local name=$1 workers=$2 cpu=$3 dir=$OUT/conf/$1
  mkdir -p "$dir/tmp"
  {
    cat <<EOF
${NGX_MAIN:-}
user root;
worker_processes $workers;
pid $dir/nginx.pid;
error_log $OUT/logs/$name.error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
EOF
    cat
    echo "}"
  } >"$dir/nginx.conf"
  $cpu nginx -p "$dir" -e "$OUT/logs/$name.error.log" -c "$dir/nginx.conf"
  NGINX_DIRS+=("$dir")
}

PROXY_TO_UP="proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";"
UPSTREAM_BLOCK="upstream up { server 127.0.0.1:$P_UP; keepalive 128; keepalive_requests 1000000; }"

start_upstream() {
  log "upstream: nginx return 200 on :$P_UP ($WORKERS workers)"
  start_nginx upstream "$WORKERS" "$(load_cpu)" <<EOF
  server {
    listen 127.0.0.1:$P_UP backlog=4096;
    location / { default_type application/json; return 200 '{"ok":true}'; }
  }
EOF
  wait_port $P_UP
}

start_nginx_proxy() {
  log "nginx plain proxy on :$P_NGX_PROXY"
  start_nginx nginx_proxy "$WORKERS" "$(proxy_cpu)" <<EOF
  $UPSTREAM_BLOCK
  server {
    listen 127.0.0.1:$P_NGX_PROXY backlog=4096;
    location / { $PROXY_TO_UP }
  }
EOF
  wait_port $P_NGX_PROXY
}

start_nginx_gw() {
  local keys=$1
  log "nginx API-key gateway on :$P_NGX_GW ($(wc -l <"$keys") keys in the map)"
  awk '{ printf "\"%s\" \"bench%05d\";\n", $1, int((NR-1)/10) }' "$keys" >"$OUT/conf/keys.map"
  start_nginx nginx_gw "$WORKERS" "$(proxy_cpu)" <<EOF
  $UPSTREAM_BLOCK
  map_hash_max_size 16384;
  map_hash_bucket_size 512; # 74-byte keys: 128 forces nginx to ignore it (warning)
  map \$http_x_api_key \$account_id {
    default "";
    include $OUT/conf/keys.map;
  }
  limit_req_zone \$http_x_api_key zone=perkey:10m rate=10r/s;
  server {
    listen 127.0.0.1:$P_NGX_GW backlog=4096;
    ${NGX_TLS_LISTEN:-}
    default_type application/json;
    location /api/v1/ {
      if (\$http_x_api_key = "") {
        return 401 '{"error":{"code":"UNAUTHORIZED","message":"Missing API key. Send it in the x-api-key header."}}';
      }
      if (\$account_id = "") {
        return 401 '{"error":{"code":"UNAUTHORIZED","message":"Invalid or revoked API key"}}';
      }
      limit_req zone=perkey burst=10 nodelay;
      limit_req_status 429;
      error_page 429 = @rate_limited;
      proxy_set_header x-account-id \$account_id;
      proxy_set_header x-api-key "";
      proxy_set_header Host \$host;
      $PROXY_TO_UP
    }
    location @rate_limited {
      add_header Retry-After 1 always;
      return 429 '{"error":{"code":"API_RATE_LIMIT_EXCEEDED","message":"API rate limit exceeded"}}';
    }
    # Console routes: nginx has no JWT verification without njs/lua or the commercial
    # auth_jwt module, so this only proxies with the Authorization header (no check).
    location /api/ {
      proxy_set_header Host \$host;
      $PROXY_TO_UP
    }
    location / { return 404 '{"error":{"code":"NOT_FOUND","message":"Not found"}}'; }
  }
EOF
  wait_port $P_NGX_GW
}

# A Kong-shaped gateway: POLICY local (shared-dict counters) or redis (INCR + EXPIRE pipelines).
start_kong() { # NAME PORT POLICY KEYS
  local name=$1 port=$2 policy=$3 keys=$4
  log "Kong-shaped gateway $name on :$port (nginx + ngx_lua, $policy policy)"
  NGX_MAIN="load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
env KONG_REDIS_PORT;" KONG_REDIS_PORT=$P_REDIS start_nginx "$name" "$WORKERS" "$(proxy_cpu)" <<EOF
  $UPSTREAM_BLOCK
  lua_package_path "$BENCH/kong/?.lua;;";
  lua_shared_dict keys 8m;
  lua_shared_dict counters 32m;
  init_by_lua_block { require("auth").load("$keys") }
  server {
    listen 127.0.0.1:$port backlog=4096;
    default_type application/json;
    location /api/v1/ {
      access_by_lua_block { require("auth").access("$policy") }
      proxy_set_header Host \$host;
      $PROXY_TO_UP
    }
    # Console routes: only proxied, as nginx_gw does (no JWT check here either).
    location /api/ {
      proxy_set_header Host \$host;
      $PROXY_TO_UP
    }
    location / { return 404 '{"error":{"code":"NOT_FOUND","message":"Not found"}}'; }
  }
EOF
  wait_port "$port"
}

start_passthrough() {
  local name=$1 port=$2
  shift 2
  log "pingora passthrough $name on :$port ($*)"
  env PT_LISTEN=127.0.0.1:$port PT_UPSTREAM=127.0.0.1:$P_UP PT_THREADS="$WORKERS" \
    PT_PID_FILE="$OUT/conf/$name.pid" PT_UPGRADE_SOCK="$OUT/conf/$name.sock" "$@" \
    $(proxy_cpu) $WRAP "${PASS_BIN:-$PASS}" >"$OUT/logs/$name.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$OUT/conf/$name.pidnum"
  wait_port "$port"
}

start_redis() {
  log "redis-server on :$P_REDIS (own instance, no persistence)"
  $(load_cpu) redis-server --port $P_REDIS --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$OUT/conf" --logfile "$OUT/logs/redis.log" &
  PIDS+=($!)
  wait_port $P_REDIS
}

gw_config() { # NAME PORT ADMIN_PORT STORE_LINE; GW_SERVER_EXTRA: more [server] lines
  cat >"$OUT/conf/$1.toml" <<EOF
# msgflash-gateway bench config (written by bench/run.sh)
[server]
listen = "127.0.0.1:$2"
threads = $WORKERS
${GW_SERVER_EXTRA:-}
# Every request comes from one address here: without this, the unknown-key scenarios would
# measure the failed-authentication refusal (429 after 100 a minute) instead of the lookup path.
auth_failures_per_minute = 4000000000

[admin]
listen = "127.0.0.1:$3"

[store]
$4

[policies]
dir = "$BENCH/policies"

# nginx runs with access_log off too: the comparison is of the request path.
[log]
access_log = "off"

[jwt]
algorithms = ["HS256"]
issuer = "msgflash"
audience = "msgflash-console"

[upstreams.api]
addresses = ["127.0.0.1:$P_UP"]

[[routes]]
prefix = "/api/v1/"
auth = "api_key"
upstream = "api"

[[routes]]
prefix = "/api/"
auth = "jwt"
upstream = "api"
EOF
  "$GW" check -c "$OUT/conf/$1.toml" >&2
}

start_gateway() { # NAME PORT ADMIN_PORT STORE_LINE
  gw_config "$@"
  log "msgflash-gateway $1 on :$2 (admin :$3, $4)"
  RUST_LOG=${RUST_LOG:-warn} $(proxy_cpu) $WRAP "$GW" run -c "$OUT/conf/$1.toml" >"$OUT/logs/$1.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$OUT/conf/$1.pidnum"
  wait_port "$2"
  wait_port "$3"
}

# Commands executed by Redis (INFO itself excluded). Redis counts the commands that a script
# runs one by one, besides the EVALSHA itself: the per-command breakdown goes to FILE.
redis_calls() { # FILE
  redis-cli -p $P_REDIS INFO commandstats | tr -d '\r' | grep '^cmdstat_' | tee "$1" |
    awk -F'[:=,]' '$1 != "cmdstat_info" { s += $3 } END { print s + 0 }'
}

port_of() {
  case $1 in
    direct) echo $P_UP ;; passthrough*) echo $P_PASS ;; nginx_proxy) echo $P_NGX_PROXY ;;
    nginx_gw) echo $P_NGX_GW ;; gw_embedded*) echo $P_GW_EMB ;; gw_redis) echo $P_GW_REDIS ;; gw_redis_b) echo $P_GW_REDIS_B ;;
    kong_local) echo $P_KONG_L ;; kong_redis) echo $P_KONG_R ;; refuser) echo $P_REFUSER ;;
    *) log "unknown target $1"; exit 1 ;;
  esac
}
keys_of() { case $1 in gw_redis*) true ;; *) false ;; esac && echo "$OUT/conf/keys_redis.txt" || echo "$OUT/conf/keys_embedded.txt"; }

# CPU clock ticks (user + system) used so far by a target's processes: an nginx master and its
# workers, or a gateway or passthrough process (all its threads); 0 for anything else.
cpu_ticks() { # TARGET
  local t=$1 pids="" p total=0
  if [ -f "$OUT/conf/$t/nginx.pid" ]; then
    p=$(cat "$OUT/conf/$t/nginx.pid")
    pids="$p $(pgrep -P "$p" | tr '\n' ' ')"
  elif [ -f "$OUT/conf/$t.pidnum" ]; then
    pids=$(cat "$OUT/conf/$t.pidnum")
  fi
  for p in $pids; do
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

# run_wrk TARGET PORT SCENARIO ROUND TAG CONNS DELAY_MS
run_wrk() {
  local target=$1 port=$2 scenario=$3 round=$4 tag=$5 conns=$6 delay=$7
  local file=$OUT/wrk/$tag-$scenario-$target-r$round.txt before=0 after=0
  case $target in gw_redis*) before=$(redis_calls "$file.redis-before") ;; esac
  local cpu_before cpu_after
  cpu_before=$(cpu_ticks "$target")
  BENCH_MODE=$scenario BENCH_KEYS=$(keys_of "$target") BENCH_TOKEN=$TOKEN BENCH_DELAY_MS=$delay \
    $(load_cpu) wrk -t"$WRK_THREADS" -c"$conns" -d"${DURATION}s" --latency --timeout 5s \
    -s "$BENCH/wrk/load.lua" "http://127.0.0.1:$port" >"$file" 2>&1 || true
  case $target in gw_redis*) after=$(redis_calls "$file.redis-after") ;; esac
  cpu_after=$(cpu_ticks "$target")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tag" "$round" "$scenario" "$target" "$file" \
    "$((after - before))" "$conns" "$((cpu_after - cpu_before))" >>"$OUT/results.tsv"
  log "$(printf '%-6s r%s %-13s %-12s %s' "$tag" "$round" "$scenario" "$target" \
    "$(awk '/Requests\/sec/ { r = $2 } /Non-2xx/ { n = $NF } END { printf "%s req/s", r; if (n != "") printf ", non-2xx %s", n }' "$file")")"
  sleep 1 # let the buckets refill between runs
}

# run_open TARGET PORT ROUND TAG RATE: valid traffic at a fixed RATE from examples/openloop.rs
run_open() {
  local target=$1 port=$2 round=$3 tag=$4 rate=$5
  local file=$OUT/wrk/$tag-valid-$target-r$round.txt
  $(load_cpu) "$OPENLOOP" "127.0.0.1:$port" "$rate" "$DURATION" "$OPEN_CONNS" valid \
    "$(keys_of "$target")" >"$file" 2>&1 || true
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tag" "$round" valid "$target" "$file" 0 "$OPEN_CONNS" \
    >>"$OUT/results.tsv"
  log "$(printf '%-6s r%s %-12s %s' "$tag" "$round" "$target" \
    "$(awk '/Requests\/sec/ { printf "%s req/s", $2 } $1 == "99%" { printf ", p99 %s", $2 }' "$file")")"
  sleep 1
}

TOKEN=""
setup_all() {
  start_upstream
  case " $TARGETS " in *" passthrough "*) start_passthrough passthrough $P_PASS ;; esac
  case " $TARGETS " in *" refuser "*) start_passthrough refuser $P_REFUSER PT_REFUSE=1 ;; esac
  case " $TARGETS " in *" nginx_proxy "*) start_nginx_proxy ;; esac
  case " $TARGETS " in *" gw_redis "* | *" kong_redis "*) start_redis ;; esac
  rm -f "$OUT/conf/store.json"
  start_gateway gw_embedded $P_GW_EMB $P_ADM_EMB "data_file = \"$OUT/conf/store.json\""
  log "creating $ACCOUNTS accounts x $KEYS_PER_ACCOUNT keys on gw_embedded"
  python3 "$BENCH/mkkeys.py" 127.0.0.1:$P_ADM_EMB "$OUT/conf/keys_embedded.txt" "$ACCOUNTS" $KEYS_PER_ACCOUNT >&2
  case " $TARGETS " in *" gw_redis "*)
    start_gateway gw_redis $P_GW_REDIS $P_ADM_REDIS "redis_url = \"redis://127.0.0.1:$P_REDIS\""
    log "creating $ACCOUNTS accounts x $KEYS_PER_ACCOUNT keys on gw_redis"
    python3 "$BENCH/mkkeys.py" 127.0.0.1:$P_ADM_REDIS "$OUT/conf/keys_redis.txt" "$ACCOUNTS" $KEYS_PER_ACCOUNT >&2
    ;;
  esac
  # An A/B: another build (GW_B) on the same Redis and keys as gw_redis.
  case " $TARGETS " in *" gw_redis_b "*)
    GW=${GW_B:?gw_redis_b needs GW_B, the other binary} \
      start_gateway gw_redis_b $P_GW_REDIS_B $P_ADM_REDIS_B "redis_url = \"redis://127.0.0.1:$P_REDIS\""
    ;;
  esac
  case " $TARGETS " in *" nginx_gw "*) start_nginx_gw "$OUT/conf/keys_embedded.txt" ;; esac
  case " $TARGETS " in *" kong_local "*) start_kong kong_local $P_KONG_L local "$OUT/conf/keys_embedded.txt" ;; esac
  case " $TARGETS " in *" kong_redis "*) start_kong kong_redis $P_KONG_R redis "$OUT/conf/keys_embedded.txt" ;; esac
  TOKEN=$("$GW" -c "$OUT/conf/gw_embedded.toml" jwt mint bench00000 --sub u1 --ttl 2h)

  # sanity: a valid key and a console token are forwarded (200) by every target
  local t key code
  for t in $TARGETS; do
    [ "$t" = refuser ] && continue # answers 401 to everything, by design
    key=$(head -n 1 "$(keys_of "$t")")
    code=$(curl -s -o "$OUT/logs/sanity-$t.txt" -w '%{http_code}' -X POST \
      "http://127.0.0.1:$(port_of "$t")/api/v1/messages/send" -H "x-api-key: $key" \
      -H 'content-type: application/json' -d '{"to":"+33612345000"}')
    [ "$code" = 200 ] || { log "sanity: $t answered $code to a valid key"; exit 1; }
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(port_of "$t")/api/dashboard" \
      -H "authorization: Bearer $TOKEN")
    [ "$code" = 200 ] || { log "sanity: $t answered $code to a console token"; exit 1; }
  done
  log "sanity checks passed"
}

describe() {
  {
    echo "date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git=$(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet -- src || echo '+dirty-src')"
    echo "mode=$MODE K=$K DURATION=$DURATION CONNS=$CONNS WRK_THREADS=$WRK_THREADS WORKERS=$WORKERS PIN=$PIN"
    echo "scenarios=$SCENARIOS"
    echo "targets=$TARGETS"
    echo "keys=$((ACCOUNTS * KEYS_PER_ACCOUNT))"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//') x $(nproc)"
    echo "kernel=$(uname -r)"
    echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "nginx=$(nginx -v 2>&1 | cut -d/ -f2) wrk=$(wrk -v 2>&1 | head -n1 | awk '{print $2}') redis=$(redis-server --version | awk '{print $3}')"
  } >"$OUT/meta.txt"
}

main_run() {
  describe
  setup_all
  local round scenario target
  for round in $(seq "$K"); do
    for scenario in $SCENARIOS; do
      for target in $TARGETS; do
        run_wrk "$target" "$(port_of "$target")" "$scenario" "$round" main "$CONNS" 0
      done
    done
  done
  if [ "$HALF_PEAK" = 1 ]; then
    # Latency at half of a gateway's peak: every target gets the same fixed request rate from
    # the open-loop generator, so "added over direct" compares like with like.
    local gw peak rate
    for gw in gw_embedded gw_redis; do
      case " $TARGETS " in *" $gw "*) ;; *) continue ;; esac
      peak=$(python3 "$BENCH/report.py" "$OUT" --peak "$gw")
      rate=${HALF_PEAK_RPS:-$((peak / 2))}
      log "latency phase: $gw peak $peak req/s -> $rate req/s open loop over $OPEN_CONNS connections"
      printf 'half_%s_peak=%s\nhalf_%s_rate=%s\nopen_conns=%s\n' "$gw" "$peak" "$gw" "$rate" "$OPEN_CONNS" >>"$OUT/meta.txt"
      for round in $(seq "$K"); do
        for target in direct passthrough nginx_gw "$gw"; do
          case " $TARGETS " in *" $target "*) ;; *) continue ;; esac
          run_open "$target" "$(port_of "$target")" "$round" "half_$gw" "$rate"
        done
      done
    done
  fi
  echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/meta.txt"
  python3 "$BENCH/report.py" "$OUT" | tee "$OUT/summary.md"
  log "cache memory (examples/cache_memory):"
  "$ROOT/target/release/examples/cache_memory" 100000 | tee "$OUT/cache_memory.txt"
  log "raw output: $OUT"
}

# --- tune: pingora knobs on the passthrough, against nginx as a plain proxy ----------------
# A variant is a '+'-joined list of settings; "gw..." variants run msgflash-gateway (embedded
# store, valid traffic) instead of the passthrough, with the same allocator settings.
variant_env() { # VARIANT: prints the environment assignments, one a line
  local part parts
  IFS='+' read -ra parts <<<"$1"
  for part in "${parts[@]}"; do
    case $part in
      default | again | gw | mi) ;;
      nows) echo PT_WORK_STEALING=0 ;;
      pool1k) echo PT_POOL=1024 ;;
      lt2) echo PT_LISTENER_TASKS=2 ;;
      reuseport) echo PT_REUSEPORT=1; echo PT_LISTENER_TASKS=2 ;;
      kalimit) echo PT_KEEPALIVE_LIMIT=1000000 ;;
      threads1) echo PT_THREADS=1 ;;
      threads2) echo PT_THREADS=2 ;;
      threads4) echo PT_THREADS=4 ;;
      jemalloc) echo LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ;;
      mimalloc) echo LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libmimalloc.so.2 ;;
      arena1) echo GLIBC_TUNABLES=glibc.malloc.arena_max=1 ;;
      *) log "unknown setting $part in variant $1"; exit 1 ;;
    esac
  done
}

# perf profile of PIDS (comma-separated) while wrk runs (PROFILE=1, DURATION >= PROFILE_SECS + 2;
# PROFILE_HZ [499], PROFILE_SECS [3]):
# the top symbols go to target/bench/.../profiles/
PROFILE_JOB=""
wait_profiles() { [ -z "$PROFILE_JOB" ] || wait "$PROFILE_JOB" || true; PROFILE_JOB=""; }
profile_pid() { # NAME PIDS
  [ "${PROFILE:-0}" = 1 ] && command -v perf >/dev/null 2>&1 || return 0
  mkdir -p "$OUT/profiles"
  (set +e; sleep 1; perf record -e cpu-clock -F "${PROFILE_HZ:-499}" -g -p "$2" -o "$OUT/profiles/$1.data" -- sleep "${PROFILE_SECS:-3}" \
     >/dev/null 2>&1;
   perf report -i "$OUT/profiles/$1.data" --stdio --no-children -g none --sort dso,symbol 2>/dev/null |
     grep -v '^$' | grep -E '^ +[0-9]' | head -n 40 >"$OUT/profiles/$1.top.txt";
   perf report -i "$OUT/profiles/$1.data" --stdio --no-children -g none --sort dso 2>/dev/null |
     grep -E '^ +[0-9]' | head -n 15 >"$OUT/profiles/$1.dso.txt";
   echo "$(perf script -i "$OUT/profiles/$1.data" -F period 2>/dev/null | wc -l) samples at ${PROFILE_HZ:-499} Hz over ${PROFILE_SECS:-3} s" \
     >"$OUT/profiles/$1.samples.txt") &
  PROFILE_JOB=$!
}

tune_run() {
  describe
  TARGETS="direct passthrough nginx_proxy"
  local variants=${VARIANTS:-"default nows pool1k lt2 reuseport kalimit threads2 jemalloc mimalloc mi mi+nows again gw gw+threads2"}
  start_upstream
  start_nginx_proxy
  echo "msgf_live_$(printf '0%.0s' $(seq 64))" >"$OUT/conf/keys_embedded.txt"
  case " $variants " in *" gw"*)
    rm -f "$OUT/conf/store.json"
    start_gateway gw_embedded $P_GW_EMB $P_ADM_EMB "data_file = \"$OUT/conf/store.json\""
    python3 "$BENCH/mkkeys.py" 127.0.0.1:$P_ADM_EMB "$OUT/conf/keys_embedded.txt" "$ACCOUNTS" $KEYS_PER_ACCOUNT >&2
    kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'
    ;;
  esac
  local v round envs
  for round in $(seq "$K"); do
    # nginx's workers are the master's children
    profile_pid "nginx_proxy-r$round" "$(pgrep -d, -P "$(cat "$OUT/conf/nginx_proxy/nginx.pid")")"
    run_wrk nginx_proxy $P_NGX_PROXY valid "$round" tune "$CONNS" 0
    wait_profiles
    run_wrk direct $P_UP valid "$round" tune "$CONNS" 0
    for v in $variants; do
      mapfile -t envs < <(variant_env "$v")
      case $v in
        gw*)
          local cfg=$OUT/conf/gw_embedded.toml e
          for e in "${envs[@]}"; do
            case $e in PT_THREADS=*)
              cfg=$OUT/conf/gw_embedded_t${e#PT_THREADS=}.toml
              sed "s/^threads = .*/threads = ${e#PT_THREADS=}/" "$OUT/conf/gw_embedded.toml" >"$cfg" ;;
            esac
          done
          log "msgflash-gateway ($v, $(grep '^threads' "$cfg"))"
          env "${envs[@]}" RUST_LOG=warn $(proxy_cpu) "$GW" run -c "$cfg" \
            >"$OUT/logs/gw_$v.log" 2>&1 &
          PIDS+=($!)
          wait_port $P_GW_EMB
          profile_pid "$v-r$round" "${PIDS[-1]}"
          run_wrk "gw_embedded_$v" $P_GW_EMB valid "$round" tune "$CONNS" 0
          ;;
        *)
          # the glibc build, so that LD_PRELOAD can swap the allocator; "mi..." = the mimalloc build
          case $v in mi | mi+*) PASS_BIN=$PASS ;; *) PASS_BIN=$PASS_GLIBC ;; esac
          start_passthrough "pt_$v" $P_PASS "${envs[@]}"
          unset PASS_BIN
          profile_pid "passthrough_$v-r$round" "${PIDS[-1]}"
          run_wrk "passthrough_$v" $P_PASS valid "$round" tune "$CONNS" 0
          ;;
      esac
      wait_profiles
      kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
      unset 'PIDS[-1]'
      sleep 0.5
    done
  done
  echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/meta.txt"
  python3 "$BENCH/report.py" "$OUT" --tune | tee "$OUT/summary.md"
  log "raw output: $OUT"
}

# --- callgrind: instructions per request, which do not depend on what else the machine does ---
# Each target runs under valgrind's callgrind; one Python client sends WARMUP requests, the
# counters are zeroed, then N more requests; the whole process's instruction total for those N
# (every thread: runtime, timers, store) divided by N is the figure.
cg_measure() { # NAME PORT KEY SCENARIO
  local name=$1 port=$2 key=$3 scenario=$4 pid=${PIDS[-1]} n=${CG_REQUESTS:-2000} statuses dump
  python3 "$BENCH/client.py" "127.0.0.1:$port" "${CG_WARMUP:-200}" "$key" >/dev/null
  callgrind_control -z "$pid" >/dev/null
  statuses=$(python3 "$BENCH/client.py" "127.0.0.1:$port" "$n" "$key")
  callgrind_control -d "$pid" >/dev/null
  dump=$(ls -t "$OUT/callgrind/$name.$pid".* | head -n 1)
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$scenario" "$n" "$statuses" \
    "$(awk '/^(totals|summary):/ { print $2; exit }' "$dump")" >>"$OUT/callgrind.tsv"
  log "$name $scenario: $statuses, $(tail -n 1 "$OUT/callgrind.tsv" | cut -f5) instructions"
}

# One key on the bench plan (10 r/s: the client outruns it, so nearly every request is refused)
# and one on the unmetered plan (every request is forwarded).
cg_keys() { # ADMIN_PORT SUFFIX
  local plan
  for plan in bench unmetered; do
    BENCH_PLAN=$plan python3 "$BENCH/mkkeys.py" "127.0.0.1:$1" "$OUT/conf/cg_${plan}_$2.txt" 1 1 "cg$plan" >&2
  done
}

cg_start() { # NAME: sets WRAP for the next start_* call
  mkdir -p "$OUT/callgrind"
  WRAP="valgrind --tool=callgrind --callgrind-out-file=$OUT/callgrind/$1.%p"
  WAIT_TRIES=600
}

cg_stop() {
  WRAP=""
  kill -INT "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'
}

callgrind_run() {
  describe
  local bogus="msgf_live_$(printf '0%.0s' $(seq 64))" key
  start_upstream
  cg_start passthrough
  start_passthrough passthrough $P_PASS
  cg_measure passthrough $P_PASS "$bogus" valid
  cg_stop
  cg_start refuser
  start_passthrough refuser $P_REFUSER PT_REFUSE=1
  cg_measure refuser $P_REFUSER "$bogus" refused
  cg_stop
  rm -f "$OUT/conf/store.json"
  cg_start gw_embedded
  start_gateway gw_embedded $P_GW_EMB $P_ADM_EMB "data_file = \"$OUT/conf/store.json\""
  cg_keys $P_ADM_EMB embedded
  cg_measure gw_embedded $P_GW_EMB "$(cat "$OUT/conf/cg_unmetered_embedded.txt")" valid
  cg_measure gw_embedded $P_GW_EMB "$(cat "$OUT/conf/cg_bench_embedded.txt")" abusive
  cg_measure gw_embedded $P_GW_EMB "$bogus" bogus_repeat
  cg_stop
  case " $TARGETS " in *" gw_redis "*)
    start_redis
    cg_start gw_redis
    start_gateway gw_redis $P_GW_REDIS $P_ADM_REDIS "redis_url = \"redis://127.0.0.1:$P_REDIS\""
    cg_keys $P_ADM_REDIS redis
    cg_measure gw_redis $P_GW_REDIS "$(cat "$OUT/conf/cg_unmetered_redis.txt")" valid
    cg_measure gw_redis $P_GW_REDIS "$(cat "$OUT/conf/cg_bench_redis.txt")" abusive
    cg_stop
    ;;
  esac
  python3 "$BENCH/report.py" "$OUT" --callgrind | tee "$OUT/summary.md"
  log "raw output: $OUT"
}

# --- allocs: heap allocations per request, counted by examples/alloc_count.rs -----------------
# The same targets and workload as callgrind, each run inside alloc_count (which counts every
# allocation of the process); its counters are read before and after N requests.
al_stats() { python3 -c 'import socket, sys
print(socket.create_connection(("127.0.0.1", int(sys.argv[1]))).makefile().readline().strip())' "$P_ALLOC"; }

al_measure() { # NAME PORT KEY SCENARIO
  local name=$1 port=$2 key=$3 scenario=$4 n=${CG_REQUESTS:-2000} before after statuses
  python3 "$BENCH/client.py" "127.0.0.1:$port" "${CG_WARMUP:-200}" "$key" >/dev/null
  before=$(al_stats)
  statuses=$(python3 "$BENCH/client.py" "127.0.0.1:$port" "$n" "$key" | tr ' ' ',')
  after=$(al_stats)
  echo "$name $scenario $n $statuses $before $after" | awk '{
    n = $3; printf "| %s | %s | %s | %.1f | %.2f | %.0f |\n", $1, $2, $4, ($8 - $5) / n, ($9 - $6) / n, ($10 - $7) / n
  }' | tee -a "$OUT/allocs.md" >&2
}

allocs_run() {
  describe
  local bogus="msgf_live_$(printf '0%.0s' $(seq 64))"
  # ALLOC_WRAP: a tool to run each target under, e.g. "valgrind --tool=dhat
  # --dhat-out-file=target/dhat.%p.json" for the allocation sites.
  [ -n "${ALLOC_WRAP:-}" ] && WAIT_TRIES=600
  local counted="env ALLOC_STATS=127.0.0.1:$P_ALLOC ${ALLOC_WRAP:-} $ALLOC"
  WRAP=$counted
  printf '| target | scenario | statuses | allocations / request | reallocations / request | bytes / request |\n|---|---|---|---:|---:|---:|\n' >"$OUT/allocs.md"
  start_upstream
  start_passthrough passthrough $P_PASS
  al_measure passthrough $P_PASS "$bogus" valid
  cg_stop
  WRAP=$counted
  rm -f "$OUT/conf/store.json"
  start_gateway gw_embedded $P_GW_EMB $P_ADM_EMB "data_file = \"$OUT/conf/store.json\""
  cg_keys $P_ADM_EMB embedded
  al_measure gw_embedded $P_GW_EMB "$(cat "$OUT/conf/cg_unmetered_embedded.txt")" valid
  al_measure gw_embedded $P_GW_EMB "$(cat "$OUT/conf/cg_bench_embedded.txt")" abusive
  al_measure gw_embedded $P_GW_EMB "$bogus" bogus_repeat
  cg_stop
  WRAP=$counted
  start_redis
  start_gateway gw_redis $P_GW_REDIS $P_ADM_REDIS "redis_url = \"redis://127.0.0.1:$P_REDIS\""
  cg_keys $P_ADM_REDIS redis
  al_measure gw_redis $P_GW_REDIS "$(cat "$OUT/conf/cg_unmetered_redis.txt")" valid
  al_measure gw_redis $P_GW_REDIS "$(cat "$OUT/conf/cg_bench_redis.txt")" abusive
  cg_stop
  cp "$OUT/allocs.md" "$OUT/summary.md"
  cat "$OUT/summary.md"
  log "raw output: $OUT"
}

# --- tls: TLS at the edge, the gateway against nginx with the same certificate -------------
# Both terminate TLS (ECDSA P-256 certificate, TLS 1.3 negotiated) in front of the same
# upstream, one worker each, pinned as in the main run. Scenarios:
#   tls_keepalive  valid keys over HTTP/1.1 keep-alive connections (wrk, CONNS connections)
#   tls_handshake  the same requests, each on a new connection: a full handshake per request
#                  (wrk sends "connection: close"; it does not resume sessions)
#   h2             console JWT requests over HTTP/2, 10 streams per connection (h2load)
# nginx is the API-key gateway of the main run (map + limit_req) with an ssl/http2 listener.
tls_run() {
  describe
  log "certificate: ECDSA P-256, CN/SAN bench.test"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
    -keyout "$OUT/conf/tls.key" -out "$OUT/conf/tls.pem" 2>"$OUT/logs/openssl.log"
  start_upstream
  rm -f "$OUT/conf/store.json"
  GW_SERVER_EXTRA="tls = { listen = \"127.0.0.1:$P_GW_TLS\", certificates = [{ cert = \"$OUT/conf/tls.pem\", key = \"$OUT/conf/tls.key\" }] }" \
    start_gateway gw_embedded $P_GW_EMB $P_ADM_EMB "data_file = \"$OUT/conf/store.json\""
  wait_port $P_GW_TLS
  log "creating $ACCOUNTS accounts x $KEYS_PER_ACCOUNT keys on gw_embedded"
  python3 "$BENCH/mkkeys.py" 127.0.0.1:$P_ADM_EMB "$OUT/conf/keys_embedded.txt" "$ACCOUNTS" $KEYS_PER_ACCOUNT >&2
  NGX_TLS_LISTEN="listen 127.0.0.1:$P_NGX_TLS ssl http2 backlog=4096; ssl_certificate $OUT/conf/tls.pem; ssl_certificate_key $OUT/conf/tls.key; ssl_protocols TLSv1.2 TLSv1.3;" \
    start_nginx_gw "$OUT/conf/keys_embedded.txt"
  wait_port $P_NGX_TLS
  TOKEN=$("$GW" -c "$OUT/conf/gw_embedded.toml" jwt mint bench00000 --sub u1 --ttl 2h)
  local round target port scenario file
  for round in $(seq "$K"); do
    for scenario in tls_keepalive tls_handshake h2; do
      for target in nginx_gw gw_embedded; do
        [ $target = nginx_gw ] && port=$P_NGX_TLS || port=$P_GW_TLS
        file=$OUT/wrk/tls-$scenario-$target-r$round.txt
        case $scenario in
          tls_keepalive | tls_handshake)
            BENCH_MODE=valid BENCH_KEYS=$OUT/conf/keys_embedded.txt \
              BENCH_CLOSE=$([ $scenario = tls_handshake ] && echo 1 || echo 0) \
              $(load_cpu) wrk -t"$WRK_THREADS" -c"$CONNS" -d"${DURATION}s" --latency --timeout 5s \
              -s "$BENCH/wrk/load.lua" "https://127.0.0.1:$port" >"$file" 2>&1 || true ;;
          h2)
            $(load_cpu) h2load -c "$CONNS" -m 10 -D "$DURATION" --warm-up-time=1 \
              -H "authorization: Bearer $TOKEN" "https://127.0.0.1:$port/api/dashboard" \
              >"$file" 2>&1 || true ;;
        esac
        printf '%s\t%s\t%s\t%s\n' "$round" "$scenario" "$target" "$file" >>"$OUT/tls.tsv"
        log "$(printf 'r%s %-13s %-12s %s' "$round" "$scenario" "$target" \
          "$(awk '/Requests\/sec/ { printf "%s req/s", $2 } /Non-2xx/ { printf ", non-2xx %s", $NF }
                  /^finished in/ { printf "%s req/s", $4 } /^status codes/ { printf ", %s", $0 }' "$file")")"
        sleep 1
      done
    done
  done
  echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/meta.txt"
  python3 "$BENCH/report.py" "$OUT" --tls | tee "$OUT/summary.md"
  log "raw output: $OUT"
}

case $MODE in
  run) main_run ;;
  tune) tune_run ;;
  callgrind) callgrind_run ;;
  allocs) allocs_run ;;
  tls) tls_run ;;
  *) echo "usage: bench/run.sh [run|tune|callgrind|allocs|tls]" >&2; exit 2 ;;
esac; exit $? # on the same line: bash reads no further, so editing this file mid-run is harmless

#!/usr/bin/env bash
# bench/run.sh BUILD_DIR (`make bench`): Parley's standard benchmark, a short
# set of parley-bench scenarios against both deployments:
#   parleyd  the all-in-one process over its SQLite bus and store (one
#            listener, fresh data folder per scenario);
#   stack    the microservices over a private Kafka + MongoDB-wire server
#            (own ports and data folder, so a running `make run` or
#            `make test` is left alone): presence, message-store, receipt,
#            group-fanout and two gateways;
#   peer     Debian's ejabberd, a server users already know, driven by the
#            same parley-bench over XMPP-over-WebSocket (--proto xmpp):
#            the latency, rate, max and idle (synced = bound) scenarios,
#            a private instance per scenario (bench/ejabberd.sh).
# Writes bench/results/latest.{json,md} (every mode, machine, load average,
# settings) and latency.svg (p50 and p99 against offered rate, gnuplot,
# bench/latency.gp), and stops everything it started. Timings are reported,
# never asserted. The whole set is sized to finish in under 10 minutes on
# 2 cores.
#
# Environment (defaults):
#   BENCH_MODES ("parleyd stack peer")  BENCH_PAIRS (100)  BENCH_DURATION (10)
#   BENCH_SCENARIOS ("latency rate max group groupdevices sync idle"): which
#     to run; groupdevices is the group scenario with every member on
#     BENCH_GROUP_DEVICES (3) devices (issue 17)
#   BENCH_PD_RATES ("1000 10000")  BENCH_STACK_RATES ("100 1000"); empty: none
#   BENCH_PD_IDLE_RATES ("")  BENCH_STACK_IDLE_RATES ("1000"): rate runs again
#     beside BENCH_RATE_IDLE_CONNS (10000) more connections, synced before the
#     run and held through it on BENCH_RATE_IDLE_PROCS (2) load processes
#     (the targets' "1,000/s with 10,000 connected clients"); part of `rate`
#   BENCH_PEER_RATES (BENCH_PD_RATES): the peer runs parleyd's rate steps
#   BENCH_PD_MAX_FROM (500)  BENCH_STACK_MAX_FROM (50)  BENCH_PEER_MAX_FROM (1000):
#     where max's ladder starts
#   BENCH_MAX_STEP_S (4)  BENCH_GROUP_MSGS (30)
#   BENCH_PRIME_S (3): 1:1 at 100/s for this long on each scenario's freshly
#     started services before it is measured (its own users, not reported),
#     the idle ones excepted; 0 skips
#   BENCH_PD_SYNC_PENDING (10000)  BENCH_STACK_SYNC_PENDING (10000); 0 skips
#   BENCH_STACK_WARMUP_S (15): once the stack is up, 1:1 at 500/s for this
#     long on throwaway services, not reported, so the measured scenarios
#     meet a broker whose JIT has compiled its hot paths; 0 skips
#   BENCH_IDLE_SYNCED (1000): idle connections each waiting for `synced`
#   BENCH_PEER_IDLE_CONNS (3000): the same for the peer (bound); fewer leave
#     its memory per connection lost in the Erlang VM's own swings
#   BENCH_PD_IDLE_CONNS (0)  BENCH_STACK_IDLE_CONNS (30000): idle connections
#     counted at the 101 upgrade (the gateway's own memory and connect rate
#     at the target's scale; 2 gateways in stack mode)
#   BENCH_IDLE_PROCS (3)  BENCH_IDLE_HOLD (5)  BENCH_OUT (bench/results)  BENCH_KEEP_LOGS (0)
#   BENCH_LATENCY_RATE (100): the latency scenario's fixed rate; 0 skips it
#   BENCH_SLOW_MS (none): every message at least this late is logged with its
#     send time (slow-<mode>-<tag>.log beside the services' logs, then kept),
#     to lay a run's p99 beside what the services logged at that moment;
#     kept logs also get each service's /metrics at each scenario's end
#     (metrics-<mode>-<tag>-<port>.txt)
#   BENCH_PD_PORT (28600)  BENCH_EJ_PORT (26950): ejabberd's WebSocket listener
#   BENCH_KAFKA_PORT (29492, +1) BENCH_MONGO_PORT (27048; its PostgreSQL -1000)
#   BENCH_GW_PORT (28481, +1, +10..+13): every default port sits below the
#   ephemeral range (32768-60999), where an outgoing connection could hold it
# Every failure says why on stderr (a failing command names its line).
# Every scenario runs against freshly started services with their own topics
# and database (or data folder), so none waits behind another's backlog.
# Needs jq for the report.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/rel}
bench=$build/bin/parley-bench

MODES=${BENCH_MODES:-parleyd stack peer}
IDLE_SYNCED=${BENCH_IDLE_SYNCED:-1000}
IDLE_PROCS=${BENCH_IDLE_PROCS:-3}
IDLE_HOLD=${BENCH_IDLE_HOLD:-5}
PAIRS=${BENCH_PAIRS:-100}
DURATION=${BENCH_DURATION:-10}
MAX_STEP_S=${BENCH_MAX_STEP_S:-4}
GROUP_MSGS=${BENCH_GROUP_MSGS:-30}
OUT=${BENCH_OUT:-bench/results}
GW_PORT=${BENCH_GW_PORT:-28481}
PD_PORT=${BENCH_PD_PORT:-28600}
EJ_PORT=${BENCH_EJ_PORT:-26950}
LATENCY_RATE=${BENCH_LATENCY_RATE:-100}

say() { echo "bench: $*" >&2; }
said=0
die() { echo "bench: $*" >&2; said=1; exit 1; }
# What the run was doing, for the exit message: set -e alone ends a run
# silently (a fresh-clone `make bench` once said only "Error 2").
step="checking the setup"
command -v jq >/dev/null || die "jq is needed for the report (apt-get install jq)"
[ -x "$bench" ] || die "$bench is missing; run make first"
[ -x "$build/bin/parleyd" ] || [[ $MODES != *parleyd* ]] || die "$build/bin/parleyd is missing"
[[ $MODES != *peer* ]] || bash bench/ejabberd.sh check ||
  die "the peer mode needs Debian's ejabberd (deploy/local/deps.sh bench, or BENCH_MODES without peer)"

# Each gateway holds up to 15k sockets and each load process up to 10k.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge 16000 ] || say "warning: ulimit -n is $(ulimit -n); large idle runs will fail"

export PARLEY_STACK_DIR=${BENCH_STACK_DIR:-$(mktemp -d /tmp/parley-bench-stack.XXXXXX)}
export PARLEY_KAFKA_PORT=${BENCH_KAFKA_PORT:-29492}
export PARLEY_KAFKA_CONTROLLER_PORT=$((PARLEY_KAFKA_PORT + 1))
export PARLEY_MONGO_PORT=${BENCH_MONGO_PORT:-27048}
export PARLEY_STACK_FRESH=1

pids=()
workdir=$(mktemp -d /tmp/parley-bench.XXXXXX)
keep_logs=${BENCH_KEEP_LOGS:-0} # 1: keep the services' logs even when all went well
[ -z "${BENCH_SLOW_MS:-}" ] || keep_logs=1
stop_pid() { # pid name: TERM, then KILL after 15 s (a backlog must not hold the run)
  local i
  kill -TERM "$1" 2>/dev/null || return 0
  for ((i = 0; i < 150; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$1" 2>/dev/null; then
    say "$2 (pid $1) did not stop within 15 s of SIGTERM; killed"
    kill -KILL "$1" 2>/dev/null || true
    keep_logs=1
  fi
  wait "$1" 2>/dev/null || true
}
stack_started=0
cleanup() {
  local rc=$? cmd=$BASH_COMMAND
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ]; then
    keep_logs=1
    [ "$said" = 1 ] || say "stopped with exit $rc during $step; last command: $cmd"
  fi
  services_down
  if [ "$stack_started" = 1 ]; then
    cp "$PARLEY_STACK_DIR"/*.log "$workdir/" 2>/dev/null || true
    bash deploy/local/stack.sh destroy >&2 || true
  fi
  # A run without the stack (parleyd and peer only) leaves no empty folder.
  [ -n "${BENCH_STACK_DIR:-}" ] || rmdir "$PARLEY_STACK_DIR" 2>/dev/null || true
  if [ "$keep_logs" = 1 ]; then say "service logs kept in $workdir"; else rm -rf "$workdir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t_start=$SECONDS
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
stamp=$(date +%s)
export PARLEY_JWT_SECRET=bench-$stamp-$RANDOM$RANDOM
export PARLEY_LOG_LEVEL=${PARLEY_LOG_LEVEL:-warn}
export PARLEY_MAX_CONNS=${PARLEY_MAX_CONNS:-19000}
stack_up() {
  local t0=$SECONDS
  step="starting the stack"
  bash deploy/local/stack.sh start all >&2 || die "the local stack did not start"
  stack_started=1
  export PARLEY_KAFKA_BROKERS=127.0.0.1:$PARLEY_KAFKA_PORT
  export PARLEY_MONGO_URI="mongodb://127.0.0.1:$PARLEY_MONGO_PORT/?retryWrites=false"
  kafka_pid=$(cat "$PARLEY_STACK_DIR/kafka.pid")
  mongo_pid=$(cat "$PARLEY_STACK_DIR/mongo.pid")
  # FerretDB's PostgreSQL, when it has one: its backends do the queries.
  pg_pid=$(pgrep -o -f -- "postgres -D .* -p ${PARLEY_PG_PORT:-$((PARLEY_MONGO_PORT - 1000))} " || true)
  say "stack up in $((SECONDS - t0)) s"
}

# name port [gateway-id]: gateways listen on port, the others serve admin there.
start() {
  if [ -n "${3:-}" ]; then
    PARLEY_GATEWAY_ID=$3 PARLEY_LISTEN=127.0.0.1:$2 PARLEY_ADMIN_LISTEN=off \
      "$build/bin/$1" >>"$workdir/$1-$3.log" 2>&1 &
  else
    PARLEY_ADMIN_LISTEN=127.0.0.1:$2 "$build/bin/$1" >>"$workdir/$1.log" 2>&1 &
  fi
  pids+=($!)
}
ready() { # port: /readyz answers 200 within 60 s
  local i
  for ((i = 0; i < 600; i++)); do
    curl -fs -o /dev/null "http://127.0.0.1:$1/readyz" && return 0
    sleep 0.1
  done
  return 1
}
ready_all() { # port...
  local port
  for port in "$@"; do
    ready "$port" || { tail -n 20 "$workdir"/*.log >&2; die "a service on $port never became ready"; }
  done
}

# Each scenario gets fresh services, topics and database: whatever one
# scenario left behind (inbox backlog, dedupe marks, presence churn) would
# slow the next one. metrics_port: where message-store's /metrics is.
declare -A comp
mode=parleyd
metrics_port=
age_ports=()
urls=()
services_up() { # tag
  pids=()
  # A leftover listener on the port would answer /readyz for a process that never bound it.
  ! curl -fs -o /dev/null "http://127.0.0.1:$PD_PORT/readyz" || die "port $PD_PORT is taken"
  if [ "$mode" = peer ]; then
    peer_up "$1"
    return
  fi
  if [ "$mode" = parleyd ]; then
    PARLEY_DATA_DIR=$workdir/pd-$1 PARLEY_LISTEN=127.0.0.1:$PD_PORT \
      "$build/bin/parleyd" >>"$workdir/parleyd.log" 2>&1 &
    pids+=($!)
    ready_all "$PD_PORT"
    comp=([parleyd]=${pids[0]})
    metrics_port=$PD_PORT
    age_ports=("$PD_PORT")
    urls=(--url "ws://127.0.0.1:$PD_PORT" --gw-pids "${pids[0]}")
    return
  fi
  export PARLEY_TOPIC_PREFIX=bench$stamp$1. PARLEY_MONGO_DB=bench_${stamp}_$1
  start presence $((GW_PORT + 10))
  start message-store $((GW_PORT + 11))
  start group-fanout $((GW_PORT + 12))
  start gateway "$GW_PORT" gw-1
  start gateway $((GW_PORT + 1)) gw-2
  start receipt $((GW_PORT + 13))
  ready_all $((GW_PORT + 10)) $((GW_PORT + 11)) $((GW_PORT + 12)) "$GW_PORT" $((GW_PORT + 1)) \
    $((GW_PORT + 13))
  comp=([kafka]=$kafka_pid [mongo]=$mongo_pid [presence]=${pids[0]} [message_store]=${pids[1]}
    [group_fanout]=${pids[2]} [gateway_1]=${pids[3]} [gateway_2]=${pids[4]} [receipt]=${pids[5]})
  [ -z "${pg_pid:-}" ] || comp[postgres]=pg:$pg_pid
  metrics_port=$((GW_PORT + 11))
  age_ports=("$GW_PORT" $((GW_PORT + 1)) $((GW_PORT + 10)) $((GW_PORT + 11)) $((GW_PORT + 12)) $((GW_PORT + 13)))
  urls=(--url "ws://127.0.0.1:$GW_PORT" --url2 "ws://127.0.0.1:$((GW_PORT + 1))"
    --gw-pids "${pids[3]},${pids[4]}")
}
# A private ejabberd per scenario, ready when its HTTP listener answers (it
# opens its listeners last). It logs into its own folder, kept with the rest.
peer_up() { # tag
  local i
  ! curl -s -o /dev/null "http://127.0.0.1:$EJ_PORT/" || die "port $EJ_PORT is taken"
  bash bench/ejabberd.sh "$workdir/ejabberd-$1" "$EJ_PORT" >>"$workdir/ejabberd.log" 2>&1 &
  pids+=($!)
  for ((i = 0; i < 600; i++)); do
    curl -s -o /dev/null "http://127.0.0.1:$EJ_PORT/ws" && break
    kill -0 "${pids[0]}" 2>/dev/null || break
    sleep 0.1
  done
  curl -s -o /dev/null "http://127.0.0.1:$EJ_PORT/ws" ||
    { tail -n 20 "$workdir/ejabberd.log" "$workdir/ejabberd-$1"/*.log >&2; die "ejabberd never listened on $EJ_PORT"; }
  comp=([ejabberd]=${pids[0]})
  metrics_port=
  age_ports=()
  urls=(--proto xmpp --url "ws://127.0.0.1:$EJ_PORT" --gw-pids "${pids[0]}")
}
services_down() {
  local p
  for p in "${pids[@]}"; do stop_pid "$p" "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-40)"; done
  pids=()
}
# ---- CPU accounting: what each component burned during a scenario ---------

ticks() { # pid, or pg:PID for a PostgreSQL server and its live backends
  local p
  if [[ $1 == pg:* ]]; then
    for p in ${1#pg:} $(pgrep -P "${1#pg:}"); do awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null; done |
      awk '{ s += $1 } END { print s + 0 }'
    return
  fi
  awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}
# CPU of this shell's reaped children, i.e. parley-bench and its load
# processes, into $bench_ticks. `times` must run in this shell, not in a
# subshell, which would start with no children of its own.
bench_ticks=0
bench_ticks_now() {
  times >"$workdir/times"
  bench_ticks=$(awk -v hz="$(getconf CLK_TCK)" 'NR == 2 { gsub(/[ms]/, " "); print int(($1 * 60 + $2 + $3 * 60 + $4) * hz) }' "$workdir/times")
}
declare -A before
cpu_mark() {
  local c
  for c in "${!comp[@]}"; do before[$c]=$(ticks "${comp[$c]}"); done
  bench_ticks_now
  before[bench]=$bench_ticks
  before[wall]=$(date +%s.%N)
}
cpu_json() { # percent of one core per component since cpu_mark
  local c wall json="{}"
  wall=$(awk -v a="${before[wall]}" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  for c in "${!comp[@]}"; do
    json=$(jq -c --arg c "$c" --argjson t "$(($(ticks "${comp[$c]}") - before[$c]))" \
      --argjson w "$wall" --argjson hz "$(getconf CLK_TCK)" '. + {($c): (($t / $hz / $w * 1000 | round) / 10)}' <<<"$json")
  done
  jq -c --argjson t "$((bench_ticks - before[bench]))" --argjson w "$wall" \
    --argjson hz "$(getconf CLK_TCK)" '. + {bench: (($t / $hz / $w * 1000 | round) / 10)}' <<<"$json"
}

# message-store's own store-call latencies: {op: {count, sum_ms}}.
store_json() {
  curl -fs "http://127.0.0.1:$metrics_port/metrics" 2>/dev/null |
    awk -F'[{}" ]+' '/^parley_msgstore_store_ms_(sum|count)\{/ {
        k = ($1 ~ /_sum$/) ? "sum_ms" : "count"; print $3, k, $NF }' |
    jq -Rn '[inputs | split(" ") | {op: .[0], k: .[1], v: (.[2] | tonumber)}]
            | group_by(.op) | map({(.[0].op): (map({(.k): .v}) | add)}) | add // {}'
}

# Each hop's time, from every service's parley_bus_record_age_ms
# histograms (the age of a record when its consumer took it): {consumer:
# {count, sum_ms, p50_ms}}, summed over the processes of one consumer (2
# gateways); p50_ms is the bucket bound the median falls under (buckets
# 1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50 ... ms).
hops_json() {
  local port
  for port in "${age_ports[@]}"; do curl -fs "http://127.0.0.1:$port/metrics" 2>/dev/null || true; done |
    awk -F'[{}" ]+' '
      /^parley_bus_record_age_ms_(sum|count)\{/ { k = ($1 ~ /_sum$/) ? "sum_ms" : "count"; v[$3, k] += $NF; c[$3] = 1 }
      /^parley_bus_record_age_ms_bucket\{/ && $5 != "+Inf" { b[$3, $5] += $NF; les[$5] = 1 }
      END {
        n = 0; for (le in les) bounds[++n] = le + 0
        for (i = 2; i <= n; i++) for (j = i; j > 1 && bounds[j - 1] > bounds[j]; j--) {
          t = bounds[j]; bounds[j] = bounds[j - 1]; bounds[j - 1] = t }
        for (x in c) {
          print x, "count", v[x, "count"] + 0; print x, "sum_ms", v[x, "sum_ms"] + 0
          for (i = 1; i <= n; i++) if (b[x, bounds[i]] >= v[x, "count"] / 2 && v[x, "count"] > 0) {
            print x, "p50_ms", bounds[i]; break }
        }
      }' |
    jq -Rn '[inputs | split(" ") | {c: .[0], k: .[1], v: (.[2] | tonumber)}]
            | group_by(.c) | map({(.[0].c): (map({(.k): .v}) | add)}) | add // {}'
}

results=$workdir/results.jsonl
: >"$results"
run() { # tag, then parley-bench arguments; appends its JSON with the CPU split
  local line tag=$1 t0=$SECONDS
  shift
  step="$mode $tag"
  services_up "$tag"
  # PRIME_S: first send 1:1 at 100/s for that long on these services, not
  # reported, so a scenario measures a deployment that runs, not one that
  # starts. A fresh stack's first second (connection pools filling, the
  # tables FerretDB makes at a first insert, consumers' first fetches)
  # held every 1,000/s run's p99 at 290-600 ms, all of it in that second,
  # while the same services after 3 s at 100/s gave 35-59 ms; it failed
  # the max ladder's first step (p99 192 ms), and a ladder only goes down.
  # The measured users are new to the services all the same.
  [ "${PRIME_S:-$PRIME_DEFAULT}" -le 0 ] ||
    "$bench" rate --rate 100 --pairs "$PAIRS" --duration "${PRIME_S:-$PRIME_DEFAULT}" --procs 1 --grace 3 \
      "${urls[@]}" >/dev/null 2>&1 || true
  cpu_mark
  local slow=()
  [ -z "${BENCH_SLOW_MS:-}" ] || slow=(--slow-log "$workdir/slow-$mode-$tag.log" --slow-ms "$BENCH_SLOW_MS")
  if ! line=$("$bench" "$@" "${urls[@]}" "${slow[@]}"); then
    say "parley-bench $1 ($mode) reported a shortfall (kept in the results)"
  fi
  bench_ticks_now
  # Kept logs get each service's metrics at the scenario's end beside them.
  local port
  [ "$keep_logs" = 0 ] || for port in "${age_ports[@]}"; do
    curl -fs "http://127.0.0.1:$port/metrics" >"$workdir/metrics-$mode-$tag-$port.txt" || true
  done
  if [ -n "$line" ]; then
    jq -c --arg mode "$mode" --argjson cpu "$(cpu_json)" --argjson store "$(store_json)" \
      --argjson hops "$(hops_json)" \
      '. + {mode: $mode, cpu_percent: $cpu, store_ms: $store, hops_ms: $hops}' <<<"$line" >>"$results"
  else
    say "parley-bench $1 ($mode) produced no result"
  fi
  services_down
  say "$mode $tag done in $((SECONDS - t0)) s"
}

# A freshly started Kafka broker spends its first minute compiling: in the
# record at 15e057a it burned 81% of a core in the stack's first scenario
# (the 100/s floor), 57% in the next at the same rate and 42% at 1,000/s;
# perf of a fresh broker's first seconds at 1,000/s showed its C1/C2
# compiler threads at 60% of its CPU. The measured scenarios should meet a
# broker that runs as a deployed one does, warm.
warmup() {
  local t0=$SECONDS s=${BENCH_STACK_WARMUP_S:-15}
  [ "$s" -gt 0 ] || return 0
  step="stack warm-up"
  services_up warmup
  "$bench" rate --rate 500 --pairs "$PAIRS" --duration "$s" --procs 1 --grace 5 "${urls[@]}" \
    >/dev/null 2>&1 || true
  services_down
  say "stack warm-up ($s s at 500/s, not reported) done in $((SECONDS - t0)) s"
}

PRIME_DEFAULT=${BENCH_PRIME_S:-3}
SCENARIOS=" ${BENCH_SCENARIOS:-latency rate max group groupdevices sync idle} "
GROUP_DEVICES=${BENCH_GROUP_DEVICES:-3}
want() { [[ $SCENARIOS == *" $1 "* ]]; }
# mode: the standard set for one mode; the per-mode sizes are in the header.
scenarios() {
  local r rates idle_rates="" max_from pending idle_conns idle_synced=$IDLE_SYNCED
  if [ "$mode" = parleyd ]; then
    rates=${BENCH_PD_RATES-1000 10000} max_from=${BENCH_PD_MAX_FROM:-500}
    idle_rates=${BENCH_PD_IDLE_RATES:-}
    pending=${BENCH_PD_SYNC_PENDING:-10000} idle_conns=${BENCH_PD_IDLE_CONNS:-0}
  elif [ "$mode" = peer ]; then
    # The peer has no groups and no pending-message sync to compare.
    rates=${BENCH_PEER_RATES:-${BENCH_PD_RATES:-1000 10000}} max_from=${BENCH_PEER_MAX_FROM:-1000}
    pending=0 idle_conns=0 idle_synced=${BENCH_PEER_IDLE_CONNS:-3000}
  else
    stack_up
    rates=${BENCH_STACK_RATES-100 1000} max_from=${BENCH_STACK_MAX_FROM:-50}
    idle_rates=${BENCH_STACK_IDLE_RATES-1000}
    pending=${BENCH_STACK_SYNC_PENDING:-10000} idle_conns=${BENCH_STACK_IDLE_CONNS:-30000}
    warmup
  fi
  [ "$LATENCY_RATE" -le 0 ] || ! want latency ||
    run latency latency --rate "$LATENCY_RATE" --pairs "$PAIRS" --duration "$DURATION" --procs 1 --grace 10
  for r in $rates; do
    want rate || break
    run "rate$r" rate --rate "$r" --pairs "$PAIRS" --duration "$DURATION" --procs 1 --grace 10
  done
  for r in $idle_rates; do
    want rate && [ "${BENCH_RATE_IDLE_CONNS:-10000}" -gt 0 ] || break
    run "rate${r}idle" rate --rate "$r" --pairs "$PAIRS" --duration "$DURATION" --procs 1 --grace 10 \
      --idle "${BENCH_RATE_IDLE_CONNS:-10000}" --idle-procs "${BENCH_RATE_IDLE_PROCS:-2}" \
      --connect-timeout 300
  done
  ! want max ||
    run max max --rate "$max_from" --pairs "$PAIRS" --duration "$MAX_STEP_S" --procs 1 --grace 3 \
      --settle 2 --steps 2
  [ "$mode" = peer ] || ! want group || run group group --msgs "$GROUP_MSGS" --rate 10 --grace 20 --settle 2
  [ "$mode" = peer ] || ! want groupdevices ||
    run groupdevices group --msgs "$GROUP_MSGS" --rate 10 --grace 20 --settle 2 \
      --devices "$GROUP_DEVICES"
  [ "$pending" -le 0 ] || ! want sync || run sync sync --pending "$pending" --grace 60
  [ "$idle_synced" -le 0 ] || ! want idle ||
    PRIME_S=0 run idlesynced idle --conns "$idle_synced" --procs "$IDLE_PROCS" --hold "$IDLE_HOLD"
  [ "$idle_conns" -le 0 ] || ! want idle ||
    PRIME_S=0 run idle idle --conns "$idle_conns" --procs "$IDLE_PROCS" --hold "$IDLE_HOLD" --upgrade-only
}
for mode in $MODES; do
  scenarios
done
step="writing the report"

# ---- report ------------------------------------------------------------------

mkdir -p "$OUT"
mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
total=$((SECONDS - t_start))
jq -s --arg when "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --arg commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --argjson nproc "$(nproc)" --argjson mem "$mem_kb" --arg kernel "$(uname -r)" \
  --arg cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
  --arg mongo "$(command -v mongod >/dev/null && echo mongod || echo "FerretDB 1.24 over ${PARLEY_FERRETDB_BACKEND:-$(ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 && echo PostgreSQL || echo SQLite)}")" \
  --arg load0 "$load_start" --arg load1 "$(cut -d' ' -f1-3 /proc/loadavg)" --argjson total "$total" \
  --arg ejabberd "$(dpkg-query -W -f='${Version}' ejabberd 2>/dev/null || echo unknown)" \
  '{when: $when, commit: $commit, run_seconds: $total,
    load_average_start: $load0, load_average_end: $load1,
    machine: {nproc: $nproc, mem_total_kb: $mem, kernel: $kernel, cpu: $cpu},
    modes: {
      parleyd: {what: "parleyd: every service in one process over its SQLite bus and store",
                listeners: 1, all_on_one_machine: true},
      stack: {what: ("microservices: Kafka + " + $mongo + ", presence, message-store, group-fanout, receipt, 2 gateways"),
              kafka: "Apache Kafka 4.1 KRaft, one node, 8 partitions", store: $mongo,
              gateways: 2, gateway_workers: 2, presence_cache_ms: 2000,
              topology: "1:1 receivers on gateway 1, senders on gateway 2 (every message crosses gateways); group members alternate",
              all_on_one_machine: true},
      peer: {what: ("ejabberd " + $ejabberd + " (Debian), XMPP over WebSocket (RFC 7395), SASL ANONYMOUS, Mnesia, one node"),
             topology: "senders address their receiver'"'"'s bound full JID; no presence, no acks, no `sent` answer (XMPP has none), nothing stored",
             listeners: 1, all_on_one_machine: true}},
    body_bytes: 100,
    results: .}' "$results" >"$OUT/latest.json"

jq -r '
  def f1: (. * 10 | round) / 10;
  def f2: (. * 100 | round) / 100;
  def ms: if . == null then "-" else "\(f2) ms" end;
  def cpu: [to_entries[] | select(.value >= 1) | "\(.key) \(.value | round)%"] | join(", ");
  def cpulines: .[] | "CPU, \(.mode) \(.scenario) \(.rate // .conns // .pending // "" | if type == "number" then round else . end)\(if .idle then " + \(.idle.conns) idle" else "" end): \(.cpu_percent | cpu).";
  "# Parley benchmark: parleyd, microservices and a peer",
  "",
  "\(.when), commit \(.commit); \(.machine.nproc) cores (\(.machine.cpu)), \(.machine.mem_total_kb / 1048576 | f1) GiB, Linux \(.machine.kernel); whole `make bench` run \(.run_seconds) s.",
  "Load average at the start \(.load_average_start), at the end \(.load_average_end): the 2 cores are shared with other work, so every figure is noisy and a floor, not a capacity.",
  "",
  "Modes: **parleyd**: \(.modes.parleyd.what). **stack**: \(.modes.stack.what); \(.modes.stack.topology). **peer**: \(.modes.peer.what); \(.modes.peer.topology). Each scenario runs on freshly started services (fresh data folder, or fresh topics and database). The load generator runs on the same cores.",
  "",
  "Latency against offered rate, every mode: [latency.svg](latency.svg) (p99 solid, p50 dashed).",
  "",
  ([.results[] | select(.scenario == "latency")] | select(length > 0) |
    "## Latency floor: 1:1 at a low fixed rate (\(.[0].pairs) pairs, \(.[0].duration_s) s), where nothing queues",
    "",
    "| mode | offered rate | not received | min | p50 (the floor) | p90 | p99 | max |",
    "|---|---|---|---|---|---|---|---|",
    (.[] | "| \(.mode) | \(.rate | round)/s | \(.not_received) | \(.latency_ms.min | ms) | \(.latency_ms.p50 | ms) | \(.latency_ms.p90 | ms) | \(.latency_ms.p99 | ms) | \(.latency_ms.max | ms) |"),
    "", cpulines, ""),
  ([.results[] | select(.scenario == "rate")] | select(length > 0) |
    "## 1:1 messages at a fixed rate (\(.[0].pairs) sender/receiver pairs, \(.[0].body_bytes)-byte bodies, \(.[0].duration_s) s each)",
    "",
    "| mode | offered rate | delivered/s | `sent` answers | not received | p50 | p90 | p99 | p99.9 | max |",
    "|---|---|---|---|---|---|---|---|---|---|",
    (.[] | "| \(.mode)\(if .idle then ", beside \(.idle.synced) idle connections (\(.idle.connect_s | round) s to sync them)" else "" end) | \(.rate | round)/s | \(.delivered_per_s | round) | \(if .sent_answers == null then "none in XMPP" else "\(.sent_answers) of \(.sends)" end) | \(.not_received) | \(.latency_ms.p50 | ms) | \(.latency_ms.p90 | ms) | \(.latency_ms.p99 | ms) | \(.latency_ms.p999 | ms) | \(.latency_ms.max | ms) |"),
    "",
    "Latency is send to receive (the sender stamps CLOCK_MONOTONIC into the body; one machine, one clock).",
    "", cpulines, ""),
  ([.results[] | select((.scenario == "rate" and .idle == null) or .scenario == "latency")] as $runs |
    (["parleyd", "stack", "peer"] | map(select(. as $m | $runs | any(.mode == $m)))) as $modes |
    select($runs | any(.mode == "peer")) |
    "## Beside the peer: 1:1 p50 / p99 by offered rate (the latency and rate runs above)",
    "",
    "| offered rate | \($modes | map(if . == "peer" then "peer (ejabberd)" else . end) | join(" | ")) |",
    "|---|\($modes | map("---") | join("|"))|",
    ($runs | map(.rate) | unique[] as $r |
      "| \($r | round)/s | \([$modes[] as $m | [$runs[] | select(.mode == $m and .rate == $r)][0] |
        if . == null then "" else "\(.latency_ms.p50 | f2) / \(.latency_ms.p99 | f2) ms\(if .not_received > 0 then ", \(.not_received) missing" else "" end)" end] | join(" | ")) |"),
    ""),
  ([.results[] | select(.scenario == "max")] | select(length > 0) |
    "## Highest rate with p99 under \(.[0].max_p99_ms | round) ms (ladder of \(.[0].step_s) s runs, fresh users each)",
    "",
    "| mode | rate found | its p99 | first rate that did not hold | steps (rate: p99 over every send) |",
    "|---|---|---|---|---|",
    (.[] | "| \(.mode) | \(if .rate > 0 then "\(.rate | round)/s" else "none" end) | \(.p99_ms | ms) | \(if .first_failing_rate then "\(.first_failing_rate | round)/s" else "-" end) | \([.steps[] | "\(.rate | round)/s: \(.p99_ms_all_sends | ms)"] | join(", ")) |"),
    "",
    "A message never received counts as slower than any received; a step with more than 1% missing fails.",
    "", cpulines, ""),
  ([.results[] | select(.scenario == "group")] | select(length > 0) |
    "## Group fan-out (\(.[0].members) members, all online, \(.[0].msgs) messages at \(.[0].rate | round)/s from one member)",
    "",
    "| mode | devices per member | copies received | `sent` answers | p50 | p90 | p99 | max | at the socket: p50 / p99 |",
    "|---|---|---|---|---|---|---|---|---|",
    (.[] | "| \(.mode) | \(.devices // 1) | \(.copies_received) of \(.copies_expected) | \(.sent_answers) of \(.msgs) | \(.latency_ms.p50 | ms) | \(.latency_ms.p90 | ms) | \(.latency_ms.p99 | ms) | \(.latency_ms.max | ms) | \(if .latency_at_socket_ms then "\(.latency_at_socket_ms.p50 | ms) / \(.latency_at_socket_ms.p99 | ms)" else "-" end) |"),
    "",
    "At the socket: the same copies timed by the kernel receive stamp of their bytes (SO_TIMESTAMPNS), which leaves out the time the one load process takes to reach each of its hundreds of sockets in turn.",
    "", cpulines, ""),
  ([.results[] | select(.scenario == "sync")] | select(length > 0) |
    "## Reconnect with pending messages",
    "",
    "| mode | pending | connect to `synced` | connect to last message | rate | before `synced` | inbox filled in | store caught up after |",
    "|---|---|---|---|---|---|---|---|",
    (.[] | "| \(.mode) | \(.pending) | \(if .connect_to_synced_ms < 0 then "none in \(.gave_up_after_s) s" else "\(.connect_to_synced_ms | round) ms" end) | \(if .connect_to_all_ms < 0 then "\(.received) received in \(.gave_up_after_s) s" else "\(.connect_to_all_ms | round) ms" end) | \(if .msgs_per_s > 0 then "\(.msgs_per_s | round)/s" else "\(.received / .gave_up_after_s | round)/s" end) | \(.before_synced) | \(.fill_s | f1) s | \(.store_catch_up_s | f1) s |"),
    "", cpulines, ""),
  ([.results[] | select(.scenario == "idle")] | select(length > 0) |
    "## Idle connections (held \(.[0].hold_s) s)",
    "",
    "| mode | connections | counted at | load processes | ready | failed | connect rate | connect to ready p50 / p99 | RSS growth per connection (per listener process) | dropped while held |",
    "|---|---|---|---|---|---|---|---|---|---|",
    (.[] | "| \(.mode) | \(.conns) | `\(.counted_at)` | \(.procs) | \(.synced) | \(.failed) | \(.conns_per_s | round)/s | \(.connect_to_ready_ms.p50 | f1) / \(.connect_to_ready_ms.p99 | f1) ms | \([.gateways[] | "\(.bytes_per_conn / 1024 | f2) KiB (\(.conns))"] | join(", ")) | \(.dropped_while_held) |"),
    "",
    "`synced` needs presence and message-store to write and read the store for every connection; `upgrade` is the gateway alone (HTTP upgrade, token check, registration). In parleyd the RSS is the whole process, every service included; for the peer, ejabberd'"'"'s whole Erlang VM, `synced` being its resource bind.",
    "", cpulines, ""),
  ([.results[] | select(.scenario == "rate" and (.store_ms | length) > 0)] | select(length > 0) |
    "## Where message-store spends its time (its own `parley_msgstore_store_ms` histograms, per rate run)",
    "",
    "| mode | offered rate | store call | calls | mean | store ms per delivered message |",
    "|---|---|---|---|---|---|",
    (.[] | . as $r | $r.store_ms | to_entries | sort_by(-.value.sum_ms)[] | select(.value.count > 0) |
      "| \($r.mode) | \($r.rate | round)/s | \(.key) | \(.value.count) | \(.value.sum_ms / .value.count | ms) | \(if $r.received > 0 then (.value.sum_ms / $r.received * 1000 | round / 1000 | tostring) else "-" end) |"),
    ""),
  ([.results[] | select((.scenario == "rate" or .scenario == "latency") and ((.hops_ms // {}) | length) > 0)] | select(length > 0) |
    "## Each bus hop (every consumer'"'"'s `parley_bus_record_age_ms`: a record'"'"'s age when its consumer took it, from its producer'"'"'s produce call)",
    "",
    "| mode | run | consumer | records | median (bucket bound) | mean |",
    "|---|---|---|---|---|---|",
    (.[] | . as $r | $r.hops_ms | to_entries[] | select(.value.count > 0) |
      "| \($r.mode) | \($r.scenario) \($r.rate | round)/s\(if $r.idle then " + \($r.idle.conns) idle" else "" end) | \(.key) | \(.value.count) | \(if .value.p50_ms then "<= \(.value.p50_ms) ms" else "-" end) | \(.value.sum_ms / .value.count | ms) |"),
    "",
    "A 1:1 message makes two hops to its reader (gateway to message-store on the inbox, message-store to the reader'"'"'s gateway); the acks, the receipt facts and the receipts make the rest.",
    "")
' "$OUT/latest.json" >"$OUT/latest.md"

# ---- the chart: latency against offered rate, one line pair per mode -----------

# Every 1:1 run of a mode (latency, rate, max's ladder steps) where at most
# 1% never arrived, one per offered rate (a 10 s run before a ladder step).
chart() {
  local m data=$workdir/latency.dat titles=""
  command -v gnuplot >/dev/null || { say "warning: no gnuplot (deploy/local/deps.sh bench): no chart"; return 0; }
  : >"$data"
  for m in $MODES; do
    jq -r --arg m "$m" '[.results[] | select(.mode == $m) |
        if .scenario == "max" then (.steps[] | . + {prio: 1})
        elif (.scenario == "rate" and .idle == null) or .scenario == "latency" then . + {prio: 0} else empty end |
        select(.sends > 0 and .not_received <= 0.01 * .sends)] |
      group_by(.rate) | map(sort_by(.prio)[0]) | .[] |
      "\(.rate) \(.latency_ms.p50) \(.latency_ms.p99)"' "$OUT/latest.json" >"$workdir/points"
    [ -s "$workdir/points" ] || continue
    { cat "$workdir/points"; printf '\n\n'; } >>"$data"
    titles+="${titles:+ }$([ "$m" = peer ] && echo ejabberd || echo "$m")"
  done
  [ -n "$titles" ] || return 0
  gnuplot -e "data='$data'; out='$OUT/latency.svg'; titles='$titles'" \
    -e "note='make bench at $(jq -r .commit "$OUT/latest.json"), $(jq -r .when "$OUT/latest.json"), load average $load_start at the start; runs with over 1% never received left out'" \
    bench/latency.gp || say "warning: gnuplot failed; no chart"
}
chart

say "results: $OUT/latest.md, $OUT/latest.json and $OUT/latency.svg (whole run $total s)"
cat "$OUT/latest.md"
